"""The config API application: admins manage their company's mail servers (CONTRACT.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI

from services.config_api.email_server_service import EmailServerService
from services.config_api.errors import install_handlers
from services.config_api.oauth_consent import OAuthConsents
from services.config_api.outbox_relay import OutboxRelay
from services.config_api.routers import email_servers, oauth, routing_plans, template_server
from services.config_api.routing_plan_service import RoutingPlanService
from shared.db.pool import make_pool
from shared.http_ops import ops_router
from shared.oauth.health import OAuthHealth
from shared.oauth.tokens import OAuthTokens
from shared.probe import ConnectionProbe, Probe
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.tenant_slots import TenantSlots

API_PREFIX = "/api/v1"


def create_app(
    settings: Settings, *, probe: Probe | None = None, run_relay: bool = True
) -> FastAPI:
    """The app; ``probe`` and ``run_relay`` exist so tests can choose what runs in-process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = make_pool(settings)
        app.state.pool = pool
        secret_box = SecretBox.from_settings(settings)
        tokens = OAuthTokens.from_settings(settings, pool, secret_box)
        consents = OAuthConsents(
            pool, secret_box, tokens, consent_seconds=settings.oauth_consent_seconds
        )
        app.state.email_servers = EmailServerService(
            pool=pool,
            secret_box=secret_box,
            probe=probe or ConnectionProbe.from_settings(settings),
            consents=consents,
            oauth_health=OAuthHealth(pool, tokens.providers, settings.oauth_warning_days),
            probe_slots=TenantSlots(
                "connection tests",
                total=settings.probe_concurrency,
                per_tenant=settings.probe_concurrency_per_tenant,
            ),
            probe_seconds=settings.probe_timeout_seconds,
        )
        app.state.routing_plans = RoutingPlanService(pool)
        relay = OutboxRelay(settings.database_url, settings.amqp_url, settings.outbox_poll_seconds)
        app.state.relay = relay
        if run_relay:
            relay.start()
        try:
            yield
        finally:
            relay.stop()
            pool.close()

    app = FastAPI(
        title="Mailroom config API",
        version="1",
        description="Company admins manage the mail servers of the contact center's email "
        "channel. Every change reaches the workers as an event on `mailroom.config`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_handlers(app)
    routers = (email_servers.router, template_server.router, routing_plans.router, oauth.router)
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)

    def ready() -> str | None:
        if run_relay and not app.state.relay.alive:
            return "outbox relay is not running: config events would not be published"
        try:
            with app.state.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, AttributeError) as exc:
            return f"database: {exc}"
        return None

    app.include_router(ops_router(ready))
    return app
