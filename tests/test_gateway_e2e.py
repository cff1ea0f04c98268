"""The gateway end to end: real RabbitMQ, real inference consumers (``npcbus worker infer``) on the
offline default model, the gateway in this process.

The consumers run the transformers engine by default (``GATEWAY_E2E_ENGINE`` picks another, e.g.
``vllm``); they start once per module. Aborts are checked at the engine: each consumer serves its
Prometheus metrics, and an aborted generation counts as ``outcome="cancelled"`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import aio_pika
import jsonschema
import pytest

from npcbus.bus import Bus
from npcbus.npc import load_schema
from npcbus.settings import BusSettings
from npcbus.topology import Topology

from .conftest import AMQP_URL, ROOT
from .gateway_util import AUTH, MODEL, START, TOKEN, WS, cleanup_namespace, gateway_settings, running_gateway

pytestmark = pytest.mark.broker

ENGINE = os.environ.get("GATEWAY_E2E_ENGINE", "hf")
CONSUMERS = 2
RESPONSE_SCHEMA = jsonschema.Draft202012Validator(load_schema("npc_response"))
NPC_START = {k: v for k, v in START.items() if k != "persona"} | {"persona_id": "innkeeper"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, namespace: str, model_dir: str):
        self.namespace = namespace
        self.bus_settings = BusSettings.from_env({"AMQP_URL": AMQP_URL, "NPCBUS_NAMESPACE": namespace})
        self.model_dir = model_dir
        self.procs: list[subprocess.Popen] = []
        self.metrics_ports: list[int] = []
        self.logs: list[str] = []

    def start(self, n: int) -> None:
        for i in range(n):
            port = _free_port()
            log = tempfile.NamedTemporaryFile(prefix=f"infer-{i}-", suffix=".log", delete=False)
            env = dict(os.environ, AMQP_URL=AMQP_URL, NPCBUS_NAMESPACE=self.namespace, ENGINE=ENGINE,
                       MODEL_DIR=self.model_dir, BASE_MODEL="", HEARTBEAT_INTERVAL_S="1", METRICS_PORT=str(port),
                       MAX_CONCURRENCY="4", WORKER_ID=f"e2e-{i}", LOG_LEVEL="info", HF_HUB_OFFLINE="1",
                       TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                       VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       ADAPTER_MANIFEST=os.path.join(tempfile.gettempdir(), f"{self.namespace}-adapters.json"))
            self.procs.append(subprocess.Popen([sys.executable, "-m", "npcbus.cli", "worker", "infer"], cwd=ROOT,
                                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            self.metrics_ports.append(port)
            self.logs.append(log.name)

    def log_tail(self, n: int = 40) -> str:
        out = []
        for path in self.logs:
            with open(path, errors="replace") as fh:
                out.append(f"--- {path}\n" + "".join(fh.readlines()[-n:]))
        return "\n".join(out)

    async def wait_ready(self, n: int, timeout: float = 240.0) -> None:
        """Wait until n consumers sent a heartbeat."""
        bus = Bus(self.bus_settings, name="e2e-probe")
        await bus.connect()
        seen: set[str] = set()
        done = asyncio.Event()

        async def on_event(msg, _d):
            wid = getattr(msg, "worker_id", None)
            if wid:
                seen.add(wid)
                if len(seen) >= n:
                    done.set()

        try:
            await bus.declare_topology(queues=[])
            topo = bus.topology
            await bus.consume(topo.listener_queue("events", bus.client_id, topo.events_exchange), on_event,
                              no_ack=True, exclusive=True)
            end = time.monotonic() + timeout
            while not done.is_set():
                if any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"an inference consumer exited early:\n{self.log_tail()}")
                if time.monotonic() > end:
                    raise RuntimeError(f"inference consumers not ready after {timeout} s:\n{self.log_tail()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)
        finally:
            await bus.close()

    def cancelled_at_engines(self) -> float:
        """Generations the consumers aborted on a cancel (their Prometheus counters, summed)."""
        total = 0.0
        for port in self.metrics_ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith("npcbus_infer_requests_total{") and 'outcome="cancelled"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for path in self.logs:
            with contextlib.suppress(OSError):
                os.unlink(path)


@pytest.fixture(scope="module")
def stack(model_dir):
    st = Stack(f"test-e2e-{uuid.uuid4().hex[:8]}", model_dir)
    st.start(CONSUMERS)
    try:
        asyncio.run(st.wait_ready(CONSUMERS))
        yield st
    finally:
        st.stop()
        asyncio.run(cleanup_namespace(st.bus_settings, [Topology(st.namespace).dead_queue.name]))


@pytest.fixture
async def gbus(stack):
    b = Bus(stack.bus_settings, name="e2e-gateway")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def gw(gbus):
    async with running_gateway(gbus, gateway_settings(REQUEST_TIMEOUT_S=120, PUBLISH_EXPERIENCE="true")) as client:
        end = time.monotonic() + 10
        while time.monotonic() < end:  # heartbeats come every second
            health = await (await client.get("/health")).json()
            if health["consumers"]["live"] >= CONSUMERS:
                break
            await asyncio.sleep(0.1)
        yield client


async def wait_until(cond, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await asyncio.to_thread(cond):
            return True
        await asyncio.sleep(0.2)
    return await asyncio.to_thread(cond)


GEN = {"max_new_tokens": 160, "temperature": 0.0}


async def test_websocket_chat_of_several_turns(gw, stack):
    health = await (await gw.get("/health")).json()
    assert health["status"] == "ok" and health["consumers"]["live"] == CONSUMERS, health
    ws = await WS.connect(gw)
    await ws.send({**NPC_START, "generation": GEN})
    started = await ws.expect("session.started")
    lines = ["Good evening! Do you have a room for the night?", "How much for a hot meal?",
             "Have you heard any rumors lately?"]
    finals = []
    for i, line in enumerate(lines):
        deltas, final = await ws.turn(f"turn-{i}", line)
        assert final["type"] == "turn.final", (final, stack.log_tail())
        assert not list(RESPONSE_SCHEMA.iter_errors(final["response"])), final["response"]
        assert "adapter" in final and "adapter_version" in final
        t = final["timings"]
        assert t["total_ms"] > 0 and (t["ttft_ms"] is None or t["ttft_ms"] <= t["total_ms"])
        assert final["usage"]["completion_tokens"] > 0
        if final["valid"] and final["finish_reason"] == "stop":
            assert deltas, final  # the spoken line streamed before the final response
        finals.append(final)
    assert len({f["request_id"] for f in finals}) == 3
    # each finished turn went out as experience, with the session and the response; the module's other
    # tests share the stack's namespace and may have left experience of their own in the queue (HTTP
    # generations, with no session): only this session's turns count, found by their request ids
    order = [f["request_id"] for f in finals]
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        q = await ch.get_queue(Topology(stack.namespace).experience_queue.name)
        got = []
        end = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < end:
            m = await q.get(no_ack=True, fail=False)
            if m is None:
                await asyncio.sleep(0.1)
                continue
            from npcbus.codec import decode

            exp = decode(m.body)
            if exp.request_id in order:
                got.append(exp)
    finally:
        await conn.close()
    got.sort(key=lambda e: order.index(e.request_id))
    assert len(got) == 3 and {e.session_id for e in got} == {started["session_id"]}
    assert got[2].npc["history"][0] == {"role": "player", "text": lines[0]}
    assert got[2].response == finals[2]["response"]


async def _long_turn(ws: WS, turn_id: str) -> dict:
    await ws.send({"type": "turn", "turn_id": turn_id, "text": "Tell me the whole history of this town, please.",
                   "generation": {"max_new_tokens": 1024, "temperature": 1.0, "seed": 7}})
    accepted = await ws.expect("turn.accepted", turn_id=turn_id)
    await ws.expect("turn.delta", turn_id=turn_id, timeout=60)
    return accepted


async def test_cancel_aborts_the_generation_at_the_engine(gw, stack):
    before = await asyncio.to_thread(stack.cancelled_at_engines)
    ws = await WS.connect(gw)
    await ws.send({**NPC_START, "generation": GEN})
    await ws.expect("session.started")
    await _long_turn(ws, "long-1")
    await ws.send({"type": "turn.cancel", "turn_id": "long-1"})
    await ws.expect("turn.cancelled", turn_id="long-1")
    assert await wait_until(lambda: stack.cancelled_at_engines() >= before + 1), stack.log_tail()
    _, final = await ws.turn("after", "Thank you.")  # the session goes on
    assert final["type"] == "turn.final"


async def test_disconnect_aborts_the_generation_at_the_engine(gw, stack):
    before = await asyncio.to_thread(stack.cancelled_at_engines)
    ws = await WS.connect(gw)
    await ws.send({**NPC_START, "generation": GEN})
    await ws.expect("session.started")
    await _long_turn(ws, "long-2")
    await ws.close()
    assert await wait_until(lambda: stack.cancelled_at_engines() >= before + 1), stack.log_tail()


async def test_no_consumer_gets_an_error_within_the_deadline(model_dir):
    """A namespace whose generation queue exists but no consumer serves it, and one without a queue."""
    settings = BusSettings.from_env({"AMQP_URL": AMQP_URL, "NPCBUS_NAMESPACE": f"test-{uuid.uuid4().hex[:10]}"})
    bus = Bus(settings, name="e2e-lonely")
    await bus.connect()
    try:
        async with running_gateway(bus, gateway_settings(REQUEST_TIMEOUT_S=30)) as client:
            ws = await WS.connect(client)
            await ws.start()
            t0 = time.monotonic()
            _, err = await ws.turn("n1", "Hello?")
            assert err["type"] == "turn.error" and err["code"] == "no_consumer" and err["retryable"]
            assert time.monotonic() - t0 < 2
            await bus.declare_queue(bus.topology.gen_queue(MODEL.model_id))  # consumers existed once
            t0 = time.monotonic()
            _, err = await ws.turn("n2", "Hello?", timeout_ms=1500)
            took = time.monotonic() - t0
            assert err["type"] == "turn.error" and err["code"] == "timeout" and err["retryable"]
            assert 1.4 <= took < 3.0
            r = await client.post("/generate", json={"persona_id": "guard", "player_input": "Hi", "timeout_ms": 1000},
                                  headers=AUTH)
            assert r.status == 504 and (await r.json())["error"]["code"] == "timeout"
    finally:
        await bus.close()
        await cleanup_namespace(settings)


async def test_http_generate(gw):
    r = await gw.post("/generate", json={"persona_id": "blacksmith", "player_input": "Can you fix my sword?",
                                         "state": {"forge_lit": True}, "max_new_tokens": 160, "temperature": 0},
                      headers=AUTH)
    assert r.status == 200, await r.text()
    out = await r.json()
    assert not list(RESPONSE_SCHEMA.iter_errors(out["response"]))
    r = await gw.post("/generate", json={"requests": [
        {"persona_id": "guard", "player_input": "Open the gate.", "max_new_tokens": 120, "temperature": 0},
        {"persona_id": "bard", "player_input": "Sing me a song!", "max_new_tokens": 120, "temperature": 0}]},
        headers=AUTH)
    assert r.status == 200
    results = (await r.json())["results"]
    assert len(results) == 2 and all("response" in x for x in results), results


async def test_official_openai_client(gw):
    import openai

    client = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=TOKEN, max_retries=0, timeout=120)
    models = await client.models.list()
    assert MODEL.model_id in [m.id for m in models.data]
    done = await client.chat.completions.create(
        model=MODEL.model_id, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "You are a friendly innkeeper."},
                  {"role": "user", "content": "Hello there!"}])
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str) and done.usage.completion_tokens > 0
    pieces = []
    finish = None
    stream = await client.chat.completions.create(
        model=MODEL.model_id, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me about the village."}])
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("stop", "length") and "".join(pieces)
    text = await client.completions.create(model=MODEL.model_id, prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text is not None
    bad = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    await bad.close()


def test_cli_runs_the_gateway(stack):
    """`npcbus gateway` as a process: health answers, a token is required, it stops on SIGTERM."""
    port = _free_port()
    env = dict(os.environ, AMQP_URL=AMQP_URL, NPCBUS_NAMESPACE=stack.namespace, API_TOKEN=TOKEN,
               GATEWAY_PORT=str(port), LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "npcbus.cli", "gateway"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = None
        for _ in range(150):
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read())
                if body["consumers"]["live"] >= CONSUMERS:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert body and body["broker"]["connected"] and body["consumers"]["live"] == CONSUMERS, body
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert ei.value.code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read().decode(errors="replace")[-3000:]
