"""NPC quality benchmark: what a player reads, through the real inference consumer.

    python -m bench.npc [--quick] [--cases FILE] [--limit N] [--max-tokens N] [--engine auto|vllm|hf]
                        [--pretrained | --no-pretrained] [--greedy] [--replies FILE.jsonl]

Held-out NPC turns (``npcbus/data_files/npc_heldout.jsonl``: player lines that no training record
contains) go as ``npc`` generation requests over the RabbitMQ at ``AMQP_URL``, in a throw-away
namespace, to the inference consumer (:class:`workers.infer_worker.InferenceWorker`) on the vLLM
engine when it is importable, else the transformers engine, on the project's offline default
model. Each case's final response (after validation, fallback and rails: what the player reads)
is scored by :mod:`npcbus.quality`. Each case is generated with the sampling a player gets (the NPC
request's generation defaults: temperature 0.7, top-p 0.95, top-k 50) and a seed of its own (from
its persona and player line), so a run is repeatable; ``--greedy`` decodes greedily instead.

Variants, each over the same cases:

- ``pretrained``: the default model before fine-tuning (the same build with ``sft_steps=0``:
  pre-training only), no adapter;
- ``finetuned``: the default model as built (pre-training + fine-tuning on NPC turns), no adapter;
- ``finetuned+persona``: the same model with each case's persona adapter
  (``<model dir>/personas/<persona id>/``, as the build writes them). The consumer serves them
  from an adapter manifest (``npcbus.adapters.AdapterManifest``, what ``ADAPTER_MANIFEST`` names
  for ``npcbus worker infer``) whose entries, named by persona id, point at those folders: the
  consumer reads a manifest entry's local folder without a fetch over the bus.

With ``BASE_MODEL`` or ``MODEL_DIR`` set, that model is the fine-tuned one; ``pretrained`` is
built only for the offline default model (it needs its build parameters); ``--no-pretrained``
leaves it out (e.g. ``BASE_MODEL=DIR --no-pretrained`` measures another build of the default model
as it is).

One JSON line per figure and variant, ``{"bench": "npc.<figure>", "variant": ..., "value",
"baseline", "ratio", "goal", "met", ...}``. Goals (``goal_on`` says which number they are on):
well-formed >= 0.95, fallback <= 0.02, distinct >= 0.90, relevance ratio >= 1.2 (against the
same replies shuffled across cases), persona consistency >= 0.8, action validity 1.0;
in-vocabulary, request match (the reply has the intent of the case's reference and, where it
acts, the same kind of action) and player name (of the replies that name a player, the share that
name the right one; ``naming``: the share that name one at all) are reported. Baselines, measured in the same run: the shuffled
replies for relevance, chance (1 / personas) for persona consistency, the same replies judged
against other cases' references for request match, and for the other figures the held-out
reference responses of the same cases. ``compared_with`` gives the same figure of the variant that
this one improves on (fine-tuned against pre-trained, persona adapter against no adapter). A table
of every variant (and the references) goes to stderr.

``--quick`` (CI): 16 cases, two per persona, short generations, and no ``pretrained`` variant
unless ``--pretrained`` is given (its build takes about 3 minutes more). The models are built once
and cached (``.npcbus/test-model`` and ``.npcbus/bench-npc-pretrained``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import engine_env, parser

engine_env()

MODEL_ID = "npcbus-default"
ROOT = Path(__file__).resolve().parent.parent
PRETRAINED_DIR = ROOT / ".npcbus" / "bench-npc-pretrained"
HELDOUT = "npc_heldout.jsonl"
STAND_IN = "npc_dialogue.jsonl"  # until the held-out file exists


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# cases and variants
# ------------------------------------------------------------------------------------------------


def default_cases_path() -> Path:
    from npcbus.npc import DATA_DIR

    return DATA_DIR / HELDOUT if (DATA_DIR / HELDOUT).is_file() else DATA_DIR / STAND_IN


def read_records(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """NPC records (``{"request", "response", ...}``); with ``limit``, that many taken in turn
    from each persona (file order within a persona), so that a short run covers every persona."""
    from npcbus.evaluate import read_jsonl

    recs = [r for r in read_jsonl(path or default_cases_path()) if isinstance(r.get("request"), dict)]
    return in_turn(recs, limit)


def in_turn(records: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` records, taken in turn from each persona (file order within a persona)."""
    from npcbus.model import persona_of

    if limit is None or limit >= len(records):
        return list(records)
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(persona_of(r), []).append(r)
    out: list[dict] = []
    while len(out) < limit:
        for group in by.values():
            if group and len(out) < limit:
                out.append(group.pop(0))
    return out


@dataclasses.dataclass
class Variant:
    name: str
    model_dir: str
    personas: bool = False            # serve each case's persona adapter
    compared_with: str | None = None  # the variant this one improves on


def finetuned_model() -> str:
    from npcbus.model import ensure_test_model, resolve_base_model

    if os.environ.get("BASE_MODEL") or os.environ.get("MODEL_DIR"):
        return resolve_base_model()
    return str(ensure_test_model())


def pretrained_model(finetuned_dir: str) -> str | None:
    """The same default-model build before fine-tuning (``sft_steps=0``, no persona adapters), or
    None when there is none to build (not a default-model build; no ``sft_steps`` parameter)."""
    from npcbus import model as M

    stamp = M.read_stamp(finetuned_dir)
    fields = {f.name for f in dataclasses.fields(M.DefaultModelParams)}
    if stamp is None or "sft_steps" not in fields:
        log(f"no 'pretrained' variant: {finetuned_dir} is not a default-model build with a fine-tuning step")
        return None
    params = {k: v for k, v in (stamp.get("params") or {}).items() if k in fields}
    params["sft_steps"] = 0
    if "persona_steps" in fields:
        params["persona_steps"] = 0
    if not M.is_current(PRETRAINED_DIR, **params):
        log(f"building the model before fine-tuning in {PRETRAINED_DIR} (once; pre-training only) ...")
    return str(M.ensure_default_model(PRETRAINED_DIR, **params))


def persona_adapters(model_dir: str) -> dict[str, str]:
    """Persona id -> its adapter folder in a default-model build (``<model_dir>/personas/<id>/``)."""
    root = Path(model_dir) / "personas"
    if not root.is_dir():
        return {}
    return {d.name: str(d) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}


def plan_variants(base_model: str | None = None, *, pretrained: bool = True) -> list[Variant]:
    """The variants to run: ``base_model`` (default: the fine-tuned default model), before
    fine-tuning when it is a default build, and with its persona adapters when it has them."""
    ft = base_model or finetuned_model()
    out: list[Variant] = []
    pre = pretrained_model(ft) if pretrained else None
    if pre is not None:
        out.append(Variant("pretrained", pre))
    out.append(Variant("finetuned", ft, compared_with="pretrained" if pre else None))
    if persona_adapters(ft):
        out.append(Variant("finetuned+persona", ft, personas=True, compared_with="finetuned"))
    else:
        log(f"no 'finetuned+persona' variant: {ft} has no persona adapters (personas/<id>/)")
    return out


# ------------------------------------------------------------------------------------------------
# collecting responses through the consumer
# ------------------------------------------------------------------------------------------------


def engine_kind(choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


class Progress:
    """A log line every ``every`` cases with the rate and the time left."""

    def __init__(self, label: str, total: int, every: int):
        self.label, self.total, self.every = label, total, max(1, every)
        self.done = 0
        self.t0 = time.monotonic()

    def step(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            el = time.monotonic() - self.t0
            rate = self.done / el if el > 0 else float("inf")
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log(f"  [{self.label}] {self.done}/{self.total} cases, {rate:.2f} cases/s, ETA {eta:.0f} s")


def case_params(rec: dict, max_tokens: int, greedy: bool = False) -> dict:
    """Generation parameters of a case: the NPC request's defaults (what a player gets) with a seed
    of the case's own (from its persona and player line, so that it is the same in any subset), or
    greedy decoding."""
    import zlib

    from npcbus.model import persona_of

    if greedy:
        return {"max_tokens": max_tokens, "temperature": 0.0}
    key = f"{persona_of(rec)}\n{rec['request'].get('player_input', '')}"
    return {"max_tokens": max_tokens, "seed": zlib.crc32(key.encode("utf-8"))}


async def collect(model_dir: str, variants: list[Variant], records: list[dict], *, max_tokens: int,
                  concurrency: int, engine: str = "auto", greedy: bool = False
                  ) -> dict[str, list[tuple[dict, object]]]:
    """Run every case of every variant of one model through the consumer over the bus; returns
    variant name -> [(record, FinalResponse or GenerationError)] in the records' order. One engine
    (and one consumer) serves the model's variants, one variant after the other."""
    from bench.inference import cleanup
    from npcbus.adapters import AdapterManifest
    from npcbus.bus import Bus
    from npcbus.messages import FinalResponse, GenerationError, GenerationRequest
    from npcbus.model import persona_of
    from npcbus.settings import BusSettings
    from workers.engines import make_engine
    from workers.infer_worker import InferenceWorker, InferSettings

    adapters = persona_adapters(model_dir) if any(v.personas for v in variants) else {}
    work = Path(tempfile.mkdtemp(prefix="bench-npc-"))
    manifest = None
    if adapters:
        manifest = AdapterManifest(work / "adapters.json")
        for pid, path in adapters.items():
            manifest.register(pid, path=path, persona_id=pid, version=1,
                              description="persona adapter of the default model build")
    settings = InferSettings.from_env({}, engine=engine_kind(engine), max_concurrency=concurrency,
                                      max_loras=max(2, len(adapters) + 1), dtype="float32", max_model_len=2048,
                                      heartbeat_interval_s=5.0, adapter_cache_dir=str(work / "adapter-cache"))
    eng = make_engine(settings, model_dir)
    t0 = time.monotonic()
    await eng.start()
    log(f"engine {eng.name} on {model_dir} started in {time.monotonic() - t0:.1f} s")
    ns = f"bench-npc-{uuid.uuid4().hex[:8]}"
    bus_settings = BusSettings.from_env(dict(os.environ, NPCBUS_NAMESPACE=ns))
    wbus = Bus(bus_settings, name="bench-npc-consumer")
    client = Bus(bus_settings, name="bench-npc-requester")
    worker = None
    out: dict[str, list[tuple[dict, object]]] = {}
    try:
        await wbus.connect()
        await wbus.declare_topology(queues=[])
        worker = InferenceWorker(wbus, eng, settings, model_id=MODEL_ID, worker_id="bench-npc", manifest=manifest)
        await worker.start()
        await client.connect()
        await client.reply_queue()
        sem = asyncio.Semaphore(concurrency)

        async def one(rec: dict, adapter: str | None, progress: Progress):
            req = GenerationRequest(uuid.uuid4().hex, MODEL_ID, mode="npc", npc=rec["request"], adapter=adapter,
                                    params=case_params(rec, max_tokens, greedy))
            async with sem:
                result = None
                async for ev in client.request_stream(client.topology.gen_exchange, MODEL_ID, req, timeout=600):
                    if isinstance(ev, (FinalResponse, GenerationError)):
                        result = ev
                        break
            progress.step()
            return rec, result

        for v in variants:
            progress = Progress(v.name, len(records), max(4, len(records) // 8))
            t = time.monotonic()
            out[v.name] = list(await asyncio.gather(*[
                one(r, persona_of(r) if v.personas and persona_of(r) in adapters else None, progress)
                for r in records]))
            errors = sum(isinstance(x, GenerationError) for _, x in out[v.name])
            log(f"  [{v.name}] {len(records)} cases in {time.monotonic() - t:.1f} s"
                + (f", {errors} generation errors" if errors else ""))
    finally:
        if worker is not None:
            await worker.stop(drain_timeout_s=5)
        await cleanup(wbus, ns)
        await client.close()
        await wbus.close()
        await eng.close()
    return out


def to_cases(results: list[tuple[dict, object]]) -> tuple[list, int]:
    """:class:`npcbus.quality.Case` per result (a generation error is a failed, empty turn), and
    the number of errors."""
    from npcbus.messages import FinalResponse
    from npcbus.quality import case_from_request

    cases, errors = [], 0
    for rec, ev in results:
        if isinstance(ev, FinalResponse) and isinstance(ev.response, dict):
            cases.append(case_from_request(rec["request"], ev.response, ev.valid, rec.get("response")))
        else:
            errors += 1
            cases.append(case_from_request(rec["request"], {"dialogue": "", "actions": []}, False, rec.get("response")))
    return cases, errors


# ------------------------------------------------------------------------------------------------
# the measurement
# ------------------------------------------------------------------------------------------------


def write_replies(path: str | Path, results: dict[str, list[tuple[dict, object]]]) -> None:
    """Every reply as a player read it, one JSON line per variant and case (to read, not to score)."""
    from npcbus.messages import FinalResponse
    from npcbus.model import persona_of

    with open(path, "w", encoding="utf-8") as f:
        for vname, pairs in results.items():
            for rec, ev in pairs:
                final = isinstance(ev, FinalResponse)
                f.write(json.dumps({
                    "variant": vname, "persona": persona_of(rec), "player": rec["request"].get("player_input"),
                    "reply": (ev.response or {}) if final else None, "valid": ev.valid if final else False,
                    "error": None if final else getattr(ev, "code", "no answer"),
                    "raw": ev.text if final and not ev.valid else None,
                    "reference": (rec.get("response") or {}).get("dialogue")}, ensure_ascii=False) + "\n")


def measure(records: list[dict], variants: list[Variant], *, max_tokens: int, concurrency: int,
            engine: str = "auto", embed_threads: int = 2, replies: str | None = None, greedy: bool = False) -> dict:
    """Every figure of every variant over ``records`` (and of the records' reference responses):
    ``{"variants": {name: npcbus.quality.measure(...) + errors}, "reference": ..., ...}``."""
    from npcbus import quality as Q

    by_model: dict[str, list[Variant]] = {}
    for v in variants:
        by_model.setdefault(v.model_dir, []).append(v)

    async def run_all():
        got: dict[str, list] = {}
        for model_dir, vs in by_model.items():
            got.update(await collect(model_dir, vs, records, max_tokens=max_tokens, concurrency=concurrency,
                                     engine=engine, greedy=greedy))
        return got

    t0 = time.monotonic()
    results = asyncio.run(run_all())
    gen_s = time.monotonic() - t0
    if replies:
        write_replies(replies, results)
    # the embedding runs after the engines are closed, off any event loop
    embedder = Q.Embedder(threads=embed_threads)
    vocab = Q.build_vocabulary()
    reports: dict[str, dict] = {}
    for v in variants:
        cases, errors = to_cases(results[v.name])
        reports[v.name] = {**Q.measure(cases, embedder, vocab), "errors": errors}
    ref_cases = [Q.case_from_request(r["request"], r["response"], True, r["response"]) for r in records
                 if "response" in r]
    reference = Q.measure(ref_cases, embedder, vocab) if ref_cases else None
    personas = len({c.persona_id for c in ref_cases}) or None
    return {"variants": reports, "reference": reference, "personas": personas, "generation_s": round(gen_s, 1),
            "embedding_s": round(time.monotonic() - t0 - gen_s, 1), "compared_with":
            {v.name: v.compared_with for v in variants}}


def baseline_of(name: str, report: dict, result: dict) -> tuple[float | None, str]:
    if name == "relevance":
        return report["relevance"].get("baseline"), "the same replies shuffled across cases"
    if name == "request_match":
        return report["request_match"].get("baseline"), "the same replies judged against other cases' references"
    if name == "persona_consistency":
        n = result.get("personas")
        return (1.0 / n if n else None), "chance (1 / personas)"
    ref = result.get("reference")
    return (ref[name]["value"] if ref else None), "the reference responses of the same cases"


def figure_lines(result: dict, **extra) -> list[dict]:
    """The JSON lines of a :func:`measure` result, one per figure and variant."""
    from npcbus import quality as Q

    lines = []
    variants = result["variants"]
    for vname, rep in variants.items():
        for name in Q.FIGURES:
            fig = rep[name]
            value = fig.get("value")
            baseline, baseline_is = baseline_of(name, rep, result)
            ratio = fig.get("ratio") if name == "relevance" else (
                value / baseline if value is not None and baseline else None)
            goal, on = Q.GOALS[name]
            line = {"bench": f"npc.{name}", "variant": vname,
                    "value": None if value is None else round(value, 4),
                    "baseline": None if baseline is None else round(baseline, 4),
                    "ratio": None if ratio is None else round(ratio, 4), "goal": goal,
                    "met": Q.goal_met(name, value, ratio), "goal_on": on, "baseline_is": baseline_is}
            if "naming" in fig:
                line["naming"] = None if fig["naming"] is None else round(fig["naming"], 4)
            other = result["compared_with"].get(vname)
            if other in variants:
                o = variants[other][name]
                ox = o.get("ratio") if on == "ratio" else o.get("value")
                line["compared_with"] = {"variant": other, on: None if ox is None else round(ox, 4)}
            line.update(cases=rep["cases"], errors=rep["errors"], **extra)
            lines.append(line)
    return lines


def run(cases_path: str | None = None, *, limit: int | None = None, max_tokens: int = 256, concurrency: int = 16,
        engine: str = "auto", base_model: str | None = None, pretrained: bool = True,
        replies: str | None = None, greedy: bool = False) -> dict:
    """The whole measurement (used by ``python -m bench.npc`` and ``npcbus eval --npc-quality``)."""
    records = read_records(cases_path, limit)
    if not records:
        raise ValueError("no NPC records to run")
    variants = plan_variants(base_model, pretrained=pretrained)
    log(f"{len(records)} cases from {cases_path or default_cases_path()}, variants: "
        f"{', '.join(v.name for v in variants)}; engine {engine_kind(engine)}, max_tokens {max_tokens}")
    result = measure(records, variants, max_tokens=max_tokens, concurrency=concurrency, engine=engine,
                     replies=replies, greedy=greedy)
    result.update(cases_file=str(cases_path or default_cases_path()), engine=engine_kind(engine), max_tokens=max_tokens,
                  sampling="greedy" if greedy else "player defaults, seed per case")
    return result


def table(result: dict) -> str:
    from npcbus import quality as Q

    rows = dict(result["variants"])
    if result.get("reference"):
        rows["(reference)"] = result["reference"]
    return Q.format_table(rows)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help=f"NPC records (default: npcbus/data_files/{HELDOUT})")
    p.add_argument("--limit", type=int, default=None, help="at most this many cases, taken in turn from each persona")
    p.add_argument("--max-tokens", type=int, default=None, help="generation length (default 256; --quick 160)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16; --quick 8)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "hf"), help="inference engine")
    p.add_argument("--pretrained", action="store_true", help="with --quick: also the model before fine-tuning")
    p.add_argument("--no-pretrained", action="store_true",
                   help="without the model before fine-tuning (e.g. to measure another build: BASE_MODEL=DIR)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the sampling a player gets")
    p.add_argument("--replies", metavar="FILE.jsonl", help="also write every reply (variant, persona, player line, "
                   "response, valid, the raw output of an invalid one, reference line) here, to read what the player reads")
    args = p.parse_args(argv)
    limit = args.limit if args.limit is not None else (16 if args.quick else None)
    max_tokens = args.max_tokens or (160 if args.quick else 256)
    concurrency = args.concurrency or (8 if args.quick else 16)
    from npcbus.logs import setup_logging

    setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "warning"))
    t0 = time.monotonic()
    result = run(args.cases, limit=limit, max_tokens=max_tokens, concurrency=concurrency, engine=args.engine,
                 replies=args.replies, greedy=args.greedy, pretrained=(args.pretrained or not args.quick) and not args.no_pretrained)
    log(table(result))
    log(f"generation {result['generation_s']} s, embedding {result['embedding_s']} s, "
        f"total {time.monotonic() - t0:.1f} s")
    for line in figure_lines(result, engine=result["engine"], max_tokens=max_tokens, sampling=result["sampling"],
                             quick=args.quick):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
