"""Leases in Redis: at most one worker process serves a mailbox at a time.

A lease is a key holding its owner's name with an expiry. The owner renews it well before it
expires; if the owner dies, the lease runs out and another process takes the mailbox over
within one lease period. Renewal and release only act when the caller still owns the lease.

Redis being away (or too slow) is :class:`LeasesUnavailable`, never a redis-py error: a
poller reports it and tries again later like any other outage, so no caller needs to know
the client library, and no thread dies of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeasesUnavailable(Exception):
    """Redis could not be asked about a lease."""


@contextlib.contextmanager
def _asking_redis() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as error:
        raise LeasesUnavailable(f"Redis unavailable: {error}") from error


class Leases:
    def __init__(self, client: redis.Redis, owner: str, ttl_seconds: float) -> None:
        self._client = client
        self.owner = owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def key(name: str) -> str:
        return f"mailroom:lease:{name}"

    def acquire(self, name: str) -> bool:
        with _asking_redis():
            taken = self._client.set(self.key(name), self.owner, nx=True, px=self.ttl_ms)
        return bool(taken) or self.renew(name)

    def renew(self, name: str) -> bool:
        with _asking_redis():
            return bool(self._renew(keys=[self.key(name)], args=[self.owner, self.ttl_ms]))

    def release(self, name: str) -> None:
        with _asking_redis():
            self._release(keys=[self.key(name)], args=[self.owner])

    def holder(self, name: str) -> str | None:
        with _asking_redis():
            value = self._client.get(self.key(name))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
