"""The learning half of the NPC quality benchmark: do adapter versions trained from well-rated
experience score better on bench.npc's held-out cases than the version they started from?

    python -m bench.npc_loop [--quick] [--lines N] [--samples K] [--seeds N] [--in-character closest|above-mean]
                             [--coherence written|off] [--rounds N] [--personas a,b,...] [--steps N] [--lr X] [--rehearsal X] [--cases FILE] [--limit N]
                             [--replies FILE.jsonl]

One throw-away namespace on the RabbitMQ at ``AMQP_URL`` runs the real services in this process, on
the offline default model: the aggregator (``PERSONA_ADAPTERS``: version 0 of each persona's adapter
is the one the model build trained), the feedback loop (``npcbus loop``), a training worker, and the
inference consumer on vLLM (the transformers engine where vLLM is absent).

1. **Play.** For each persona, the play set (``npcbus/data_files/npc_play.jsonl``: player lines that
   neither the fine-tuning set nor the held-out cases hold, every kind of request and every service)
   goes to the consumer as NPC requests with the persona's adapter, each line ``--samples`` times
   with seeds of its own, sampled as a player gets them (bench.npc's :func:`~bench.npc.case_params`).
2. **Rate.** A stand-in player rates each reply as a player who asked for something would: thumbs up
   (score 1) when it passed the output checks, its line is well-formed, it does what was asked (the
   intent, and where it acts the kind of action, of a line written for that kind of request: the
   record's ``answers``), it sounds like its persona (all-MiniLM-L6-v2: closer to its own persona's
   description than to any other's; ``--in-character above-mean``: than to the others' on average)
   and the persona has not said that line already in a reply rated up, and (``--coherence written``,
   the default) every sentence of its line is a sentence of the written lines, since the default
   model's lines that are not are splices of several; else thumbs down (score -1). Each rated reply goes
   out as :class:`npcbus.messages.Experience`, as the gateway publishes a turn's feedback.
3. **Learn.** The loop turns each persona's thumbs-up experience into one training task (its
   thumbs-down experience is not used), the worker trains it from the adapter's current version,
   and the aggregator makes, persists and announces the next version. With ``--rounds N`` the
   three steps repeat, each round playing the newest versions with new seeds (a line rated up in an
   earlier round counts as heard); each round's versions are measured too (``by_round``).
4. **Measure.** bench.npc's held-out cases through the same consumer, each with its persona's
   adapter pinned to version 0 and then to the newest version (fetched through the bus, as any
   consumer gets a version), each case with ``--seeds`` seeds (the first is bench.npc's), scored by
   :mod:`npcbus.quality` seed by seed; a figure is the mean over the seeds (``per_seed`` lists them).

One JSON line per figure: ``{"bench": "npc_loop.<figure>", "value": <newest version>, "baseline":
<version 0>, "ratio", "goal", "met", ...}``. Goals: relevance (ratio over shuffled replies) higher
than version 0's; well-formed, distinct and persona consistency not lower and fallback not higher
(by more than one case in a hundred). A line ``npc_loop.experience`` reports how many replies were
rated up and down and how many versions were made.

``--quick`` (CI): two personas, 8 play lines each, one sample, 16 held-out cases of those personas,
one seed, short generations and training.
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
PLAY_FILE = "npc_play.jsonl"
#: a figure of the newest version may trail version 0's by this much and still count as "not worse"
TOLERANCE = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the stand-in player (pure, over embeddings)
# ------------------------------------------------------------------------------------------------


def answers_request(response: dict, answers: list[dict]) -> bool:
    """Does the reply do what the player asked: the intent of one of ``answers`` (the play record's
    ``answers``: the intents and action types of the lines written for that kind of request) and, where
    that answer acts, one of its action types?"""
    from npcbus.quality import _does_what_was_asked

    return any(_does_what_was_asked(response, True, {"intent": a.get("intent"),
                                                     "actions": [{"type": t} for t in a.get("actions", [])]})
               for a in answers)


IN_CHARACTER = ("closest", "above-mean")
COHERENCE = ("written", "off")


def ratings(responses: list[dict | None], valid: list[bool], answers: list[list[dict]], personas: list[str],
            persona_texts: dict[str, str], embed, in_character: str = "closest",
            heard: set | None = None, whole: frozenset[str] | None = None) -> list[float]:
    """Score 1 (thumbs up) or -1 per reply, as a player who asked for something rates the answer: up
    when the reply passed the output checks, its line is well-formed, it does what was asked
    (:func:`answers_request`), it sounds like its own persona (``in_character``: ``closest``, its line
    is closer, all-MiniLM-L6-v2 cosine, to its persona's description than to any other persona's,
    what bench.npc's persona consistency counts; ``above-mean``, closer to its own than to the others'
    on average, a weaker test) and the
    persona has not said that line already (case and punctuation aside) in a reply rated up before it:
    a line heard twice is no longer a good answer. ``heard``: the (persona, line) pairs already rated up
    (earlier rounds), updated in place. ``whole``: where given, also every sentence of the line must
    be one of these (:func:`npcbus.quality.written_sentences`: a reader who spots a line spliced from pieces of
    others, fitted to a model whose lines are the written ones)."""
    import numpy as np

    from npcbus.quality import is_well_formed, sentences, words

    if in_character not in IN_CHARACTER:
        raise ValueError(f"in_character must be one of {IN_CHARACTER}")
    ids = list(persona_texts)
    lines = [(r or {}).get("dialogue", "") if isinstance(r, dict) else "" for r in responses]
    vecs = np.asarray(embed([persona_texts[i] for i in ids] + [x or " " for x in lines]), dtype=np.float64)
    sims = vecs[len(ids):] @ vecs[: len(ids)].T  # [reply, persona]
    out = []
    heard = set() if heard is None else heard
    for i, (resp, ok, wanted, pid) in enumerate(zip(responses, valid, answers, personas, strict=True)):
        k = ids.index(pid)
        others = np.delete(sims[i], k)
        own_voice = len(ids) < 2 or float(sims[i, k]) > float(np.max(others) if in_character == "closest"
                                                               else np.mean(others))
        said = (pid, " ".join(words(lines[i])))
        good = (ok and isinstance(resp, dict) and is_well_formed(lines[i]) and answers_request(resp, wanted)
                and own_voice and said not in heard
                and (whole is None or all(x in whole for x in sentences(lines[i]))))
        if good:
            heard.add(said)
        out.append(1.0 if good else -1.0)
    return out


def average_reports(reports: list[dict]) -> dict:
    """Each figure's value, baseline and ratio averaged over the reports of several seeds (None where
    any seed has none); ``per_seed`` keeps the seeds' own values of the figure's goal number."""
    from npcbus import quality as Q

    out: dict = {"cases": reports[0]["cases"], "errors": sum(r.get("errors", 0) for r in reports)}
    for name in Q.FIGURES:
        fig: dict = {}
        for key in ("value", "baseline", "ratio"):
            vals = [r[name].get(key) for r in reports]
            if key in reports[0][name]:
                fig[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        on = Q.GOALS[name][1]
        fig["per_seed"] = [r[name].get(on) for r in reports]
        out[name] = fig
    return out


def goal_of(name: str) -> str:
    if name == "relevance":
        return "> version 0"
    if name == "fallback":
        return f"<= version 0 + {TOLERANCE}"
    if name in ("in_vocabulary", "action_validity", "player_name"):
        return "report"
    return f">= version 0 - {TOLERANCE}"


def met(name: str, value: float | None, baseline: float | None) -> bool | None:
    if value is None or baseline is None or name in ("in_vocabulary", "action_validity", "player_name"):
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
                      "met": met(name, v, b), "on": on, "cases": after["cases"],
                      **({"per_seed": [None if x is None else round(x, 4) for x in after[name]["per_seed"]],
                          "baseline_per_seed": [None if x is None else round(x, 4) for x in before[name]["per_seed"]]}
                         if "per_seed" in after[name] else {}), **extra})
    return lines


# ------------------------------------------------------------------------------------------------
# the system, in this process
# ------------------------------------------------------------------------------------------------


def play_records(personas: list[str], lines: int | None) -> list[dict]:
    """Up to ``lines`` records of each persona in the play file (all with None), taken in turn from each
    kind of request, none of them held out."""
    from npcbus.evaluate import read_jsonl
    from npcbus.model import persona_of
    from npcbus.npc import DATA_DIR

    held = {(persona_of(r), r["request"].get("player_input")) for r in B.read_records()}
    by: dict[str, dict[str, list[dict]]] = {p: {} for p in personas}
    for r in read_jsonl(DATA_DIR / PLAY_FILE):
        p = persona_of(r)
        if p in by and (p, r["request"].get("player_input")) not in held:
            by[p].setdefault(r.get("situation", ""), []).append(r)
    out: list[dict] = []
    for p in personas:
        groups, mine = list(by[p].values()), []
        for i in range(max((len(g) for g in groups), default=0)):
            mine += [g[i] for g in groups if i < len(g)]
        out += mine[:lines] if lines is not None else mine
    return out


def seeded(records: list[dict], seeds: int, start: int = 0) -> list[tuple[dict, int]]:
    """Each record with seed offsets start .. start+seeds-1 (offset 0: the case's own seed, as bench.npc)."""
    return [(r, k) for k in range(start, start + seeds) for r in records]


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

    async def ask(self, records: list[tuple[dict, int]], versions: dict[str, int | None], max_tokens: int,
                  label: str) -> list[tuple[dict, object]]:
        """Each (record, seed offset) as an NPC request with its persona's adapter at ``versions[persona]``,
        sampled as a player gets it with the case's seed plus the offset."""
        from npcbus.messages import FinalResponse, GenerationError, GenerationRequest
        from npcbus.model import persona_of

        sem = asyncio.Semaphore(self.concurrency)
        progress = B.Progress(label, len(records), max(4, len(records) // 8))

        async def one(rec: dict, offset: int):
            pid = persona_of(rec)
            params = B.case_params(rec, max_tokens)
            params["seed"] = (params["seed"] + 7919 * offset) % 2**32
            req = GenerationRequest(uuid.uuid4().hex, MODEL_ID, mode="npc", npc=rec["request"], adapter=pid,
                                    adapter_version=versions.get(pid), params=params)
            async with sem:
                result = None
                async for ev in self.client.request_stream(self.client.topology.gen_exchange, MODEL_ID, req,
                                                           timeout=600):
                    if isinstance(ev, (FinalResponse, GenerationError)):
                        result = ev
                        break
            progress.step()
            return rec, result

        return list(await asyncio.gather(*[one(r, k) for r, k in records]))

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


def run(*, personas: list[str], lines: int | None, samples: int, seeds: int, cases_path: str | None,
        limit: int | None, max_tokens: int, steps: int, lr: float, concurrency: int, engine: str,
        replies: str | None, timeout_s: float, rehearsal: float = 0.0, in_character: str = "closest",
        rounds: int = 1, coherence: str = "written") -> dict:
    from npcbus import quality as Q
    from npcbus.messages import FinalResponse
    from npcbus.model import persona_of
    from npcbus.npc import load_personas

    model_dir = B.finetuned_model()
    held = B.in_turn([r for r in B.read_records(cases_path) if persona_of(r) in personas], limit)
    play = play_records(personas, lines)
    if not play or not held:
        raise ValueError(f"nothing to play ({len(play)}) or to measure ({len(held)}) for personas {personas}")
    log(f"{len(play)} player lines x {samples} samples to play and rate, {len(held)} held-out cases x {seeds} "
        f"seeds; personas {', '.join(personas)}; {steps} training steps at lr {lr}")
    embedder = Q.Embedder(threads=2)
    texts = {pid: Q.persona_text(p) for pid, p in load_personas().items()}
    whole = Q.written_sentences() if coherence == "written" else None

    async def main():
        work = Path(tempfile.mkdtemp(prefix="bench-npcloop-"))
        async with System(model_dir, personas, steps=steps, lr=lr, concurrency=concurrency, engine=engine,
                          rehearsal=rehearsal, work=work) as sys_:
            t0 = time.monotonic()
            heard: set = set()
            played_all, scores_all, per_round, snapshots = [], [], [], []
            for rnd in range(rounds):
                current = {p: sys_.version(p) for p in personas}
                played = await sys_.ask(seeded(play, samples, rnd * samples), current, max_tokens,
                                        f"play, round {rnd + 1}")
                responses = [ev.response if isinstance(ev, FinalResponse) else None for _, ev in played]
                valid = [isinstance(ev, FinalResponse) and ev.valid for _, ev in played]
                scores = await asyncio.to_thread(ratings, responses, valid, [r.get("answers", []) for r, _ in played],
                                                 [persona_of(r) for r, _ in played], texts, embedder, in_character,
                                                 heard, whole)
                up = {p: sum(1 for (r, _), s in zip(played, scores, strict=True) if s > 0 and persona_of(r) == p)
                      for p in personas}
                log(f"round {rnd + 1}: played {len(played)} turns with versions {current} "
                    f"({time.monotonic() - t0:.1f} s); thumbs up per persona: {up}")
                await sys_.publish_experience(played, scores)
                waiting = [p for p in personas if up[p]]
                end = time.monotonic() + timeout_s
                while any(sys_.version(p) <= current[p] for p in waiting):
                    if time.monotonic() > end:
                        raise TimeoutError(f"no new version within {timeout_s:.0f} s for "
                                           f"{[p for p in waiting if sys_.version(p) <= current[p]]}")
                    await asyncio.sleep(1.0)
                played_all += played
                scores_all += scores
                per_round.append(sum(s > 0 for s in scores))
                snapshots.append({p: sys_.version(p) for p in personas})
            played, scores = played_all, scores_all
            newest = {p: sys_.version(p) for p in personas}
            log(f"new versions after {time.monotonic() - t0:.1f} s: {newest}")
            measured = {"version 0": await sys_.ask(seeded(held, seeds), dict.fromkeys(personas, 0), max_tokens,
                                                    "version 0")}
            for rnd, versions in enumerate(snapshots[:-1], 1):  # the versions of the rounds before the last
                measured[f"round {rnd}"] = await sys_.ask(seeded(held, seeds), versions, max_tokens, f"round {rnd}")
            measured["newest"] = await sys_.ask(seeded(held, seeds), newest, max_tokens, "newest")
            return played, scores, per_round, newest, measured

    played, scores, per_round, newest, measured = asyncio.run(main())
    if replies:
        B.write_replies(replies, {"play": played, **measured})
    vocab = Q.build_vocabulary()
    reports = {}
    for name, results in measured.items():
        per_seed = []
        for k in range(seeds):
            cases, errors = B.to_cases(results[k * len(held): (k + 1) * len(held)])
            per_seed.append({**Q.measure(cases, embedder, vocab), "errors": errors})
        reports[name] = average_reports(per_seed)
    return {"reports": reports, "newest": newest, "thumbs_up": sum(s > 0 for s in scores),
            "thumbs_down": sum(s < 0 for s in scores), "played": len(played), "cases": len(held),
            "seeds": seeds, "samples": samples, "rehearsal": rehearsal, "in_character": in_character,
            "rounds": rounds, "thumbs_up_per_round": per_round, "coherence": coherence}


def _loop_default_rehearsal() -> float:
    from aggregator.loop import LoopSettings

    return LoopSettings.from_env({}).rehearsal


def main(argv: list[str] | None = None) -> int:
    from npcbus.npc import load_personas

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--personas", default=None, help="comma-separated persona ids (default: all; --quick: two)")
    p.add_argument("--lines", type=int, default=None,
                   help="play-set lines per persona, taken in turn from each kind of request (default: all 63; --quick 8)")
    p.add_argument("--samples", type=int, default=None,
                   help="replies sampled (seeds) per play-set line (default 3; --quick 1)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per held-out case; the figures are their means (default 3; --quick 1)")
    p.add_argument("--cases", default=None, help="held-out NPC records (default: bench.npc's)")
    p.add_argument("--limit", type=int, default=None, help="held-out cases, taken in turn from each persona "
                                                            "(default: all of the personas'; --quick 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation length (default 256; --quick 160)")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default 30; --quick 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="training learning rate (default 1e-3)")
    p.add_argument("--rehearsal", type=float, default=None,
                   help="the loop's LOOP_REHEARSAL: written turns of the persona added per thumbs-up reply "
                        "(default: the loop's default, 0)")
    p.add_argument("--in-character", default="closest", choices=IN_CHARACTER,
                   help="the stand-in player's test of a persona's voice: closest (its own description is the "
                        "nearest, the default) or above-mean (nearer its own than the others' on average)")
    p.add_argument("--coherence", default="written", choices=COHERENCE,
                   help="written (default): a reply is rated up only if every sentence of its line is a sentence of "
                        "the written lines (the default model's; use off for a model that writes its own)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of play, rating and training, each from the newest versions (default 1)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16; --quick 8)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"), help="inference engine")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the new versions")
    p.add_argument("--replies", metavar="FILE.jsonl", help="write every reply (play, version 0, newest) here")
    args = p.parse_args(argv)
    personas = args.personas.split(",") if args.personas else list(load_personas())[: 2 if args.quick else None]
    from npcbus.logs import setup_logging

    setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "warning"))
    t0 = time.monotonic()
    result = run(personas=personas, lines=args.lines or (8 if args.quick else None),
                 samples=args.samples or (1 if args.quick else 3), seeds=args.seeds or (1 if args.quick else 3),
                 cases_path=args.cases,
                 limit=args.limit if args.limit is not None else (16 if args.quick else None),
                 max_tokens=args.max_tokens or (160 if args.quick else 256),
                 steps=args.steps or (10 if args.quick else 30), lr=args.lr,
                 rehearsal=args.rehearsal if args.rehearsal is not None else _loop_default_rehearsal(),
                 concurrency=args.concurrency or (8 if args.quick else 16), engine=args.engine,
                 replies=args.replies, timeout_s=args.timeout, in_character=args.in_character,
                 rounds=max(1, args.rounds), coherence=args.coherence)
    log(B.table({"variants": result["reports"], "reference": None}))
    log(f"total {time.monotonic() - t0:.1f} s")
    extra = {"versions": result["newest"], "rounds": result["rounds"], "coherence": result["coherence"],
             "seeds": result["seeds"],
             "samples": result["samples"],
             "in_character": result["in_character"], "rehearsal": result["rehearsal"], "quick": args.quick}
    print(json.dumps({"bench": "npc_loop.experience", "value": result["thumbs_up"], "baseline": result["played"],
                      "ratio": round(result["thumbs_up"] / result["played"], 4), "goal": "report", "met": None,
                      "thumbs_down": result["thumbs_down"], "per_round": result["thumbs_up_per_round"], **extra}),
          flush=True)
    from npcbus import quality as Q

    reports = result["reports"]
    for line in figure_lines(reports["version 0"], reports["newest"], **extra):
        if len(reports) > 2:  # several rounds: the figure of version 0, each round's versions, the newest
            name = line["bench"].split(".", 1)[1]
            vals = [rep[name].get(Q.GOALS[name][1]) for rep in reports.values()]
            line["by_round"] = [None if v is None else round(v, 4) for v in vals]
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
