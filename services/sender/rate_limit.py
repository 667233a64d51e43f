"""A per-server send-rate limit shared by every sender process: a token bucket in Redis.

Providers cap how fast one mailbox may send (Microsoft 365: 30 messages per minute). Each
server has one bucket (``mailroom:sender:rate:<server id>``) that refills at
``MAILROOM_SENDER_RATE_PER_MINUTE`` and holds at most ``MAILROOM_SENDER_RATE_BURST`` tokens.
A send over the limit waits for its token, at most a bounded time: then it is retried later,
so a server's backlog never holds its threads for long; it is never failed for it. The bucket
uses Redis's clock (``TIME`` inside the script), so processes on hosts with skewed clocks
share it fairly.

If Redis cannot be reached the limit is not applied (logged): holding every mail back because
the limiter's store is down would turn a small outage into a large one.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared.redis_client import redis_client

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV rate (tokens/s), burst. Returns 0 when a token was taken, else the
# milliseconds until one will be there.
_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or t
tokens = math.min(burst, tokens + math.max(0, t - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return wait
"""


class RateLimiter:
    def __init__(self, redis_url: str, per_minute: float, burst: int) -> None:
        self.enabled = per_minute > 0
        self._rate = per_minute / 60.0
        self._burst = max(1, burst)
        self._redis = redis_client(redis_url)
        self._script = self._redis.register_script(_TAKE)
        self._warned = threading.Event()

    def wait(
        self, server_id: str, stop: threading.Event, max_seconds: float = float("inf")
    ) -> bool:
        """Block until ``server_id`` may send one mail (True), or give up after
        ``max_seconds`` or on ``stop`` (False: the mail is sent later, and holds nothing up
        meanwhile)."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + max_seconds
        key = f"mailroom:sender:rate:{server_id}"
        while True:
            try:
                wait_ms = int(self._script(keys=[key], args=[self._rate, self._burst]))
            except redis.RedisError as exc:
                if not self._warned.is_set():
                    log.warning("rate limit not applied: Redis unavailable (%s)", exc)
                    self._warned.set()
                return True
            self._warned.clear()
            if wait_ms <= 0:
                return True
            if time.monotonic() + wait_ms / 1000 > deadline or stop.wait(wait_ms / 1000):
                return False
