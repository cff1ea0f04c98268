"""Helpers of the gateway tests: a running gateway on a test namespace, WebSocket helpers that check
every server message against the protocol schema, and a scripted stand-in for the inference
consumer (on the real broker) for protocol tests. The end-to-end tests use real consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import aio_pika
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.protocol import validator
from gateway.settings import GatewaySettings
from npcbus.bus import Ack, Bus, Delivery
from npcbus.messages import (
    Cancel,
    ConsumerHeartbeat,
    FinalResponse,
    GenerationError,
    GenerationRequest,
    Message,
    TokenDelta,
)
from npcbus.settings import BusSettings, ModelSettings

TOKEN = "test-token-1"
OTHER_TOKEN = "test-token-2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = ModelSettings.from_env({})

PERSONA = {
    "id": "ferryman",
    "name": "Old Bram",
    "description": "Keeps the ferry across the Grey River and knows every boat on it.",
    "traits": ["patient"],
    "allowed_actions": ["give_ride", "refuse_service"],
}
START = {"type": "session.start", "persona": PERSONA, "player": {"id": "p-1", "name": "Ayla"}, "audience": "general",
         "context": {"location": "the ferry landing", "time_of_day": "dawn"}}

SERVER_MESSAGE = validator("server_message")


def check_server_message(ev: dict) -> dict:
    errors = sorted(SERVER_MESSAGE.iter_errors(ev), key=lambda e: e.path)
    assert not errors, f"server message does not match the protocol schema: {ev}\n{errors[0].message}"
    return ev


def gateway_settings(**env) -> GatewaySettings:
    base = {"API_TOKEN": f"{TOKEN},{OTHER_TOKEN}", "RATE_LIMIT_RPS": "0", "REQUEST_TIMEOUT_S": "10",
            "WS_HEARTBEAT_S": "5", "LOG_LEVEL": "warning"}
    base.update({k: str(v) for k, v in env.items()})
    return GatewaySettings.from_env(base)


async def cleanup_namespace(settings: BusSettings, extra_queues=()) -> None:
    """Delete a namespace's exchanges and the queues these tests declare (no rabbitmqctl needed)."""
    from npcbus.topology import Topology

    topo = Topology(settings.namespace)
    queues = [topo.gen_queue(MODEL.model_id).name, topo.experience_queue.name, *extra_queues]
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        for q in queues:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(q)
            if not ch.is_closed:
                await ch.close()
        for ex in topo.exchanges():
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.exchange_delete(ex.name)
            if not ch.is_closed:
                await ch.close()
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_gateway(bus: Bus | None, settings: GatewaySettings | None = None, *, manifest_path: str | None = None):
    app = create_app(settings or gateway_settings(), bus=bus, model=MODEL, manifest_path=manifest_path)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


class WS:
    """A protocol client over aiohttp's WebSocket client; every received message is schema-checked."""

    def __init__(self, ws):
        self.ws = ws
        self.received: list[dict] = []

    @classmethod
    async def connect(cls, client: TestClient, headers=None, **kw) -> WS:
        ws = await client.ws_connect("/v1/ws", headers=AUTH if headers is None else headers, **kw)
        return cls(ws)

    async def send(self, obj) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self, timeout: float = 10.0) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type!r} (close code {self.ws.close_code})")
        ev = check_server_message(json.loads(msg.data))
        self.received.append(ev)
        return ev

    async def expect(self, type_: str, timeout: float = 10.0, **match) -> dict:
        """Read until a message of ``type_`` (matching ``match``); fail on anything else unexpected."""
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.recv(max(0.05, deadline - time.monotonic()))
            if ev["type"] == type_ and all(ev.get(k) == v for k, v in match.items()):
                return ev
            if ev["type"] in ("error",) and type_ != "error":
                raise AssertionError(f"unexpected error while waiting for {type_}: {ev}")

    async def closed(self, timeout: float = 10.0) -> int:
        """Wait for the server to close the socket; returns the close code."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type == WSMsgType.TEXT:
                self.received.append(check_server_message(json.loads(msg.data)))
            elif msg.type == WSMsgType.ERROR:
                return self.ws.close_code

    async def start(self, **over) -> dict:
        await self.send({**START, **over})
        return await self.expect("session.started")

    async def turn(self, turn_id: str, text: str, **extra) -> tuple[list[dict], dict]:
        """Send a turn and read its events up to the terminal one: (deltas, terminal event)."""
        await self.send({"type": "turn", "turn_id": turn_id, "text": text, **extra})
        deltas = []
        while True:
            ev = await self.recv()
            if ev.get("turn_id") != turn_id:
                continue
            if ev["type"] == "turn.delta":
                deltas.append(ev)
            elif ev["type"] in ("turn.final", "turn.error", "turn.cancelled") or ev["type"] == "error":
                return deltas, ev

    async def close(self) -> None:
        await self.ws.close()


def npc_response(text: str) -> dict:
    return {"dialogue": text, "emotion": "neutral", "intent": "greet", "actions": [], "relationship_change": 0,
            "end_conversation": False}


@dataclass
class FakeConsumer:
    """A scripted inference consumer on the real broker, for protocol tests.

    Behaviour by the player's text: ``slow`` streams a delta every 0.1 s for 20 s unless
    cancelled; ``fail`` answers a retryable generation_error, ``midfail`` one delta and then the
    error; ``silent`` never answers; anything else streams two deltas and a final response.
    """

    settings: BusSettings
    model_id: str = MODEL.model_id
    requests: list[tuple[GenerationRequest, Delivery]] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    cancelled: dict[str, asyncio.Event] = field(default_factory=dict)
    heartbeat_every: float = 0.0
    bus: Bus | None = None
    _tasks: set = field(default_factory=set)

    async def start(self) -> FakeConsumer:
        self.bus = Bus(self.settings, name="fake-consumer")
        await self.bus.connect()
        topo = self.bus.topology
        await self.bus.declare_topology(queues=[])
        await self.bus.consume(topo.listener_queue("cancel", self.bus.client_id, topo.cancel_exchange),
                               self._on_cancel, no_ack=True, exclusive=True)
        await self.bus.consume(topo.gen_queue(self.model_id), self._on_request, prefetch=50)
        if self.heartbeat_every:
            self._spawn(self._heartbeats())
        return self

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.bus is not None:
            await self.bus.close()

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _heartbeats(self) -> None:
        while True:
            hb = ConsumerHeartbeat(worker_id="fake-1", base_model=self.model_id, engine="fake", capacity=8, running=0,
                                   adapters={"fake-adapter": 1})
            with contextlib.suppress(Exception):
                await self.bus.publish(self.bus.topology.events_exchange, "", hb, persistent=False, mandatory=False)
            await asyncio.sleep(self.heartbeat_every)

    async def _on_cancel(self, msg: Message, _d: Delivery) -> None:
        if isinstance(msg, Cancel):
            self.cancels.append(msg)
            self.cancelled.setdefault(msg.request_id, asyncio.Event()).set()

    async def _on_request(self, msg: Message, d: Delivery):
        assert isinstance(msg, GenerationRequest)
        self.requests.append((msg, d))
        self.cancelled.setdefault(msg.request_id, asyncio.Event())
        self._spawn(self._answer(msg, d))
        return Ack()

    async def _send(self, d: Delivery, m: Message) -> None:
        with contextlib.suppress(Exception):
            await self.bus.reply(d, m, mandatory=False)

    async def _answer(self, msg: GenerationRequest, d: Delivery) -> None:
        rid = msg.request_id
        if msg.mode == "npc":
            text = msg.npc.get("player_input", "")
        elif msg.mode == "chat":
            text = msg.messages[-1]["content"] if msg.messages else ""
        else:
            text = msg.prompt
        if "silent" in text:
            return
        if "midfail" in text:
            await self._send(d, TokenDelta(rid, 0, "Well", 1))
            await self._send(d, GenerationError(rid, 1, "engine_error", "the engine failed", retryable=True))
            return
        if "fail" in text:
            await self._send(d, GenerationError(rid, 0, "engine_error", "the engine failed", retryable=True))
            return
        seq = 0
        if "slow" in text:
            for _ in range(200):
                if self.cancelled[rid].is_set():
                    return
                await self._send(d, TokenDelta(rid, seq, "la ", 1))
                seq += 1
                try:
                    await asyncio.wait_for(self.cancelled[rid].wait(), 0.1)
                    return
                except TimeoutError:
                    pass
        line = "Well met, friend."
        for part in ("Well met,", " friend."):
            await self._send(d, TokenDelta(rid, seq, part, 2))
            seq += 1
        version = 3 if msg.adapter else None
        await self._send(d, FinalResponse(rid, seq, text=json.dumps(npc_response(line)) if msg.mode == "npc" else line,
                                          response=npc_response(line) if msg.mode == "npc" else None,
                                          adapter=msg.adapter, adapter_version=version,
                                          usage={"prompt_tokens": 12, "completion_tokens": 5},
                                          timings={"engine_ms": 1.0}, worker_id="fake-1"))
