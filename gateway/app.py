"""`npcbus gateway`: the aiohttp server in front of the bus.

Routes (every one but ``/health`` and the playground's static files needs
``Authorization: Bearer API_TOKEN`` by default):

=================================  ===============================================================
``GET  /v1/ws``                    WebSocket NPC chat (docs/websocket-protocol.md)
``POST /generate``                 one NPC turn, or a batch with ``requests: [...]``
``POST /v1/chat/completions``      OpenAI-compatible chat completions (``stream`` as SSE)
``POST /v1/completions``           OpenAI-compatible text completions
``GET  /v1/models``                the base model and the adapters (``model`` selects one)
``GET  /v1/personas``              the shipped NPC personas
``GET  /health``                   broker connection, recent inference consumers, session store (open)
``GET  /metrics``                  Prometheus metrics
``GET  /``                         the web playground (static files, open)
=================================  ===============================================================

``create_app(settings, bus=None)`` builds the application; without a bus it connects its own in a
cleanup context. Either way it declares the exchanges it publishes to, listens to consumer
heartbeats and sweeps detached sessions in background tasks tied to the app's lifetime. WebSocket
sessions live in the session store that ``SESSION_STORE_URL`` names (this process's memory by
default; Redis to let any gateway of the namespace resume them: :mod:`gateway.sessions`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from aiohttp import web

from npcbus.bus import Bus
from npcbus.logs import get_logger
from npcbus.service import add_print_settings
from npcbus.settings import BusSettings, ModelSettings

from . import http_api, openai_api, ws
from .auth import TokenChecker, auth_middleware, cors_middleware, error_middleware
from .core import Gateway
from .keys import GATEWAY, SETTINGS
from .models import ModelCatalog
from .sessions import make_store
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app", "add_arguments", "run", "GATEWAY", "SETTINGS"]

log = get_logger("npcbus.gateway")

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def _bus_ctx(app: web.Application):
    gw = app[GATEWAY]
    own = gw.bus is None
    if own:
        gw.bus = Bus(BusSettings.from_env(), name="gateway")
        await gw.bus.connect()
    bus = gw.bus
    await bus.declare_topology(queues=[bus.topology.experience_queue] if gw.settings.publish_experience else [])
    await bus.reply_queue()  # declare and consume it now, not on the first request
    events = await bus.consume(bus.topology.listener_queue("events", bus.client_id, bus.topology.events_exchange),
                               gw.on_event, no_ack=True, exclusive=True, prefetch=100)
    log.info("gateway on the bus", namespace=bus.settings.namespace, model=gw.model_id, client_id=bus.client_id)
    try:
        yield
    finally:
        await ws.close_all(gw)
        await events.cancel()
        await gw.drain_background(timeout=3.0)
        if own:
            await bus.close()
            gw.bus = None


async def _store_ctx(app: web.Application):
    """The session store: checked at start (a store that is down is reported, not fatal: /health
    shows it and session.start answers a retryable error), closed after every socket is gone."""
    store = app[GATEWAY].store
    state = await store.health()
    if state.get("ok"):
        log.info("session store", **state)
    else:
        log.warning("session store unreachable at start; sessions cannot start until it is back", **state)
    try:
        yield
    finally:
        await store.close()


async def _sweeper_ctx(app: web.Application):
    task = asyncio.get_running_loop().create_task(ws.sweep_sessions(app[GATEWAY]))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _on_shutdown(app: web.Application) -> None:
    await ws.close_all(app[GATEWAY])


PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def _index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


def create_app(settings: GatewaySettings | None = None, bus: Bus | None = None, *,
               model: ModelSettings | None = None, manifest_path: str | None = None) -> web.Application:
    """The gateway application. ``bus``: a connected bus to use (else the app connects its own)."""
    settings = settings or GatewaySettings.from_env()
    model = model or ModelSettings.from_env()
    gw = Gateway(settings=settings, model=model, bus=bus)
    gw.adapters = ModelCatalog(gw.model_id, gw.base_model, manifest_path)
    namespace = bus.settings.namespace if bus is not None else BusSettings.from_env().namespace
    gw.store = make_store(settings, namespace)
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[cors_middleware, error_middleware, auth_middleware(TokenChecker(settings.api_tokens))],
    )
    app[GATEWAY] = gw
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_bus_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/v1/ws", ws.ws_handler)
    http_api.add_routes(app)
    openai_api.add_routes(app)
    if settings.playground:
        app.router.add_get("/", _index)
        app.router.add_get("/playground", _index)
        app.router.add_static("/static/", STATIC_DIR, show_index=False, append_version=False)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="listen port (GATEWAY_PORT)")
    add_print_settings(parser)


def run(args) -> int:
    from npcbus.service import prepare

    bus_settings = BusSettings.from_env()
    overrides = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    settings = GatewaySettings.from_env(**overrides)
    if not prepare(args, bus_settings, gateway=settings):
        return 0
    log.info("gateway starting", **{k: v for k, v in settings.redacted().items()})
    app = create_app(settings)
    web.run_app(app, host=settings.host, port=settings.port, handler_cancellation=True, print=None,
                access_log=None, shutdown_timeout=10.0)
    return 0
