"""What the config API's routes ask FastAPI for: the caller, the service, the pool."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from services.config_api.email_server_service import EmailServerService
from shared.db.pool import DictConnection
from shared.http_auth import require
from shared.tokens import MANAGE, READ, Principal

Reader = Annotated[Principal, Depends(require(READ))]
Manager = Annotated[Principal, Depends(require(MANAGE))]


def _email_servers(request: Request) -> EmailServerService:
    svc: EmailServerService = request.app.state.email_servers
    return svc


def _pool(request: Request) -> ConnectionPool[DictConnection]:
    db: ConnectionPool[DictConnection] = request.app.state.pool
    return db


EmailServers = Annotated[EmailServerService, Depends(_email_servers)]
Pool = Annotated[ConnectionPool[DictConnection], Depends(_pool)]
