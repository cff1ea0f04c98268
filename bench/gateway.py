"""Gateway benchmarks: the overhead of a WebSocket turn, and capacity under many sessions.

    python -m bench.gateway [--quick] [--sessions N] [--seconds S] [--think-ms MS]

Everything runs for real on this machine: the RabbitMQ at ``AMQP_URL``, one inference consumer
(``npcbus worker infer``) with the benchmark-only engine that answers at once
(``ENGINE=bench.instant_engine:InstantEngine``), and the gateway as its own process
(``npcbus gateway``). The clients run in this process.

1. ``gateway.ws_overhead_p50_ms``: a turn's round trip over the WebSocket, through the gateway and
   the bus to the consumer and back (``turn`` -> ``turn.final``), against the bare bus round trip
   of the same NPC generation request to the same consumer (``Bus.request_stream`` from this
   process, as the foundation benchmark measures a bus round trip), interleaved in the same run.
   Both carry the same growing conversation history. Goal: p50 at most 2 ms above the bare p50.
2. Capacity: N sessions (1,000; ``--quick``: 50) held open for S seconds (60; ``--quick``: 8), each
   sending turns one after another with a think time between them (``--think-ms``, default 1000).
   Figures: turns/s, p50 and p99 turn latency (against the unloaded WebSocket p50), errors (goal:
   none) and the gateway process's resident memory before the sessions and after S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from bench.common import percentile
from npcbus.bus import Bus
from npcbus.messages import FinalResponse, GenerationRequest
from npcbus.settings import BusSettings, ModelSettings

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-" + uuid.uuid4().hex
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# the instant engine loads no model: a base model name that is only a routing id keeps the consumer
# from building the offline default model
BASE_MODEL = "bench-instant"
MODEL = ModelSettings.from_env({"BASE_MODEL": BASE_MODEL})
PERSONA_ID = "innkeeper"
PLAYER = {"id": "bench", "name": "Ayla"}
CONTEXT = {"location": "the Sleepy Lantern inn", "time_of_day": "evening"}
LINES = ["Good evening! Any rooms left?", "How much for a hot meal?", "Heard any rumors lately?",
         "Who owns the mill by the river?", "Thanks, good night."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(name: str, value: float | None, baseline: float | None, goal: str, met: bool | None, **extra) -> None:
    ratio = (value / baseline) if value is not None and baseline else None
    line = {"bench": name, "value": None if value is None else round(value, 4),
            "baseline": None if baseline is None else round(baseline, 4),
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "met": met}
    line.update(extra)
    print(json.dumps(line), flush=True)


class Processes:
    def __init__(self, ns: str):
        self.ns = ns
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()

    def _env(self, **extra) -> dict:
        env = dict(os.environ, AMQP_URL=URL, NPCBUS_NAMESPACE=self.ns, LOG_LEVEL="warning", HF_HUB_OFFLINE="1",
                   BASE_MODEL=BASE_MODEL)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self) -> None:
        self.procs["consumer"] = subprocess.Popen(
            [sys.executable, "-m", "npcbus.cli", "worker", "infer"], cwd=ROOT, start_new_session=True,
            env=self._env(ENGINE="bench.instant_engine:InstantEngine", MAX_CONCURRENCY=512, HEARTBEAT_INTERVAL_S=1,
                          WORKER_ID="bench-instant"))
        self.procs["gateway"] = subprocess.Popen(
            [sys.executable, "-m", "npcbus.cli", "gateway"], cwd=ROOT, start_new_session=True,
            env=self._env(API_TOKEN=TOKEN, GATEWAY_PORT=self.port, RATE_LIMIT_RPS=0, GATEWAY_MAX_CONCURRENCY=8192,
                          MAX_WS_SESSIONS=20000, WS_HEARTBEAT_S=30, REQUEST_TIMEOUT_S=60, WS_IDLE_TIMEOUT_S=0))

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}")

    def cpu_s(self, name: str) -> float:
        import psutil

        t = psutil.Process(self.procs[name].pid).cpu_times()
        return t.user + t.system

    def rss_mb(self, name: str) -> float:
        import psutil

        return psutil.Process(self.procs[name].pid).memory_info().rss / 2**20

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)


async def wait_ready(http: aiohttp.ClientSession, base: str, procs: Processes, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs.check()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(f"{base}/health") as r:
                if (await r.json())["consumers"]["live"]:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError("the gateway or the consumer did not come up")


class Session:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.n = 0

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, base: str) -> Session:
        ws = await http.ws_connect(base.replace("http", "ws", 1) + "/v1/ws", headers=HEADERS, max_msg_size=0)
        await ws.send_str(json.dumps({"type": "session.start", "persona_id": PERSONA_ID, "player": PLAYER,
                                      "context": CONTEXT, "generation": {"max_new_tokens": 64}}))
        ev = json.loads((await ws.receive(timeout=30)).data)
        if ev["type"] != "session.started":
            raise RuntimeError(f"session not started: {ev}")
        return cls(ws)

    async def turn(self, text: str, timeout: float = 60.0) -> dict:
        self.n += 1
        tid = f"t{self.n}"
        await self.ws.send_str(json.dumps({"type": "turn", "turn_id": tid, "text": text}))
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"socket closed ({self.ws.close_code})")
            ev = json.loads(msg.data)
            if ev["type"] in ("turn.final", "turn.error", "error") and ev.get("turn_id", tid) == tid:
                return ev


# ---------------------------------------------------------------------------------------------
# 1. overhead
# ---------------------------------------------------------------------------------------------


class BareClient:
    """The same NPC requests as the gateway sends, over the bus directly, with the same history."""

    def __init__(self, bus: Bus):
        from npcbus.npc import load_personas

        self.bus = bus
        self.persona = load_personas()[PERSONA_ID]
        self.history: list[dict] = []

    async def turn(self, text: str) -> float:
        npc = {"persona": self.persona, "context": CONTEXT, "history": list(self.history), "player": PLAYER,
               "player_input": text, "audience": "general", "adapter": None, "generation": {"max_new_tokens": 64},
               "safe_mode": True}
        bus = self.bus
        t0 = time.perf_counter()
        req = GenerationRequest(uuid.uuid4().hex, MODEL.model_id, mode="npc", npc=npc, deadline=time.time() + 60)
        final = None
        async for ev in bus.request_stream(bus.topology.gen_exchange, MODEL.model_id, req, deadline=req.deadline,
                                           timeout=None, correlation_id=req.request_id):
            if isinstance(ev, FinalResponse):
                final = ev
        took = time.perf_counter() - t0
        if final is None or final.response is None:
            raise RuntimeError("bare round trip without a response")
        self.history = (self.history + [{"role": "player", "text": text},
                                        {"role": "npc", "text": final.response["dialogue"]}])[-20:]
        return took


async def overhead(http, base: str, bus: Bus, n: int) -> tuple[float, float, float, float, float]:
    """Turns alternate between the two paths, one by one, so that both see the same machine noise."""
    bare_client = BareClient(bus)
    session = await Session.open(http, base)
    bare: list[float] = []
    ws: list[float] = []
    try:
        for i in range(n + 20):
            text = LINES[i % len(LINES)]
            b = await bare_client.turn(text)
            t0 = time.perf_counter()
            ev = await session.turn(text)
            w = time.perf_counter() - t0
            if ev["type"] != "turn.final":
                raise RuntimeError(f"turn failed: {ev}")
            if i >= 20:  # warm-up
                bare.append(b)
                ws.append(w)
    finally:
        await session.ws.close()
    pb, pw = percentile(bare, 0.5) * 1000, percentile(ws, 0.5) * 1000
    paired = percentile([w - b for w, b in zip(ws, bare, strict=True)], 0.5) * 1000
    p99b, p99w = percentile(bare, 0.99) * 1000, percentile(ws, 0.99) * 1000
    print(f"# turn round trip p50: websocket via gateway {pw:.3f} ms, bare bus {pb:.3f} ms, median paired "
          f"difference {paired:.3f} ms (p99 {p99w:.3f} / {p99b:.3f} ms, n={len(ws)})", flush=True)
    return pw, pb, paired, p99w, p99b


# ---------------------------------------------------------------------------------------------
# 2. capacity
# ---------------------------------------------------------------------------------------------


async def capacity(http, base: str, procs: Processes, sessions: int, seconds: float, think_s: float) -> dict:
    mem_before = procs.rss_mb("gateway")
    errors: list[str] = []
    latencies: list[float] = []
    opened: list[Session] = []
    sem = asyncio.Semaphore(50)

    async def open_one() -> None:
        async with sem:
            try:
                opened.append(await Session.open(http, base))
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"connect: {type(e).__name__}: {e}")

    t_open = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(sessions)))
    open_s = time.perf_counter() - t_open
    print(f"# {len(opened)} sessions open in {open_s:.1f} s; holding them {seconds:g} s", flush=True)
    stop_at = time.monotonic() + seconds
    rng = random.Random(7)

    async def player(s: Session) -> None:
        await asyncio.sleep(rng.uniform(0, think_s or 0.05))
        i = 0
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                ev = await s.turn(LINES[i % len(LINES)])
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"turn: {type(e).__name__}: {e}")
                return
            if ev["type"] != "turn.final":
                errors.append(f"{ev['type']}: {ev.get('code')}: {ev.get('message')}")
            else:
                latencies.append(time.perf_counter() - t0)
            i += 1
            if think_s:
                await asyncio.sleep(think_s)

    t0 = time.perf_counter()
    cpu0 = {name: procs.cpu_s(name) for name in procs.procs}
    self_cpu0 = time.process_time()
    await asyncio.gather(*(player(s) for s in opened))
    elapsed = time.perf_counter() - t0
    cpu = {name: procs.cpu_s(name) - cpu0[name] for name in procs.procs}
    cpu["clients"] = time.process_time() - self_cpu0
    mem_after = procs.rss_mb("gateway")
    print("# CPU seconds during the hold: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
    with contextlib.suppress(Exception):
        async with http.get(f"{base}/health") as r:
            health = await r.json()
            print(f"# gateway health at the end: sessions={health['sessions']} in_flight={health['in_flight']}",
                  flush=True)
    await asyncio.gather(*(s.ws.close() for s in opened), return_exceptions=True)
    if errors:
        print(f"# {len(errors)} errors, first: {errors[:3]}", flush=True)
    return {"sessions": len(opened), "elapsed": elapsed, "turns": len(latencies), "errors": len(errors),
            "p50": percentile(latencies, 0.5) * 1000, "p99": percentile(latencies, 0.99) * 1000,
            "mem_before": mem_before, "mem_after": mem_after, "open_s": open_s,
            "cpu_ms_per_turn": {k: round(v * 1000 / max(1, len(latencies)), 3) for k, v in cpu.items()}}


async def run(args) -> None:
    ns = f"bench-gw-{uuid.uuid4().hex[:8]}"
    procs = Processes(ns)
    base = f"http://127.0.0.1:{procs.port}"
    bus = Bus(BusSettings.from_env({"AMQP_URL": URL, "NPCBUS_NAMESPACE": ns}), name="bench-client")
    procs.start()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, base, procs)
            await bus.connect()
            load = os.getloadavg()[0]
            pw, pb, paired, p99w, p99b = await overhead(http, base, bus, 300 if args.quick else 2000)
            cap = await capacity(http, base, procs, args.sessions, args.seconds, args.think_ms / 1000)
    finally:
        await bus.close()
        procs.stop()
        await cleanup(ns)
    emit("gateway.ws_overhead_p50_ms", pw, pb, "<=2ms above", pw - pb <= 2.0, unit="ms",
         above_ms=round(pw - pb, 4), paired_median_above_ms=round(paired, 4), p99_ms=round(p99w, 3),
         baseline_p99_ms=round(p99b, 3), engine="instant", load_avg_1m=round(load, 2), cpus=os.cpu_count())
    tps = cap["turns"] / cap["elapsed"] if cap["elapsed"] else 0.0
    common = {"sessions": cap["sessions"], "seconds": args.seconds, "think_ms": args.think_ms}
    emit("gateway.capacity_turns_per_s", tps, None, "report", None, unit="turns/s", turns=cap["turns"],
         cpu_ms_per_turn=cap["cpu_ms_per_turn"], **common)
    emit("gateway.capacity_p50_ms", cap["p50"], pw, "report (baseline: unloaded p50)", None, unit="ms", **common)
    emit("gateway.capacity_p99_ms", cap["p99"], pw, "report (baseline: unloaded p50)", None, unit="ms", **common)
    emit("gateway.capacity_errors", cap["errors"], 0, "none", cap["errors"] == 0, **common)
    emit("gateway.capacity_memory_mb", cap["mem_after"], cap["mem_before"], "report (before -> after)", None,
         unit="MiB", **common)


async def cleanup(ns: str) -> None:
    import aio_pika

    from npcbus.topology import Topology

    topo = Topology(ns)
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(URL)
        try:
            for q in (topo.gen_queue(MODEL.model_id).name, topo.dead_queue.name):
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.queue_delete(q)
            for ex in topo.exchanges():
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.exchange_delete(ex.name)
        finally:
            await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a CI-sized run: 50 sessions for 8 s")
    p.add_argument("--sessions", type=int, default=None, help="concurrent WebSocket sessions (1000)")
    p.add_argument("--seconds", type=float, default=None, help="how long the sessions are held (60)")
    p.add_argument("--think-ms", type=float, default=1000.0, help="pause between a session's turns (1000)")
    args = p.parse_args()
    if args.sessions is None:
        args.sessions = 50 if args.quick else 1000
    if args.seconds is None:
        args.seconds = 8.0 if args.quick else 60.0
    from npcbus.bus import install_uvloop

    install_uvloop()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
