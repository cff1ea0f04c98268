"""The learning half of the NPC quality benchmark: do adapter versions trained from well-rated
experience score better on bench.npc's held-out cases than the version they started from?

    python -m bench.npc_loop [--quick] [--lines N] [--personas a,b,...] [--steps N] [--lr X] [--rehearsal X]
                             [--cases FILE] [--limit N] [--replies FILE.jsonl]

One throw-away namespace on the RabbitMQ at ``AMQP_URL`` runs the real services in this process, on
the offline default model: the aggregator (``PERSONA_ADAPTERS``: version 0 of each persona's adapter
is the one the model build trained), the feedback loop (``npcbus loop``), a training worker, and the
inference consumer on vLLM (the transformers engine where vLLM is absent).

1. **Play.** For each persona, player lines that no held-out case holds (the first ``--lines`` of
   that persona in ``npcbus/data_files/npc_dialogue.jsonl``) go to the consumer as NPC requests with
   the persona's adapter, sampled as a player gets them (bench.npc's :func:`~bench.npc.case_params`).
2. **Rate.** A stand-in player rates each reply: thumbs up (score 1) when it is valid, well-formed
   and closer (all-MiniLM-L6-v2 cosine) to the line the data's writer gave for that turn than to
   the other lines written for the same persona's turns on average, else thumbs down (score -1).
   Each rated reply goes out as :class:`npcbus.messages.Experience`, as the gateway publishes a
   turn's feedback.
3. **Learn.** The loop turns each persona's thumbs-up experience into one training task (its
   thumbs-down experience is not used), the worker trains it from the adapter's current version,
   and the aggregator makes, persists and announces the next version.
4. **Measure.** bench.npc's held-out cases through the same consumer, each with its persona's
   adapter pinned to version 0 and then to the newest version (fetched through the bus, as any
   consumer gets a version), scored by :mod:`npcbus.quality`.

One JSON line per figure: ``{"bench": "npc_loop.<figure>", "value": <newest version>, "baseline":
<version 0>, "ratio", "goal", "met", ...}``. Goals: relevance (ratio over shuffled replies) higher
than version 0's; well-formed, distinct and persona consistency not lower and fallback not higher
(by more than one case in a hundred). A line ``npc_loop.experience`` reports how many replies were
rated up and down and how many versions were made.

``--quick`` (CI): two personas, 8 lines each, 16 held-out cases of those personas, short
generations and training.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import engine_env, parser

engine_env()

from bench import npc as B  # noqa: E402

MODEL_ID = B.MODEL_ID
PLAY_FILE = "npc_dialogue.jsonl"
#: a figure of the newest version may trail version 0's by this much and still count as "not worse"
TOLERANCE = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the stand-in player (pure, over embeddings)
# ------------------------------------------------------------------------------------------------


def ratings(replies: list[str], references: list[str], groups: list[str], valid: list[bool], embed) -> list[float]:
    """Score 1 (thumbs up) or -1 per reply: up when it is valid, well-formed and more similar to its
    own reference line than to the other references of its group (persona) on average."""
    import numpy as np

    from npcbus.quality import is_well_formed

    r = embed(replies)
    ref = embed(references)
    sims = r @ ref.T
    out = []
    for i, g in enumerate(groups):
        others = [j for j, h in enumerate(groups) if h == g and j != i]
        good = valid[i] and is_well_formed(replies[i]) and bool(others) and \
            float(sims[i, i]) > float(np.mean(sims[i, others]))
        out.append(1.0 if good else -1.0)
    return out


def goal_of(name: str) -> str:
    if name == "relevance":
        return "> version 0"
    if name == "fallback":
        return f"<= version 0 + {TOLERANCE}"
    if name == "in_vocabulary" or name == "action_validity":
        return "report"
    return f">= version 0 - {TOLERANCE}"


def met(name: str, value: float | None, baseline: float | None) -> bool | None:
    if value is None or baseline is None or name in ("in_vocabulary", "action_validity"):
        return None
    if name == "relevance":
        return value > baseline
    if name == "fallback":
        return value <= baseline + TOLERANCE
    return value >= baseline - TOLERANCE


def figure_lines(before: dict, after: dict, **extra) -> list[dict]:
    """One line per figure: the newest versions (value) against version 0 (baseline)."""
    from npcbus import quality as Q

    lines = []
    for name in Q.FIGURES:
        on = Q.GOALS[name][1]
        v, b = after[name].get(on), before[name].get(on)
        lines.append({"bench": f"npc_loop.{name}", "value": None if v is None else round(v, 4),
                      "baseline": None if b is None else round(b, 4),
                      "ratio": round(v / b, 4) if v is not None and b else None, "goal": goal_of(name),
                      "met": met(name, v, b), "on": on, "cases": after["cases"], **extra})
    return lines


# ------------------------------------------------------------------------------------------------
# the system, in this process
# ------------------------------------------------------------------------------------------------


def play_records(personas: list[str], lines: int) -> list[dict]:
    """The first ``lines`` records of each persona in the play file (none of them held out)."""
    from npcbus.evaluate import read_jsonl
    from npcbus.model import persona_of
    from npcbus.npc import DATA_DIR

    held = {(persona_of(r), r["request"].get("player_input")) for r in B.read_records()}
    by: dict[str, list[dict]] = {p: [] for p in personas}
    for r in read_jsonl(DATA_DIR / PLAY_FILE):
        p = persona_of(r)
        if p in by and len(by[p]) < lines and (p, r["request"].get("player_input")) not in held:
            by[p].append(r)
    return [r for p in personas for r in by[p]]


async def delete_namespace(bus) -> None:
    """Delete the namespace's queues and exchanges (best effort)."""
    import aio_pika

    topo = bus.topology
    names = [q.name for q in topo.shared_queues()] + [topo.gen_queue(MODEL_ID).name, topo.dead_queue.name]
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(bus.settings.amqp_url)
        try:
            for n in [*dict.fromkeys(names), *(e.name for e in topo.exchanges())]:
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await (ch.queue_delete(n) if n in names else ch.exchange_delete(n))
                if not ch.is_closed:
                    await ch.close()
        finally:
            await conn.close()


class System:
    """Aggregator, feedback loop, training worker and inference consumer on one namespace."""

    def __init__(self, model_dir: str, personas: list[str], *, steps: int, lr: float, concurrency: int,
                 engine: str, work: Path, rehearsal: float = 0.0):
        self.model_dir, self.personas, self.work, self.rehearsal = model_dir, personas, work, rehearsal
        self.steps, self.lr, self.concurrency, self.engine_kind = steps, lr, concurrency, engine
        self.ns = f"bench-npcloop-{uuid.uuid4().hex[:8]}"
        self.parts: list = []

    async def __aenter__(self) -> System:
        from aggregator.loop import ExperienceLoop, LoopSettings
        from aggregator.service import Aggregator, AggregatorSettings
        from npcbus.bus import Bus
        from npcbus.settings import BusSettings, ModelSettings
        from workers.engines import make_engine
        from workers.infer_worker import InferenceWorker, InferSettings
        from workers.train_worker import TrainWorker, TrainWorkerSettings

        env = dict(os.environ, NPCBUS_NAMESPACE=self.ns, MODEL_DIR=self.model_dir)
        env.pop("BASE_MODEL", None)
        self.bus_settings = BusSettings.from_env(env)
        model_settings = ModelSettings.from_env(env)
        self.agg = Aggregator(AggregatorSettings.from_env(
            {}, adapters=["npc"], checkpoint_dir=str(self.work / "checkpoints"), num_tasks_per_round=1,
            min_updates_per_round=1, round_timeout_s=60.0, tick_interval_s=0.5, reannounce_interval_s=5.0),
            self.bus_settings, model_settings)
        await self.agg.start()
        self.parts.append(self.agg)
        missing = [p for p in self.personas if p not in self.agg.adapters]
        if missing:
            raise RuntimeError(f"the default model has no adapter for {missing}: not a default-model build?")
        self.loop_bus = Bus(self.bus_settings, name="bench-npcloop-loop")
        await self.loop_bus.connect()
        self.loop = ExperienceLoop(self.loop_bus, LoopSettings.from_env(
            {}, batch_size=10_000, min_batch=1, max_wait_s=3.0, tick_s=0.5, steps=self.steps, rehearsal=self.rehearsal,
            hyperparams=json.dumps({"lr": self.lr, "batch_size": 4, "lr_schedule": "constant"})))
        await self.loop.start()
        self.trainer = TrainWorker(TrainWorkerSettings.from_env({}, worker_id="bench-npcloop",
                                                                cache_dir=str(self.work / "train-cache"),
                                                                version_wait_s=0.0),
                                   self.bus_settings, model_settings)
        await self.trainer.start()
        self.parts.append(self.trainer)
        settings = InferSettings.from_env({}, engine=B.engine_kind(self.engine_kind),
                                          max_concurrency=self.concurrency,
                                          max_loras=2 * len(self.personas) + 2, dtype="float32", max_model_len=2048,
                                          heartbeat_interval_s=5.0, adapter_cache_dir=str(self.work / "infer-cache"))
        self.eng = make_engine(settings, self.model_dir)
        t0 = time.monotonic()
        await self.eng.start()
        log(f"engine {self.eng.name} started in {time.monotonic() - t0:.1f} s")
        self.wbus = Bus(self.bus_settings, name="bench-npcloop-consumer")
        await self.wbus.connect()
        self.consumer = InferenceWorker(self.wbus, self.eng, settings, model_id=MODEL_ID, worker_id="bench-npcloop")
        await self.consumer.start()
        self.client = Bus(self.bus_settings, name="bench-npcloop-client")
        await self.client.connect()
        await self.client.reply_queue()
        return self

    async def __aexit__(self, *exc) -> None:
        for stop in (lambda: self.consumer.stop(drain_timeout_s=5), self.loop.stop, self.trainer.stop,
                     self.agg.stop):
            with contextlib.suppress(Exception):
                await stop()
        with contextlib.suppress(Exception):
            await delete_namespace(self.client)
        for b in (self.client, self.wbus, self.loop_bus):
            with contextlib.suppress(Exception):
                await b.close()
        with contextlib.suppress(Exception):
            await self.eng.close()

    def version(self, persona: str) -> int:
        return self.agg.adapters[persona].state.version

    async def ask(self, records: list[dict], versions: dict[str, int | None], max_tokens: int,
                  label: str) -> list[tuple[dict, object]]:
        """Each record as an NPC request with its persona's adapter at ``versions[persona]``."""
        from npcbus.messages import FinalResponse, GenerationError, GenerationRequest
        from npcbus.model import persona_of

        sem = asyncio.Semaphore(self.concurrency)
        progress = B.Progress(label, len(records), max(4, len(records) // 8))

        async def one(rec: dict):
            pid = persona_of(rec)
            req = GenerationRequest(uuid.uuid4().hex, MODEL_ID, mode="npc", npc=rec["request"], adapter=pid,
                                    adapter_version=versions.get(pid), params=B.case_params(rec, max_tokens))
            async with sem:
                result = None
                async for ev in self.client.request_stream(self.client.topology.gen_exchange, MODEL_ID, req,
                                                           timeout=600):
                    if isinstance(ev, (FinalResponse, GenerationError)):
                        result = ev
                        break
            progress.step()
            return rec, result

        return list(await asyncio.gather(*[one(r) for r in records]))

    async def publish_experience(self, played: list[tuple[dict, object]], scores: list[float]) -> None:
        from npcbus.messages import Experience, FinalResponse
        from npcbus.model import persona_of
        from npcbus.topology import RK_EXPERIENCE

        for (rec, ev), score in zip(played, scores, strict=True):
            if not isinstance(ev, FinalResponse) or not isinstance(ev.response, dict):
                continue
            exp = Experience(uuid.uuid4().hex, persona_of(rec), rec["request"], ev.response,
                             adapter_version=ev.adapter_version, score=score, valid=ev.valid,
                             thumbs="up" if score > 0 else "down", request_id=ev.request_id)
            await self.client.publish(self.client.topology.experience_exchange, RK_EXPERIENCE, exp)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def run(*, personas: list[str], lines: int, cases_path: str | None, limit: int | None, max_tokens: int,
        steps: int, lr: float, concurrency: int, engine: str, replies: str | None, timeout_s: float,
        rehearsal: float = 0.0) -> dict:
    from npcbus import quality as Q
    from npcbus.messages import FinalResponse
    from npcbus.model import persona_of

    model_dir = B.finetuned_model()
    held = B.in_turn([r for r in B.read_records(cases_path) if persona_of(r) in personas], limit)
    play = play_records(personas, lines)
    if not play or not held:
        raise ValueError(f"nothing to play ({len(play)}) or to measure ({len(held)}) for personas {personas}")
    log(f"{len(play)} turns to play and rate, {len(held)} held-out cases; personas {', '.join(personas)}; "
        f"{steps} training steps at lr {lr}")
    embedder = Q.Embedder(threads=2)

    async def main():
        work = Path(tempfile.mkdtemp(prefix="bench-npcloop-"))
        async with System(model_dir, personas, steps=steps, lr=lr, concurrency=concurrency, engine=engine, rehearsal=rehearsal,
                          work=work) as sys_:
            t0 = time.monotonic()
            played = await sys_.ask(play, {}, max_tokens, "play")
            texts = [(ev.response or {}).get("dialogue", "") if isinstance(ev, FinalResponse) else ""
                     for _, ev in played]
            valid = [isinstance(ev, FinalResponse) and ev.valid for _, ev in played]
            refs = [r["response"]["dialogue"] for r, _ in played]
            scores = await asyncio.to_thread(ratings, texts, refs, [persona_of(r) for r, _ in played], valid,
                                             embedder)
            up = {p: sum(1 for (r, _), s in zip(played, scores, strict=True) if s > 0 and persona_of(r) == p)
                  for p in personas}
            log(f"played {len(played)} turns in {time.monotonic() - t0:.1f} s; thumbs up per persona: {up}")
            await sys_.publish_experience(played, scores)
            waiting = [p for p in personas if up[p]]
            end = time.monotonic() + timeout_s
            while any(sys_.version(p) < 1 for p in waiting):
                if time.monotonic() > end:
                    raise TimeoutError(f"no new version within {timeout_s:.0f} s for "
                                       f"{[p for p in waiting if sys_.version(p) < 1]}")
                await asyncio.sleep(1.0)
            newest = {p: sys_.version(p) for p in personas}
            log(f"new versions after {time.monotonic() - t0:.1f} s: {newest}")
            before = await sys_.ask(held, dict.fromkeys(personas, 0), max_tokens, "version 0")
            after = await sys_.ask(held, newest, max_tokens, "newest")
            return played, scores, newest, before, after

    played, scores, newest, before, after = asyncio.run(main())
    if replies:
        B.write_replies(replies, {"play": played, "version 0": before, "newest": after})
    vocab = Q.build_vocabulary()
    reports = {}
    for name, results in (("version 0", before), ("newest", after)):
        cases, errors = B.to_cases(results)
        reports[name] = {**Q.measure(cases, embedder, vocab), "errors": errors}
    return {"reports": reports, "newest": newest, "thumbs_up": sum(s > 0 for s in scores),
            "thumbs_down": sum(s < 0 for s in scores), "played": len(played), "cases": len(held),
            "rehearsal": rehearsal}


def _loop_default_rehearsal() -> float:
    from aggregator.loop import LoopSettings

    return LoopSettings.from_env({}).rehearsal


def main(argv: list[str] | None = None) -> int:
    from npcbus.npc import load_personas

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--personas", default=None, help="comma-separated persona ids (default: all; --quick: two)")
    p.add_argument("--lines", type=int, default=None, help="player lines played per persona (default 40; --quick 8)")
    p.add_argument("--cases", default=None, help="held-out NPC records (default: bench.npc's)")
    p.add_argument("--limit", type=int, default=None, help="held-out cases, taken in turn from each persona "
                                                            "(default: all of the personas'; --quick 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation length (default 256; --quick 160)")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default 30; --quick 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="training learning rate (default 1e-3)")
    p.add_argument("--rehearsal", type=float, default=None,
                   help="the loop's LOOP_REHEARSAL: written turns of the persona added per thumbs-up reply "
                        "(default: the loop's default, 0)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16; --quick 8)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"), help="inference engine")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the new versions")
    p.add_argument("--replies", metavar="FILE.jsonl", help="write every reply (play, version 0, newest) here")
    args = p.parse_args(argv)
    personas = args.personas.split(",") if args.personas else list(load_personas())[: 2 if args.quick else None]
    from npcbus.logs import setup_logging

    setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "warning"))
    t0 = time.monotonic()
    result = run(personas=personas, lines=args.lines or (8 if args.quick else 40), cases_path=args.cases,
                 limit=args.limit if args.limit is not None else (16 if args.quick else None),
                 max_tokens=args.max_tokens or (160 if args.quick else 256),
                 steps=args.steps or (10 if args.quick else 30), lr=args.lr,
                 rehearsal=args.rehearsal if args.rehearsal is not None else _loop_default_rehearsal(),
                 concurrency=args.concurrency or (8 if args.quick else 16), engine=args.engine,
                 replies=args.replies, timeout_s=args.timeout)
    log(B.table({"variants": result["reports"], "reference": None}))
    log(f"total {time.monotonic() - t0:.1f} s")
    extra = {"versions": result["newest"], "rehearsal": result["rehearsal"], "quick": args.quick}
    print(json.dumps({"bench": "npc_loop.experience", "value": result["thumbs_up"], "baseline": result["played"],
                      "ratio": round(result["thumbs_up"] / result["played"], 4), "goal": "report", "met": None,
                      "thumbs_down": result["thumbs_down"], **extra}), flush=True)
    for line in figure_lines(result["reports"]["version 0"], result["reports"]["newest"], **extra):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
