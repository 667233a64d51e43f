"""The one way a service opens Redis: a bounded pool in which a thread waits for its turn.

redis-py's default pool (``Redis.from_url``) holds at most 100 connections and *fails* a call
with ``MaxConnectionsError`` when all are in use. The fetcher runs one thread per mailbox, and
they all take their leases at start and give them back at stop: with hundreds of mailboxes
such a burst would fail calls. A blocking pool makes such a burst
queue for a few connections instead (a lease call takes well under a millisecond). The
timeouts keep a Redis that hangs from holding a thread for long: a lease renewal that waits
for both still comes well before the lease runs out (``MAILROOM_MAILBOX_LEASE_SECONDS``,
renewed every third of it).

Used by everything that talks to Redis from threads: the fetcher's leases and OAuth2 refresh
locks, the sender's rate limit, the status store. (The status API's stream uses redis-py's
asyncio client; the preflight check one short-lived connection.)
"""

from __future__ import annotations

import redis

POOL_CONNECTIONS = 16
WAIT_FOR_CONNECTION_SECONDS = 4.0
SOCKET_TIMEOUT_SECONDS = 5.0


def redis_client(url: str, max_connections: int = POOL_CONNECTIONS) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=WAIT_FOR_CONNECTION_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)
