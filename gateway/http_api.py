"""HTTP routes: ``POST /generate`` (one NPC turn, or a batch), ``GET /health``, ``GET /metrics``,
``GET /v1/personas``."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from typing import Any

from aiohttp import web

from npcbus import metrics
from npcbus.messages import FinalResponse, TokenDelta
from npcbus.npc import NPCRequestError, load_personas, validate_request

from .core import Gateway, GatewayError
from .keys import CLIENT_KEY, GATEWAY

GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
REQUEST_KEYS = {"persona", "persona_id", "context", "state", "history", "player", "player_input", "audience",
                "adapter", "safe_mode", "generation", "timeout_ms", *GENERATION_KEYS}


async def read_json(request: web.Request) -> Any:
    """The body as JSON, whatever the content type says (curl -d sends form-encoded headers)."""
    body = await request.read()  # bounded by MAX_REQUEST_BYTES (client_max_size): 413 beyond
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise GatewayError("bad_json", f"the request body is not valid JSON: {e}", status=400) from None


def npc_request_from(gw: Gateway, item: Any, where: str = "") -> tuple[dict, str | None, int | None, float | None]:
    """An NPC request (validated) from a /generate body: (npc request, adapter, version, timeout_s)."""
    if not isinstance(item, dict):
        raise GatewayError("invalid_request", f"{where or 'the body'} must be a JSON object", status=400)
    unknown = sorted(set(item) - REQUEST_KEYS)
    if unknown:
        raise GatewayError("invalid_request", f"{where}{unknown[0]}: is not a known field", status=400,
                           param=f"{where}{unknown[0]}")
    npc = {k: copy.deepcopy(item[k]) for k in ("persona", "persona_id", "context", "history", "player",
                                                "player_input", "audience", "safe_mode") if k in item}
    generation = dict(item.get("generation") or {}) if isinstance(item.get("generation", {}), dict) else item["generation"]
    if isinstance(generation, dict):
        generation.update({k: item[k] for k in GENERATION_KEYS if k in item})
    if generation:
        npc["generation"] = generation
    state = item.get("state")
    if state is not None:
        if not isinstance(state, dict):
            raise GatewayError("invalid_request", f"{where}state: must be an object of facts", status=400,
                               param=f"{where}state")
        ctx = npc.setdefault("context", {})
        if not isinstance(ctx, dict):
            raise GatewayError("invalid_request", f"{where}context: must be an object", status=400,
                               param=f"{where}context")
        ctx["world_state"] = {**(ctx.get("world_state") or {}), **state}
    personas = None
    if "persona" not in npc:
        with contextlib.suppress(OSError, ValueError):
            personas = load_personas()
    try:
        req = validate_request(npc, personas=personas or {})
    except NPCRequestError as e:
        raise GatewayError("invalid_request", f"{where}{e.field}: {e.reason}", status=400,
                           param=f"{where}{e.field}") from None
    if "adapter" in item:
        adapter, version = gw.adapters.resolve(item["adapter"]) if item["adapter"] is not None else (None, None)
    else:
        adapter, version = gw.adapters.default_for_persona(req["persona"]["id"]), None
    req["adapter"] = adapter
    timeout_ms = item.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 100):
        raise GatewayError("invalid_request", f"{where}timeout_ms: must be an integer >= 100", status=400,
                           param=f"{where}timeout_ms")
    return dict(req), adapter, version, (timeout_ms / 1000 if timeout_ms else None)


async def run_npc(gw: Gateway, npc: dict, adapter: str | None, version: int | None, timeout_s: float | None,
                  api: str) -> dict:
    req = gw.new_request(mode="npc", npc=npc, adapter=adapter, adapter_version=version)
    t0 = time.perf_counter()
    first = None
    final: FinalResponse | None = None
    async with contextlib.aclosing(gw.generate(req, timeout_s=gw.timeout_for(timeout_s), api=api)) as stream:
        async for ev in stream:
            if isinstance(ev, TokenDelta) and ev.text and first is None:
                first = time.perf_counter()
            elif isinstance(ev, FinalResponse):
                final = ev
    if final is None or not isinstance(final.response, dict):
        raise GatewayError("bad_response", "the inference consumer sent no structured response", status=502,
                           retryable=True, retry_after_s=0.5)
    end = time.perf_counter()
    gw.publish_experience(npc=npc, final=final, player_id=npc.get("player", {}).get("id", ""))
    return {
        "id": req.request_id, "object": "npc.response", "response": final.response, "text": final.text,
        "valid": bool(final.valid), "adapter": final.adapter, "adapter_version": final.adapter_version,
        "finish_reason": final.finish_reason, "usage": final.usage,
        "timings": {"ttft_ms": None if first is None else round((first - t0) * 1000, 3),
                    "total_ms": round((end - t0) * 1000, 3), "engine": final.timings or {}},
    }


def item_error(e: GatewayError) -> dict:
    return {"error": {"message": e.message, "code": e.code, "param": e.param or e.field, "retryable": e.retryable,
                      "status": e.status}}


async def generate(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body = await read_json(request)
    if isinstance(body, dict) and "requests" in body:
        items = body["requests"]
        extra = sorted(set(body) - {"requests"})
        if extra:
            raise GatewayError("invalid_request", f"{extra[0]}: is not a known field beside requests (put settings "
                               "in each request)", status=400, param=extra[0])
        if not isinstance(items, list) or not items:
            raise GatewayError("invalid_request", "requests: must be a non-empty list", status=400, param="requests")
        if len(items) > gw.settings.max_batch:
            raise GatewayError("invalid_request", f"requests: at most {gw.settings.max_batch} per batch (MAX_BATCH)",
                               status=400, param="requests")
        if len(items) > 1:
            gw.rate_check(request[CLIENT_KEY], len(items) - 1)  # the middleware took one
        parsed: list[Any] = []
        for i, item in enumerate(items):
            try:
                parsed.append(npc_request_from(gw, item, f"requests[{i}]."))
            except GatewayError as e:
                parsed.append(e)
        todo = [p for p in parsed if not isinstance(p, GatewayError)]
        with gw.slot(len(todo)) if todo else contextlib.nullcontext():
            results = await asyncio.gather(*(run_npc(gw, *p, api="generate") for p in todo), return_exceptions=True)
        it = iter(results)
        out = []
        for p in parsed:
            r = p if isinstance(p, GatewayError) else next(it)
            if isinstance(r, GatewayError):
                out.append(item_error(r))
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append(r)
        return web.json_response({"object": "list", "results": out})
    npc, adapter, version, timeout_s = npc_request_from(gw, body)
    with gw.slot():
        result = await run_npc(gw, npc, adapter, version, timeout_s, api="generate")
    return web.json_response(result)


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    bus = gw.bus
    connected = bool(bus is not None and bus.connected)
    now = time.monotonic()
    live = gw.live_consumers()
    recent = gw.consumer_recent()
    store = await gw.store.health() if gw.store is not None else {"kind": "none", "ok": False}
    status = "ok" if connected and recent and store["ok"] else ("degraded" if connected else "down")
    body = {
        "status": status,
        "broker": {"connected": connected, "reconnects": bus.reconnects if bus is not None else 0},
        "consumers": {
            "recent": recent,
            "live": len(live),
            "last_answer_s": None if gw.last_answer is None else round(now - gw.last_answer, 3),
            "workers": [{"worker_id": c.heartbeat.worker_id, "engine": c.heartbeat.engine,
                         "base_model": c.heartbeat.base_model, "capacity": c.heartbeat.capacity,
                         "running": c.heartbeat.running, "last_seen_s": round(now - c.seen, 3)} for c in live],
        },
        "model": gw.model_id,
        "sessions": len(gw.connections),
        "session_store": store,
        "in_flight": gw.cap.in_flight,
        "uptime_s": round(now - gw.started, 3),
    }
    return web.json_response(body, status=200 if connected else 503)


async def metrics_page(_request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def personas(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        catalog = load_personas()
    except (OSError, ValueError):
        catalog = {}
    data = [{"id": pid, **{k: p.get(k) for k in ("name", "description", "traits", "speaking_style",
                                                  "allowed_actions", "allowed_emotions", "known_entities") if k in p},
             "adapter": gw.adapters.default_for_persona(pid) if gw.adapters is not None else None}
            for pid, p in catalog.items()]
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/v1/personas", personas)
