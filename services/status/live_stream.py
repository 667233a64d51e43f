"""The live status streams of one status-service process: one Redis subscription for all.

Every state change is published once on a Redis channel (``store.CHANGES_CHANNEL``). A
subscription per open stream would cost a Redis connection per browser tab, so any tenant
could exhaust Redis's connections by opening streams. Instead the process holds one
subscription while at least one stream is open, and hands each change to the streams of the
change's tenant, through a queue per stream.

- A stream registers (:meth:`ChangeFeed.listen`) before it reads its snapshot, and the
  subscription is confirmed by then: no change falls between the snapshot and the stream.
- A stream that falls :data:`MAX_BEHIND` changes behind (a client that does not read) is
  ended instead of buffering without limit; its browser reconnects and gets a new snapshot.
- When the subscription breaks (Redis away), every open stream is ended the same way, since
  changes published meanwhile are lost to it; a new stream subscribes again.
- How many streams are open is bounded per tenant and in total (:class:`LeasedStream` holds
  one slot of :class:`shared.tenant_slots.TenantSlots` until the response ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from fastapi import HTTPException, Request, status
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.status.store import CHANGES_CHANNEL
from shared.http_auth import AUTH_RESPONSES, Problem
from shared.settings import Settings
from shared.tenant_slots import NoSlot, TenantSlots

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
DISCONNECT_CHECK_SECONDS = 1.0  # a closed stream gives back its slot within about this long
STREAM_RETRY_AFTER_SECONDS = 30
REDIS_RETRY_AFTER_SECONDS = 5
MAX_BEHIND = 1000  # changes a stream may hold unread before it is ended
POLL_SECONDS = 1.0  # how often the reader looks whether any stream is left
CONNECT_TIMEOUT_SECONDS = 5.0


def client_name() -> str:
    """How the feed's connection shows in Redis's CLIENT LIST: one per status process."""
    return f"mailroom-status-streams-{os.getpid()}"


@dataclass(eq=False)
class Listener:
    """One open stream's view of the feed: its tenant's changes, in order; ``None`` ends it."""

    tenant_id: str
    changes: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    ended: bool = False

    def offer(self, change: dict[str, Any]) -> None:
        if self.ended:
            return
        if self.changes.qsize() >= MAX_BEHIND:
            log.info("a live status stream of %s fell behind; it ends", self.tenant_id)
            self.end()
            return
        self.changes.put_nowait(change)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.changes.put_nowait(None)


class ChangeFeed:
    """One Redis subscription to the state changes, shared by every stream of the process."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._listeners: set[Listener] = set()
        self._subscribed: redis.asyncio.client.PubSub | None = None
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._subscribed is not None

    async def listen(self, tenant_id: str) -> Listener:
        """A listener for ``tenant_id``'s changes from now on; raises ``redis.RedisError`` or
        ``OSError`` when Redis cannot be subscribed to."""
        async with self._lock:
            if self._subscribed is None:
                client = redis.asyncio.Redis.from_url(
                    self._url,
                    socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    client_name=client_name(),
                )
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(CHANGES_CHANNEL)
                except BaseException:
                    await pubsub.aclose()
                    await client.aclose()
                    raise
                self._subscribed = pubsub
                self._reader = asyncio.create_task(self._read(client, pubsub))
            listener = Listener(tenant_id)
            self._listeners.add(listener)
            return listener

    def forget(self, listener: Listener) -> None:
        listener.ended = True
        self._listeners.discard(listener)

    async def _read(self, client: redis.asyncio.Redis, pubsub: redis.asyncio.client.PubSub) -> None:
        failure: BaseException | None = None
        try:
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=POLL_SECONDS
                )
                if message is not None:
                    self._dispatch(message["data"])
                elif not self._listeners:
                    break  # nobody listens: the connection goes back until a stream opens
        except (redis.RedisError, OSError) as exc:
            failure = exc
            log.warning(
                "live status streams: the Redis subscription broke (%s); open streams end", exc
            )
        finally:
            # No await before this: a stream that registers from now on subscribes anew.
            self._subscribed = None
            if failure is not None:
                ended, self._listeners = self._listeners, set()
                for listener in ended:
                    listener.end()
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()
                await client.aclose()

    def _dispatch(self, data: bytes) -> None:
        try:
            change = json.loads(data)
            tenant_id = change["tenant_id"]
        except (ValueError, TypeError, KeyError):
            log.warning("live status streams: a change that is no JSON object was skipped")
            return
        for listener in list(self._listeners):
            if listener.tenant_id == tenant_id:
                listener.offer(dict(change))


class LeasedStream(StreamingResponse):
    """Server-sent events that give back what they hold (a stream slot, the feed's listener)
    when the response ends, however it ends: finished, cancelled or the client gone."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type=self.media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # no await: it runs even in a cancelled scope


# A tenant's snapshot: the list ``GET /status/email-servers`` answers.
Snapshot = Callable[[str], list[dict[str, Any]]]


class LiveStreams:
    """The open streams of one process: their slots and their shared feed."""

    def __init__(self, feed: ChangeFeed, slots: TenantSlots) -> None:
        self.feed = feed
        self.slots = slots

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveStreams:
        slots = TenantSlots(
            "live status streams",
            total=settings.status_streams,
            per_tenant=settings.status_streams_per_tenant,
        )
        return cls(ChangeFeed(settings.redis_url), slots)

    async def open(self, tenant_id: str, request: Request, snapshot: Snapshot) -> LeasedStream:
        """A stream of ``tenant_id``'s changes; 429 when no slot is free, 503 without Redis."""
        try:
            slot = self.slots.take(tenant_id)
        except NoSlot as refusal:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=refusal.reason,
                headers={"Retry-After": str(STREAM_RETRY_AFTER_SECONDS)},
            ) from None
        try:
            # Subscribed before the snapshot is read: no change falls between the two.
            listener = await self.feed.listen(tenant_id)
        except (redis.RedisError, OSError) as exc:
            slot.release()
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"live status is unavailable: Redis cannot be reached ({exc})",
                headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)},
            ) from None

        def close() -> None:
            self.feed.forget(listener)
            slot.release()

        return LeasedStream(_events(listener, request, snapshot), on_close=close)


async def _events(listener: Listener, request: Request, snapshot: Snapshot) -> AsyncIterator[str]:
    items = await asyncio.to_thread(snapshot, listener.tenant_id)
    yield _event("snapshot", {"items": items})
    quiet = 0.0
    while not await request.is_disconnected():
        try:
            change = await asyncio.wait_for(listener.changes.get(), DISCONNECT_CHECK_SECONDS)
        except TimeoutError:
            quiet += DISCONNECT_CHECK_SECONDS
            if quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            continue
        if change is None:
            return  # fell behind, or the subscription broke: the client reconnects
        quiet = 0.0
        kind = "removed" if change.pop("removed", False) else "state"
        yield _event(kind, change)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _problem(description: str, *, retry: bool = False) -> dict[str, Any]:
    """A JSON error answer of the stream's route (whose own media type is the event stream)."""
    doc: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": Problem.model_json_schema()}},
    }
    if retry:
        doc["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "integer"},
            }
        }
    return doc


# One server-sent event as it arrives: its kind and its JSON text.
_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["snapshot", "state", "removed"]},
        "data": {"type": "string", "description": "JSON: the list (snapshot) or one change."},
    },
    "required": ["event", "data"],
}

STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: one `snapshot`, then `state` and `removed` events "
        "of the tenant's servers; a comment line every 15 s while nothing happens.",
        "content": {"text/event-stream": {"schema": _EVENT}},
    },
    401: {
        **_problem(AUTH_RESPONSES[401]["description"]),
        "headers": AUTH_RESPONSES[401]["headers"],
    },
    403: _problem(AUTH_RESPONSES[403]["description"]),
    429: _problem(
        "Too many live streams are open: the tenant's own limit "
        "(MAILROOM_STATUS_STREAMS_PER_TENANT) or the process's (MAILROOM_STATUS_STREAMS).",
        retry=True,
    ),
    503: _problem("Redis, which carries the changes, is unavailable.", retry=True),
}
