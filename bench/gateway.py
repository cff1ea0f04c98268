"""Gateway benchmarks: the overhead of a WebSocket turn, and capacity under many sessions.

    python -m bench.gateway [--quick] [--sessions N] [--seconds S] [--think-ms MS]
    python -m bench.gateway --scaling [--quick] [--sessions N] [--seconds S] [--rounds R] [--cores N]

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
3. ``--scaling`` (instead of 1 and 2): the capacity run through 1, 2 and 4 inference consumers x 1
   and 2 gateways, each its own process, the sessions spread round-robin over the gateways. For a
   throughput figure the think time is 0 (each of 64 sessions sends its next turn as soon as the
   last one is answered), so the system is saturated: turns queue instead of the machine idling.
   Each configuration gets a warm-up (3 s) and a measured window (25 s), in two rounds (the second
   in reverse order, so that drift on a shared machine falls on every configuration alike); between
   neighbouring configurations one process is started or stopped. Over the window it reads the
   CPU seconds of every process, of the broker (RabbitMQ's ``beam.smp``, see :func:`broker_pid`)
   and of this process (the clients). Figures per configuration: turns/s (baseline: 1 consumer x 1
   gateway in the same run), p50/p99 latency, errors, and CPU ms per turn of gateways, consumers,
   broker and clients. Then the prediction (:func:`predict`): each part's CPU ms per turn is its
   cost, one core gives it 1000 / cost turns/s, and ``--cores`` cores split between gateways,
   consumers and the broker do what the slowest part does. ``--scaling --quick``: one round of
   1 + 4 s with 32 sessions (under a minute; the full run about 6 minutes).
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
    """The inference consumers and gateways of one benchmark, each its own process, in one namespace.

    Processes are named ``consumer-1``.. and ``gateway-1``..; :func:`part_of` maps a name to its part."""

    def __init__(self, ns: str, consumers: int = 1, gateways: int = 1):
        self.ns = ns
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.worker_ids: dict[str, str] = {}
        self.n_consumers = consumers
        self.n_gateways = gateways

    @property
    def port(self) -> int:
        return self.ports["gateway-1"]

    def _env(self, **extra) -> dict:
        env = dict(os.environ, AMQP_URL=URL, NPCBUS_NAMESPACE=self.ns, LOG_LEVEL="warning", HF_HUB_OFFLINE="1",
                   BASE_MODEL=BASE_MODEL)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self) -> None:
        self.scale(self.n_consumers, self.n_gateways)

    def names(self, part: str) -> list[str]:
        return sorted((n for n in self.procs if part_of(n) == part), key=lambda n: int(n.rsplit("-", 1)[1]))

    def bases(self) -> list[str]:
        return [f"http://127.0.0.1:{self.ports[n]}" for n in self.names("gateway")]

    def scale(self, consumers: int, gateways: int) -> None:
        """Start or stop processes (the highest-numbered first) until there are this many of each."""
        for part, want in (("consumer", consumers), ("gateway", gateways)):
            have = self.names(part)
            for name in have[want:][::-1]:
                self._stop([name])
            for i in range(len(have), want):
                self._start(part, i + 1)
        self.n_consumers, self.n_gateways = consumers, gateways

    def _start(self, part: str, i: int) -> None:
        name = f"{part}-{i}"
        if part == "consumer":
            # a new id for each start: readiness waits for the ids of the running consumers (a gateway
            # still lists a consumer that stopped a moment ago)
            self.worker_ids[name] = wid = f"bench-instant-{i}-{uuid.uuid4().hex[:6]}"
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "npcbus.cli", "worker", "infer"], cwd=ROOT, start_new_session=True,
                env=self._env(ENGINE="bench.instant_engine:InstantEngine", MAX_CONCURRENCY=512,
                              HEARTBEAT_INTERVAL_S=1, WORKER_ID=wid))
        else:
            self.ports[name] = port = free_port()
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "npcbus.cli", "gateway"], cwd=ROOT, start_new_session=True,
                env=self._env(API_TOKEN=TOKEN, GATEWAY_PORT=port, RATE_LIMIT_RPS=0, GATEWAY_MAX_CONCURRENCY=8192,
                              MAX_WS_SESSIONS=20000, WS_HEARTBEAT_S=30, REQUEST_TIMEOUT_S=60, WS_IDLE_TIMEOUT_S=0))

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}")

    def cpu_s(self, name: str) -> float:
        import psutil

        t = psutil.Process(self.procs[name].pid).cpu_times()
        return t.user + t.system

    def rss_mb(self, part: str) -> float:
        """Resident memory of a process, or of all processes of a part together."""
        import psutil

        names = [part] if part in self.procs else self.names(part)
        return sum(psutil.Process(self.procs[n].pid).memory_info().rss for n in names) / 2**20

    def stop(self) -> None:
        self._stop(list(self.procs))

    def _stop(self, names: list[str]) -> None:
        for n in names:
            p = self.procs[n]
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for n in names:
            p = self.procs.pop(n)
            self.ports.pop(n, None)
            self.worker_ids.pop(n, None)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def part_of(name: str) -> str:
    """``consumer-3`` -> ``consumer``; a name without a number is its own part (``broker``, ``clients``)."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


async def wait_ready(http: aiohttp.ClientSession, base: str | list[str], procs: Processes,
                     timeout: float = 120) -> None:
    """Until every gateway answers /health and has heard from every inference consumer."""
    bases = [base] if isinstance(base, str) else list(base)
    end = time.monotonic() + timeout
    pending = list(bases)
    while time.monotonic() < end:
        procs.check()
        for b in list(pending):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{b}/health") as r:
                    seen = {w["worker_id"] for w in (await r.json())["consumers"]["workers"]}
                    if seen >= set(procs.worker_ids.values()):
                        pending.remove(b)
        if not pending:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the gateways or the consumers did not come up")


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


async def capacity(http, base: str | list[str], procs: Processes, sessions: int, seconds: float, think_s: float,
                   *, warmup_s: float = 0.0, broker: int | None = None, quiet: bool = False) -> dict:
    """``sessions`` WebSocket sessions (spread round-robin over the gateways ``base``), each sending
    turns one after another with ``think_s`` between them for ``warmup_s + seconds``.

    The measured window starts after the warm-up and ends when the last turn begun before its end
    has finished: turns that finish in it are counted, and the CPU seconds of every process (and of
    the broker process ``broker`` and this process, ``clients``) are read at its two ends."""
    bases = [base] if isinstance(base, str) else list(base)
    mem_before = procs.rss_mb("gateway")
    errors: list[str] = []
    latencies: list[float] = []
    opened: list[Session] = []
    sem = asyncio.Semaphore(50)
    measuring = False

    async def open_one(i: int) -> None:
        async with sem:
            try:
                opened.append(await Session.open(http, bases[i % len(bases)]))
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"connect: {type(e).__name__}: {e}")

    t_open = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(sessions)))
    open_s = time.perf_counter() - t_open
    if not quiet:
        print(f"# {len(opened)} sessions open in {open_s:.1f} s; holding them {seconds:g} s", flush=True)
    stop_at = time.monotonic() + warmup_s + seconds
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
            elif measuring:
                latencies.append(time.perf_counter() - t0)
            i += 1
            if think_s:
                await asyncio.sleep(think_s)

    def cpu_now() -> dict[str, float | None]:
        cpu = {name: procs.cpu_s(name) for name in procs.procs}
        cpu["broker"] = broker_cpu_s(broker)
        cpu["clients"] = time.process_time()
        return cpu

    players = asyncio.gather(*(player(s) for s in opened))
    if warmup_s:
        await asyncio.sleep(warmup_s)
        errors_warmup = len(errors)
    else:
        errors_warmup = 0
    measuring = True
    t0 = time.perf_counter()
    cpu0 = cpu_now()
    await players
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_now()
    cpu = {k: None if cpu0[k] is None or cpu1[k] is None else cpu1[k] - cpu0[k] for k in cpu0}
    mem_after = procs.rss_mb("gateway")
    if not quiet:
        print("# CPU seconds during the hold: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v is not None)
              + f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
        with contextlib.suppress(Exception):
            async with http.get(f"{bases[0]}/health") as r:
                health = await r.json()
                print(f"# gateway health at the end: sessions={health['sessions']} in_flight={health['in_flight']}",
                      flush=True)
    await asyncio.gather(*(s.ws.close() for s in opened), return_exceptions=True)
    if errors:
        print(f"# {len(errors)} errors ({errors_warmup} in the warm-up), first: {errors[:3]}", flush=True)
    by_part = cpu_ms_per_turn(cpu, len(latencies))
    return {"sessions": len(opened), "elapsed": elapsed, "turns": len(latencies), "errors": len(errors),
            "p50": percentile(latencies, 0.5) * 1000, "p99": percentile(latencies, 0.99) * 1000,
            "latencies": latencies, "cpu_s": cpu, "mem_before": mem_before, "mem_after": mem_after,
            "open_s": open_s, "cpu_ms_per_turn": {k: round(v, 3) for k, v in by_part.items() if v is not None}}


# ---------------------------------------------------------------------------------------------
# 3. scaling: 1, 2, 4 inference consumers x 1, 2 gateways, and the CPU per turn of each part
# ---------------------------------------------------------------------------------------------

# the parts a deployment runs (the clients are the players' and game servers' machines)
SERVICE_PARTS = ("gateway", "consumer", "broker")
PARTS = (*SERVICE_PARTS, "clients")
# one process is started or stopped between neighbours; the second round runs the list backwards
SCALING_ORDER = [(1, 1), (2, 1), (4, 1), (4, 2), (2, 2), (1, 2)]
PREDICT_FROM = (4, 2)


def cpu_ms_per_turn(cpu_s: dict[str, float | None], turns: int) -> dict[str, float | None]:
    """CPU milliseconds per turn of each part: the CPU seconds of its processes (``gateway-1``,
    ``gateway-2``, ... or a part's own name) summed, over the turns of the same window. A part with
    a process whose CPU is unknown (None) is None, as is every part when there were no turns."""
    total: dict[str, float | None] = {}
    for name, sec in cpu_s.items():
        part = part_of(name)
        if sec is None or (part in total and total[part] is None):
            total[part] = None
        else:
            total[part] = total.get(part, 0.0) + sec
    return {k: None if v is None or turns <= 0 else v * 1000.0 / turns for k, v in total.items()}


def turns_per_core(cost_ms: dict[str, float | None]) -> dict[str, float | None]:
    """Turns per second that one fully busy core gives each part: 1000 / its CPU ms per turn."""
    return {k: (1000.0 / v if v else None) for k, v in cost_ms.items()}


def predict(cost_ms: dict[str, float | None], cores: int, parts: tuple[str, ...] = SERVICE_PARTS) -> dict:
    """What ``cores`` cores would do, split between the parts, from each part's CPU ms per turn.

    A part given n cores does at most ``n * 1000 / cost`` turns/s (each gateway and consumer is one
    Python process on one core, so its n is also its number of processes), and the deployment does
    what its slowest part does. Cores are handed out one by one, each to the part that is the
    bottleneck at that moment (every part starts with one), which gives the split with the most
    turns/s. ``upper_bound_turns_per_s`` is the same with fractional cores: ``cores * 1000 / sum of
    the costs``. Parts without a known cost are left out (and listed)."""
    costs = {p: cost_ms[p] for p in parts if cost_ms.get(p)}
    left_out = [p for p in parts if not cost_ms.get(p)]
    if not costs:
        raise ValueError("no part with a known CPU cost per turn")
    if cores < len(costs):
        raise ValueError(f"{cores} cores cannot give each of {len(costs)} parts one")
    split = dict.fromkeys(costs, 1)

    def rate(part: str) -> float:
        return split[part] * 1000.0 / costs[part]

    for _ in range(cores - len(costs)):
        split[min(costs, key=rate)] += 1
    bottleneck = min(costs, key=rate)
    total = sum(costs.values())
    return {"cores": cores, "split": split, "turns_per_s": rate(bottleneck), "bottleneck": bottleneck,
            "upper_bound_turns_per_s": cores * 1000.0 / total, "turns_per_core": 1000.0 / total,
            "cost_ms": dict(costs), "left_out": left_out}


def broker_pid(url: str = URL) -> int | None:
    """The pid of the RabbitMQ node (its ``beam.smp``) that serves ``url``, where it runs on this
    machine: ``BENCH_BROKER_PID`` if set; else the one beam.smp process, or of several the one that
    listens on the URL's port; else what ``rabbitmqctl eval 'os:getpid().'`` says. None if none is
    found (a broker elsewhere): its CPU is then not reported."""
    import urllib.parse

    import psutil

    if os.environ.get("BENCH_BROKER_PID"):
        return int(os.environ["BENCH_BROKER_PID"])
    u = urllib.parse.urlparse(url)
    if (u.hostname or "localhost") not in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        return None
    port = u.port or 5672
    beams = [p for p in psutil.process_iter(["name"]) if p.info["name"] and p.info["name"].startswith("beam")]
    if len(beams) == 1:
        return beams[0].pid
    for p in beams:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return p.pid
    with contextlib.suppress(Exception):
        out = subprocess.run(["rabbitmqctl", "eval", "os:getpid()."], capture_output=True, text=True, timeout=30)
        pid = int(out.stdout.strip().strip('"'))
        if psutil.pid_exists(pid):
            return pid
    return None


def broker_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def _label(c: int, g: int) -> str:
    return f"{c}x{g}"


async def scaling(args) -> None:
    ns = f"bench-gw-{uuid.uuid4().hex[:8]}"
    procs = Processes(ns, *SCALING_ORDER[0])
    broker = broker_pid()
    print(f"# broker process: {broker if broker is not None else 'not found (its CPU is not reported)'}; "
          f"{args.sessions} sessions, think time {args.think_ms:g} ms, {args.rounds} round(s) of "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s measured per configuration", flush=True)
    acc: dict[tuple[int, int], dict] = {}
    t_start = time.monotonic()
    procs.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for r in range(args.rounds):
                for c, g in (SCALING_ORDER if r % 2 == 0 else SCALING_ORDER[::-1]):
                    procs.scale(c, g)
                    await wait_ready(http, procs.bases(), procs)
                    cap = await capacity(http, procs.bases(), procs, args.sessions, args.seconds,
                                         args.think_ms / 1000, warmup_s=args.warmup, broker=broker, quiet=True)
                    a = acc.setdefault((c, g), {"turns": 0, "elapsed": 0.0, "errors": 0, "latencies": [],
                                                "cpu_s": {}, "load": []})
                    a["turns"] += cap["turns"]
                    a["elapsed"] += cap["elapsed"]
                    a["errors"] += cap["errors"]
                    a["latencies"] += cap["latencies"]
                    a["load"].append(os.getloadavg()[0])
                    for name, sec in cap["cpu_s"].items():
                        part = part_of(name)
                        prev = a["cpu_s"].get(part, 0.0)
                        a["cpu_s"][part] = None if prev is None or sec is None else prev + sec
                    costs = cpu_ms_per_turn(cap["cpu_s"], cap["turns"])
                    print(f"# round {r + 1}, {c} consumer(s) x {g} gateway(s): "
                          f"{cap['turns'] / cap['elapsed']:.1f} turns/s, p50 {cap['p50']:.1f} ms, "
                          f"p99 {cap['p99']:.1f} ms, errors {cap['errors']}; CPU ms/turn "
                          + ", ".join(f"{k} {v:.3f}" for k, v in costs.items() if v is not None)
                          + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        procs.stop()
        await cleanup(ns)
    print(f"# scaling run took {time.monotonic() - t_start:.0f} s", flush=True)
    emit_scaling(acc, args)


def summarize(acc: dict[tuple[int, int], dict]) -> dict[tuple[int, int], dict]:
    """Per configuration: turns/s, p50/p99, errors and CPU ms per turn of each part (pure)."""
    out = {}
    for key, a in acc.items():
        costs = cpu_ms_per_turn(a["cpu_s"], a["turns"])
        known = [v for v in a["cpu_s"].values() if v is not None]
        out[key] = {"turns_per_s": a["turns"] / a["elapsed"] if a["elapsed"] else 0.0, "turns": a["turns"],
                    "seconds": a["elapsed"], "errors": a["errors"],
                    "p50": percentile(a["latencies"], 0.5) * 1000, "p99": percentile(a["latencies"], 0.99) * 1000,
                    "cost_ms": costs, "service_ms": (sum(costs[p] for p in SERVICE_PARTS)
                                                     if all(costs.get(p) is not None for p in SERVICE_PARTS)
                                                     else None),
                    "busy_cores": sum(known) / a["elapsed"] if a["elapsed"] else None}
    return out


def emit_scaling(acc: dict[tuple[int, int], dict], args) -> None:
    res = summarize(acc)
    base = res[(1, 1)]
    common = {"sessions": args.sessions, "think_ms": args.think_ms, "rounds": args.rounds, "engine": "instant",
              "cpus": os.cpu_count()}

    def r3(d: dict) -> dict:
        return {k: None if v is None else round(v, 3) for k, v in d.items()}

    print("# consumers x gateways | turns/s | p50 ms | p99 ms | errors | CPU ms per turn: "
          + " / ".join(PARTS) + " | busy cores", flush=True)
    for g in (1, 2):
        for c in (1, 2, 4):
            if (c, g) not in res:
                continue
            x = res[(c, g)]
            print(f"# {c} x {g} | {x['turns_per_s']:.1f} | {x['p50']:.1f} | {x['p99']:.1f} | {x['errors']} | "
                  + " / ".join("-" if x["cost_ms"].get(p) is None else f"{x['cost_ms'][p]:.3f}" for p in PARTS)
                  + f" | {x['busy_cores']:.2f}", flush=True)
    for g in (1, 2):
        for c in (1, 2, 4):
            if (c, g) not in res:
                continue
            x = res[(c, g)]
            cfg = {"consumers": c, "gateways": g, **common}
            emit("gateway.scaling_turns_per_s", x["turns_per_s"], base["turns_per_s"], "report", None,
                 unit="turns/s", turns=x["turns"], seconds=round(x["seconds"], 2),
                 baseline_is="1 consumer x 1 gateway, same run", **cfg)
            emit("gateway.scaling_p50_ms", x["p50"], base["p50"], "report", None, unit="ms", **cfg)
            emit("gateway.scaling_p99_ms", x["p99"], base["p99"], "report", None, unit="ms", **cfg)
            emit("gateway.scaling_errors", x["errors"], 0, "none", x["errors"] == 0, **cfg)
            emit("gateway.scaling_cpu_ms_per_turn", x["service_ms"], base["service_ms"], "report", None, unit="ms",
                 value_is="gateway + consumer + broker", parts=r3(x["cost_ms"]),
                 turns_per_core=r3(turns_per_core(x["cost_ms"])),
                 busy_cores=None if x["busy_cores"] is None else round(x["busy_cores"], 3), **cfg)
    src = PREDICT_FROM if PREDICT_FROM in res else (1, 1)
    per_core, base_per_core = turns_per_core(res[src]["cost_ms"]), turns_per_core(base["cost_ms"])
    for part in PARTS:
        if per_core.get(part) is None:
            continue
        emit("gateway.scaling_turns_per_core", per_core[part], base_per_core.get(part), "report", None,
             unit="turns/s per core", part=part, from_config=_label(*src),
             baseline_is="the same part at 1 consumer x 1 gateway", **common)
    try:
        pred = predict(res[src]["cost_ms"], args.cores)
    except ValueError as e:
        print(f"# no prediction: {e}", flush=True)
        return
    by_config = {}
    for key, x in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        with contextlib.suppress(ValueError):
            by_config[_label(*key)] = round(predict(x["cost_ms"], args.cores)["turns_per_s"], 1)
    split = pred["split"]
    print(f"# prediction from the CPU per turn at {src[0]} consumers x {src[1]} gateways: {args.cores} cores as "
          f"{split.get('gateway', 0)} gateway(s) / {split.get('consumer', 0)} consumer(s) / "
          f"{split.get('broker', 0)} broker core(s) would do about {pred['turns_per_s']:.0f} turns/s "
          f"(bottleneck: {pred['bottleneck']}; {pred['turns_per_core']:.0f} turns/s per core of the whole system; "
          f"from each configuration's costs: {by_config})", flush=True)
    emit("gateway.scaling_predicted_turns_per_s", pred["turns_per_s"], base["turns_per_s"], "report", None,
         unit="turns/s", cores=args.cores, split=split, bottleneck=pred["bottleneck"],
         upper_bound_turns_per_s=round(pred["upper_bound_turns_per_s"], 1),
         system_turns_per_core=round(pred["turns_per_core"], 1), cost_ms=r3(pred["cost_ms"]),
         left_out=pred["left_out"], from_config=_label(*src), by_config=by_config,
         baseline_is="measured turns/s, 1 consumer x 1 gateway on this machine, same run",
         method="CPU ms per turn of each part is its cost; n cores give a part n*1000/cost turns/s; cores go one "
                "by one to the bottleneck part; the slowest part bounds the deployment", **common)


async def run(args) -> None:
    ns = f"bench-gw-{uuid.uuid4().hex[:8]}"
    procs = Processes(ns)
    bus = Bus(BusSettings.from_env({"AMQP_URL": URL, "NPCBUS_NAMESPACE": ns}), name="bench-client")
    procs.start()
    base = f"http://127.0.0.1:{procs.port}"
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, base, procs)
            await bus.connect()
            load = os.getloadavg()[0]
            pw, pb, paired, p99w, p99b = await overhead(http, base, bus, 300 if args.quick else 2000)
            cap = await capacity(http, base, procs, args.sessions, args.seconds, args.think_ms / 1000,
                                 broker=broker_pid())
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
    p.add_argument("--quick", action="store_true", help="a CI-sized run: 50 sessions for 8 s (--scaling: one round, "
                   "32 sessions, 1 + 4 s per configuration)")
    p.add_argument("--scaling", action="store_true", help="the capacity run at 1, 2, 4 inference consumers x 1, 2 "
                   "gateways with the CPU per turn of each part and a prediction per core (instead of the figures above)")
    p.add_argument("--sessions", type=int, default=None, help="concurrent WebSocket sessions (1000; --scaling: 64)")
    p.add_argument("--seconds", type=float, default=None, help="how long the sessions are held (60; --scaling: "
                   "the measured seconds per configuration and round, 25)")
    p.add_argument("--think-ms", type=float, default=None, help="pause between a session's turns (1000; --scaling: 0)")
    p.add_argument("--warmup", type=float, default=None, help="--scaling: turns before each measured window (3 s)")
    p.add_argument("--rounds", type=int, default=None, help="--scaling: rounds over the configurations, every other "
                   "one in reverse order (2)")
    p.add_argument("--cores", type=int, default=16, help="--scaling: the deployment size to predict (16 cores)")
    args = p.parse_args()
    if args.scaling:
        defaults = {"sessions": 32, "seconds": 4.0, "think_ms": 0.0, "warmup": 1.0, "rounds": 1} if args.quick else \
                   {"sessions": 64, "seconds": 25.0, "think_ms": 0.0, "warmup": 3.0, "rounds": 2}
    else:
        defaults = {"sessions": 50 if args.quick else 1000, "seconds": 8.0 if args.quick else 60.0, "think_ms": 1000.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from npcbus.bus import install_uvloop

    install_uvloop()
    asyncio.run(scaling(args) if args.scaling else run(args))


if __name__ == "__main__":
    main()
