// The mail lab's OAuth2 authorization server: oauth2-mock-server with the behaviour of a real
// mail provider layered on through its events. Started by tests/lab/oauth_server.py.
//
//   node server.js <port> <control_port> <state_dir>     (0 = any free port; 127.0.0.1 only)
//
// Environment: OAUTH_LAB_CLIENT_SECRET (required; kept off the command line, which `ps` shows),
// OAUTH_LAB_CLIENT_ID (default "mailroom-lab").
//
// What the mock alone does not do, and this file adds:
// - the login: /authorize redirects at once (no login page), so the mailbox login comes from
//   `login_hint` (the product sends it) and becomes the tokens' `sub` (the mock says "johndoe");
// - single-use authorization codes bound to their login, and PKCE required for a code whose
//   authorization request carried a code_challenge (the mock only checks a verifier that is
//   sent, and answers a wrong one with invalid_request; here it is invalid_grant, RFC 7636 4.6);
// - client authentication at /token (client_secret_post or client_secret_basic);
// - refresh-token rotation as Microsoft does it: every refresh answers a new refresh token and
//   the presented one stops working; revoked, rotated-out and unknown tokens get invalid_grant;
// - a configurable access-token lifetime (`exp` and `expires_in`);
// - a control server (plain JSON over HTTP) for the tests: lifetime, revoke, counters, keys.
//
// When both servers listen, <state_dir>/ready.json names the ports and the issuer.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { OAuth2Server } from 'oauth2-mock-server';

const HOST = '127.0.0.1';
const DEFAULT_LIFETIME = 3600;
const DEFAULT_SUB = 'johndoe';

const [portArg, controlPortArg, stateDir] = process.argv.slice(2);
if (portArg === undefined || controlPortArg === undefined || stateDir === undefined) {
  console.error('usage: node server.js <port> <control_port> <state_dir>');
  process.exit(2);
}
const CLIENT_ID = process.env.OAUTH_LAB_CLIENT_ID || 'mailroom-lab';
const CLIENT_SECRET = process.env.OAUTH_LAB_CLIENT_SECRET;
if (!CLIENT_SECRET) {
  console.error('OAUTH_LAB_CLIENT_SECRET is not set');
  process.exit(2);
}

function log(...parts) {
  console.log(new Date().toISOString(), ...parts);
}

// --- state ---------------------------------------------------------------------------------

let lifetime = DEFAULT_LIFETIME;
let issueRefreshTokens = true; // false: answer like a client registered without offline access
const codes = new Map(); // code -> {sub, scope, pkce}
const usedCodes = new Map(); // code -> sub, for the error of a second use
const refreshTokens = new Map(); // refresh token -> {sub, scope, state: active|rotated|revoked}
let counters = new Map(); // sub -> {authorization_code, refresh_token, refused}
const issued = []; // every token handed out, for the suite's leak check

function count(sub, field) {
  if (sub === undefined) return;
  if (!counters.has(sub)) counters.set(sub, { authorization_code: 0, refresh_token: 0, refused: 0 });
  counters.get(sub)[field] += 1;
}

/** Codes are single use: a code presented once (granted or refused) is spent. */
function useCode(code) {
  const grant = codes.get(code);
  if (grant !== undefined) usedCodes.set(code, grant.sub);
  codes.delete(code);
}

/** The grant's login and scope, from the code or refresh token in the request (or undefined). */
function grantOf(body) {
  if (body.grant_type === 'authorization_code') return codes.get(body.code);
  if (body.grant_type === 'refresh_token') return refreshTokens.get(body.refresh_token);
  return undefined;
}

/** client_secret_basic (RFC 6749 2.3.1: both parts form-urlencoded) or client_secret_post. */
function clientCredentials(req) {
  const header = req.headers.authorization;
  if (header && /^basic /i.test(header)) {
    const decoded = Buffer.from(header.slice(6).trim(), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon < 0) return { method: 'basic' };
    const unescape = (s) => {
      try {
        return decodeURIComponent(s.replace(/\+/g, ' '));
      } catch {
        return s;
      }
    };
    return {
      method: 'basic',
      id: unescape(decoded.slice(0, colon)),
      secret: unescape(decoded.slice(colon + 1)),
    };
  }
  return { method: 'post', id: req.body?.client_id, secret: req.body?.client_secret };
}

// --- the mock and its hooks ----------------------------------------------------------------

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');
const service = server.service;

service.on('beforeAuthorizeRedirect', (redirect, req) => {
  const code = redirect.url.searchParams.get('code');
  if (!code) return; // an error redirect (unsupported response_type)
  let sub = req.query.login_hint;
  if (typeof sub !== 'string' || sub === '') {
    log('authorize without login_hint: the grant is for', DEFAULT_SUB);
    sub = DEFAULT_SUB;
  }
  const scope = typeof req.query.scope === 'string' ? req.query.scope : undefined;
  codes.set(code, { sub, scope, pkce: typeof req.query.code_challenge === 'string' });
  log('authorize', JSON.stringify({ sub, scope, pkce: Boolean(req.query.code_challenge) }));
});

service.on('beforeTokenSigning', (token, req) => {
  // Fires twice per answer: for the access token and for the id_token (which has `aud`).
  const grant = grantOf(req.body);
  if (grant !== undefined) token.payload.sub = grant.sub;
  // The id_token says who signed in, as Microsoft's and Google's do (email claim).
  if (grant !== undefined && token.payload.aud !== undefined) token.payload.email = grant.sub;
  if (grant?.scope !== undefined && req.body.scope === undefined) token.payload.scope = grant.scope;
  if (token.payload.aud === undefined) {
    req.labLifetime ??= lifetime;
    token.payload.exp = token.payload.iat + req.labLifetime;
  }
});

function refuse(response, req, status, error, description, sub) {
  response.statusCode = status;
  response.body = { error, error_description: description };
  if (status === 401 && clientCredentials(req).method === 'basic') {
    req.res?.set('WWW-Authenticate', 'Basic realm="oauth-lab"');
  }
  count(sub, 'refused');
  log('token refused', JSON.stringify({ grant_type: req.body.grant_type, sub, error, description }));
}

service.on('beforeResponse', (response, req) => {
  const body = req.body;
  const grant = grantOf(body);
  if (body.grant_type === 'authorization_code') useCode(body.code);
  const client = clientCredentials(req);
  if (client.id !== CLIENT_ID || client.secret !== CLIENT_SECRET) {
    const why = client.id === undefined ? 'no client credentials' : `client ${client.id}: wrong id or secret`;
    refuse(response, req, 401, 'invalid_client', `${why} (${client.method})`, grant?.sub);
    return;
  }
  if (body.grant_type === 'authorization_code') {
    if (grant === undefined) {
      const sub = usedCodes.get(body.code);
      const why = sub === undefined ? 'unknown authorization code' : 'authorization code was already used';
      refuse(response, req, 400, 'invalid_grant', why, sub);
      return;
    }
    if (grant.pkce && body.code_verifier === undefined) {
      refuse(response, req, 400, 'invalid_grant', 'code_verifier missing: the authorization request had a code_challenge', grant.sub);
      return;
    }
  } else if (body.grant_type === 'refresh_token') {
    if (grant === undefined) {
      refuse(response, req, 400, 'invalid_grant', 'unknown refresh token');
      return;
    }
    if (grant.state === 'rotated') {
      refuse(response, req, 400, 'invalid_grant', 'refresh token was already used and has been rotated out', grant.sub);
      return;
    }
    if (grant.state === 'revoked') {
      refuse(response, req, 400, 'invalid_grant', 'refresh token was revoked (consent withdrawn)', grant.sub);
      return;
    }
    grant.state = 'rotated';
  }
  if (response.statusCode !== 200) return;
  response.body.expires_in = req.labLifetime ?? lifetime;
  if (!issueRefreshTokens) delete response.body.refresh_token;
  for (const key of ['access_token', 'refresh_token', 'id_token']) {
    if (typeof response.body[key] === 'string') issued.push(response.body[key]);
  }
  if (grant !== undefined) {
    if (grant.scope !== undefined && body.scope === undefined) response.body.scope = grant.scope;
    const refreshToken = response.body.refresh_token;
    if (refreshToken !== undefined) {
      refreshTokens.set(refreshToken, { sub: grant.sub, scope: grant.scope, state: 'active' });
    }
    count(grant.sub, body.grant_type);
    log('token', JSON.stringify({ grant_type: body.grant_type, sub: grant.sub, expires_in: response.body.expires_in }));
  }
});

// The mock checks a sent code_verifier itself and throws before any event: its error handler
// answers 400 invalid_request. Shadowing `res.send` on the response object (Express only
// swaps the prototype) turns that into invalid_grant, counted for the code's login.
function pkceAsInvalidGrant(req, res) {
  res.send = function send(payload) {
    if (
      req.url.startsWith('/token') &&
      payload?.error === 'invalid_request' &&
      /code_verifier|code_challenge/.test(String(payload.error_description))
    ) {
      const code = req.body?.code;
      const grant = codes.get(code);
      const sub = grant?.sub ?? usedCodes.get(code);
      const description =
        grant === undefined && sub !== undefined
          ? 'authorization code was already used'
          : `PKCE: ${payload.error_description}`;
      if (code !== undefined) useCode(code);
      count(sub, 'refused');
      log('token refused', JSON.stringify({ sub, error: 'invalid_grant', description }));
      payload = { error: 'invalid_grant', error_description: description };
    }
    return Object.getPrototypeOf(this).send.call(this, payload);
  };
}

// The mock's request handler in our own http server (rather than server.start()): the hook
// above needs the response before Express sees it, and the issuer is named 127.0.0.1 (the
// mock's start() would call it "localhost").
const oauthHttp = http.createServer((req, res) => {
  pkceAsInvalidGrant(req, res);
  service.requestHandler(req, res);
});

// --- control server ------------------------------------------------------------------------

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      try {
        resolve(text ? JSON.parse(text) : {});
      } catch (err) {
        reject(err);
      }
    });
    req.on('error', reject);
  });
}

function reply(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

const control = http.createServer(async (req, res) => {
  try {
    const route = `${req.method} ${new URL(req.url, 'http://control').pathname}`;
    const body = req.method === 'POST' ? await readJson(req) : {};
    switch (route) {
      case 'POST /refresh-tokens': {
        issueRefreshTokens = body.issue !== false;
        log('refresh-tokens', issueRefreshTokens);
        return reply(res, 200, { issue: issueRefreshTokens });
      }
      case 'POST /lifetime': {
        const seconds = Number(body.seconds);
        if (!Number.isInteger(seconds) || seconds < 1) return reply(res, 400, { error: 'seconds must be a positive integer' });
        lifetime = seconds;
        log('lifetime', seconds);
        return reply(res, 200, { seconds });
      }
      case 'POST /revoke': {
        if (typeof body.sub !== 'string') return reply(res, 400, { error: 'sub must be a string' });
        let revoked = 0;
        for (const grant of refreshTokens.values()) {
          if (grant.sub === body.sub && grant.state !== 'revoked') {
            grant.state = 'revoked';
            revoked += 1;
          }
        }
        for (const [code, grant] of codes) if (grant.sub === body.sub) useCode(code);
        log('revoke', body.sub, revoked);
        return reply(res, 200, { sub: body.sub, revoked });
      }
      case 'GET /grants':
        return reply(res, 200, Object.fromEntries(counters));
      case 'GET /issued':
        return reply(res, 200, issued);
      case 'GET /keys':
        return reply(res, 200, server.issuer.keys.toJSON());
      case 'POST /reset':
        counters = new Map();
        lifetime = DEFAULT_LIFETIME;
        issueRefreshTokens = true;
        log('reset');
        return reply(res, 200, {});
      default:
        return reply(res, 404, { error: `no route ${route}` });
    }
  } catch (err) {
    return reply(res, 400, { error: String(err) });
  }
});

// --- start ---------------------------------------------------------------------------------

function listen(httpServer, port) {
  return new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(Number(port), HOST, () => resolve(httpServer.address().port));
  });
}

const port = await listen(oauthHttp, portArg);
const controlPort = await listen(control, controlPortArg);
server.issuer.url = `http://${HOST}:${port}`;
fs.mkdirSync(stateDir, { recursive: true });
const ready = path.join(stateDir, 'ready.json');
fs.writeFileSync(`${ready}.tmp`, JSON.stringify({ port, control_port: controlPort, issuer: server.issuer.url, pid: process.pid }));
fs.renameSync(`${ready}.tmp`, ready);
log('listening', JSON.stringify({ issuer: server.issuer.url, control_port: controlPort, client_id: CLIENT_ID }));

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    log('stopping on', signal);
    oauthHttp.closeAllConnections();
    control.closeAllConnections();
    process.exit(0);
  });
}
