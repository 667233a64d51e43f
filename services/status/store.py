"""The current state of every server, in Redis, shared by every status-service replica.

One JSON value per server (``mailroom:status:server:<id>``). Each update is an optimistic
transaction (WATCH / MULTI): read, compute the new status with ``state.py``, write. When it
changes the state, the same transaction publishes the change on a Redis channel (the live
stream of every replica) and, for an alerting state, appends it to the alert outbox list that
``alerts.py`` relays to RabbitMQ. So a change is stored, streamed and alerted exactly once, even
when several replicas see the same report or clock tick.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import redis

from services.status.state import ALERTING, Change, ServerStatus, change_between
from shared.redis_client import redis_client

log = logging.getLogger(__name__)

PREFIX = "mailroom:status"
SERVERS = f"{PREFIX}:servers"  # set of every server id with a status
CHANGES_CHANNEL = f"{PREFIX}:changes"  # pub/sub: every state change, for the live streams
ALERT_OUTBOX = f"{PREFIX}:alerts"  # list: changes to an alerting state, not yet published

Update = Callable[[ServerStatus | None], ServerStatus | None]


def server_key(server_id: str) -> str:
    return f"{PREFIX}:server:{server_id}"


def _read(server_id: str, raw: bytes | None) -> ServerStatus | None:
    """A stored status; one this version cannot read (damaged, or written by a version with
    other fields) counts as none, so the next update writes a fresh one instead of every read
    of it failing."""
    if raw is None:
        return None
    try:
        return ServerStatus.from_json(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("status: the stored status of %s is unreadable (%r); replaced", server_id, exc)
        return None


class StatusStore:
    def __init__(self, client: redis.Redis[bytes]) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> StatusStore:
        return cls(redis_client(url))

    @property
    def redis(self) -> redis.Redis[bytes]:
        return self._redis

    def get(self, server_id: str) -> ServerStatus | None:
        return _read(server_id, self._redis.get(server_key(server_id)))

    def many(self, server_ids: Iterable[str]) -> dict[str, ServerStatus]:
        ids = list(server_ids)
        if not ids:
            return {}
        values = self._redis.mget([server_key(i) for i in ids])
        read = {i: _read(i, v) for i, v in zip(ids, values, strict=True)}
        return {i: status for i, status in read.items() if status is not None}

    def update(self, server_id: str, update: Update) -> Change | None:
        """Apply ``update`` atomically; returns the state change it made, if any."""
        key = server_key(server_id)
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw: bytes | None = pipe.get(key)  # immediate mode
                    before = _read(server_id, raw)
                    after = update(before)
                    if after is None or after == before:
                        pipe.unwatch()
                        return None
                    change = change_between(before, after)
                    pipe.multi()
                    pipe.set(key, after.to_json())
                    pipe.sadd(SERVERS, server_id)
                    if change is not None:
                        payload = json.dumps(change.as_json())
                        pipe.publish(CHANGES_CHANNEL, payload)
                        if change.state in ALERTING:
                            pipe.rpush(ALERT_OUTBOX, payload)
                    pipe.execute()
                    return change
                except redis.WatchError:
                    continue  # another replica changed it meanwhile: judge again

    def remove(self, server_id: str) -> None:
        """The server was deleted: its status goes, and the streams are told."""
        current = self.get(server_id)
        with self._redis.pipeline() as pipe:
            pipe.delete(server_key(server_id))
            pipe.srem(SERVERS, server_id)
            if current is not None:
                removed = {"tenant_id": current.tenant_id, "server_id": server_id, "removed": True}
                pipe.publish(CHANGES_CHANNEL, json.dumps(removed))
            pipe.execute()

    def known_ids(self) -> set[str]:
        return {member.decode() for member in self._redis.smembers(SERVERS)}
