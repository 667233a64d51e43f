"""The project's mail lab: real mail servers on loopback for integration tests and benchmarks.

Plain classes, no pytest: ``certs.issue`` makes a CA and server certificates,
``dovecot.DovecotLab`` runs a private Dovecot (IMAP, POP3, TLS, SNI, IDLE, COMPRESS),
``smtp_server.SmtpLab`` an aiosmtpd server, ``oauth_server.OAuthLab`` an OAuth2 authorization
server (Node.js) whose access tokens both accept (XOAUTH2, OAUTHBEARER).
``fixtures`` wraps them as pytest fixtures for a conftest or a test module to import.
"""
