"""``npcbus data build``: a streaming, weighted mix of sources into a cleaned, deduplicated data set.

Pipeline, one document at a time (memory does not grow with the input):

    sources --(weighted pick)--> clean --> length / language / quality filters
            --> exact duplicates --> MinHash LSH near duplicates (``--use-minhash``) --> JSONL shards

The weighted pick is deterministic: the next document comes from the source furthest below its
target share of the *kept* output (documents, or characters with ``--weight-by chars``), so the
output mix holds its weights however unevenly the filters drop documents from each source, for as
long as every source still has documents. ``--max-total`` caps the number of kept documents; the
build stops reading as soon as it is reached.

Output: ``OUT/data-00000.jsonl``, ... (records ``{"text", "source", "id", "lang"}``) and
``OUT/stats.json``: documents read, kept and dropped by reason, overall and per source, the
target and achieved shares, and the deduplication parameters. ``read == kept + sum(dropped)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npcbus.data.sources import HUB_TIMEOUT_S, Doc, SourceError, SourceSpec, open_source, parse_source
from npcbus.data.text import FilterConfig, clean_text, filter_reason

SHARD_PREFIX = "data-"
STATS_FILE = "stats.json"


@dataclass
class DedupConfig:
    exact: bool = True
    use_minhash: bool = False
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    capacity: int = 500_000
    seed: int = 1


@dataclass
class BuildConfig:
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    max_total: int | None = None
    max_read: int | None = None
    weight_by: str = "docs"  # docs | chars
    shard_size: int = 10_000
    batch_size: int = 256
    chunk_chars: int = 8000
    hub_timeout: float = HUB_TIMEOUT_S
    overwrite: bool = False
    progress: bool = True


@dataclass
class Stream:
    """One input of the mix: a name, a weight and an iterator of :class:`Doc` (or plain strings)."""

    name: str
    weight: float
    docs: Iterable[Doc | str]
    info: dict = field(default_factory=dict)


class MixScheduler:
    """Deterministic weighted choice: the active source with the largest deficit against its share."""

    def __init__(self, weights: dict[str, float]):
        total = sum(w for w in weights.values() if w > 0)
        if total <= 0:
            raise ValueError("at least one source needs a weight above 0")
        self.target = {k: (w / total if w > 0 else 0.0) for k, w in weights.items()}
        self.amount = dict.fromkeys(weights, 0.0)  # kept + pending, in docs or chars
        self.active = [k for k, w in weights.items() if w > 0]

    def pick(self) -> str | None:
        if not self.active:
            return None
        total = sum(self.amount.values()) + 1.0
        return max(self.active, key=lambda k: (self.target[k] * total - self.amount[k], self.target[k]))

    def add(self, name: str, amount: float) -> None:
        self.amount[name] += amount

    def exhausted(self, name: str) -> None:
        if name in self.active:
            self.active.remove(name)


class ShardWriter:
    """JSONL shards of ``shard_size`` records, each written under a temporary name and then renamed."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir = out_dir
        self.shard_size = max(1, shard_size)
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self._tmp: Path | None = None

    def write(self, rec: dict) -> None:
        if self._f is None:
            idx = len(self.shards)
            self._tmp = self.out_dir / f"{SHARD_PREFIX}{idx:05d}.jsonl.tmp"
            self._f = open(self._tmp, "w", encoding="utf-8")
            self._n = 0
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._n += 1
        if self._n >= self.shard_size:
            self._close()

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        assert self._tmp is not None
        final = self._tmp.with_suffix("")  # drop .tmp
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "records": self._n})
        self._f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob(f"{SHARD_PREFIX}*.jsonl*"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards ({old[0].name}, ...); pass --overwrite")
    for p in old:
        p.unlink()
    (out_dir / STATS_FILE).unlink(missing_ok=True)


def build_from_streams(streams: list[Stream], out_dir: str | os.PathLike, cfg: BuildConfig | None = None) -> dict:
    """Run the build over already opened streams; returns the stats (also written to stats.json)."""
    cfg = cfg or BuildConfig()
    if cfg.weight_by not in ("docs", "chars"):
        raise ValueError("weight_by must be docs or chars")
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique: {names}")
    out = Path(out_dir)
    _prepare_out(out, cfg.overwrite)

    sched = MixScheduler({s.name: s.weight for s in streams})
    iters: dict[str, Iterator[Doc | str]] = {s.name: iter(s.docs) for s in streams}
    per: dict[str, dict] = {
        s.name: {**s.info, "weight": s.weight, "read": 0, "kept": 0, "kept_chars": 0, "dropped": Counter(),
                 "exhausted": False}
        for s in streams
    }
    dropped: Counter[str] = Counter()
    exact = None
    near = None
    if cfg.dedup.exact:
        from npcbus.data.dedup import ExactDuplicateFilter

        exact = ExactDuplicateFilter(capacity=max(cfg.dedup.capacity * 4, 1))
    if cfg.dedup.use_minhash:
        from npcbus.data.dedup import NearDuplicateIndex

        near = NearDuplicateIndex(
            threshold=cfg.dedup.threshold, num_perm=cfg.dedup.num_perm, ngram=cfg.dedup.ngram,
            seed=cfg.dedup.seed, capacity=cfg.dedup.capacity,
        )
    writer = ShardWriter(out, cfg.shard_size)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_total, unit="doc", desc="data build (kept)", file=sys.stderr, mininterval=0.5,
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    read = kept = 0
    stopped = "exhausted"
    by_chars = cfg.weight_by == "chars"

    def drop(name: str, reason: str) -> None:
        dropped[reason] += 1
        per[name]["dropped"][reason] += 1

    def room() -> int | None:
        return None if cfg.max_total is None else cfg.max_total - kept

    try:
        while sched.active:
            r = room()
            if r is not None and r <= 0:
                stopped = "max_total"
                break
            if cfg.max_read is not None and read >= cfg.max_read:
                stopped = "max_read"
                break
            batch: list[tuple[str, Doc, str]] = []
            while sched.active and len(batch) < cfg.batch_size:
                if r is not None and len(batch) >= r:
                    break
                if cfg.max_read is not None and read >= cfg.max_read:
                    break
                name = sched.pick()
                assert name is not None
                try:
                    item = next(iters[name])
                except StopIteration:
                    sched.exhausted(name)
                    per[name]["exhausted"] = True
                    continue
                read += 1
                per[name]["read"] += 1
                doc = Doc(item, name, str(per[name]["read"] - 1)) if isinstance(item, str) else item
                if doc.text is None:
                    drop(name, doc.reason or "bad_record")
                    continue
                text = clean_text(doc.text)
                reason, lang = filter_reason(text, cfg.filters)
                if reason is None and exact is not None and exact.seen(text):
                    reason = "duplicate_exact"
                if reason:
                    drop(name, reason)
                    continue
                batch.append((name, Doc(text, name, doc.id), lang))
                sched.add(name, len(text) if by_chars else 1)
            if not batch:
                continue
            keep = near.add_batch([d.text for _, d, _ in batch]) if near is not None else [True] * len(batch)
            for (name, doc, lang), k in zip(batch, keep, strict=True):
                assert doc.text is not None
                if not k:
                    drop(name, "duplicate_near")
                    sched.add(name, -(len(doc.text) if by_chars else 1))
                    continue
                rec = {"text": doc.text, "source": name, "id": doc.id}
                if lang:
                    rec["lang"] = lang
                writer.write(rec)
                kept += 1
                per[name]["kept"] += 1
                per[name]["kept_chars"] += len(doc.text)
            if bar is not None:
                bar.n = kept
                bar.set_postfix(read=read, dropped=read - kept, refresh=False)
                bar.refresh()
        else:
            stopped = "exhausted"
    finally:
        shards = writer.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0

    unit = "kept_chars" if by_chars else "kept"
    total_unit = sum(p[unit] for p in per.values()) or 1
    shares = {n: per[n][unit] / total_unit for n in per}
    for n, p in per.items():
        p["dropped"] = dict(sorted(p["dropped"].items()))
        p["target_share"] = round(sched.target[n], 6)
        p["share"] = round(shares[n], 6)
    stats = {
        "read": read,
        "kept": kept,
        "dropped_total": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "stopped": stopped,
        "weights": {
            "by": cfg.weight_by,
            "target": {n: round(sched.target[n], 6) for n in per},
            "actual": {n: round(shares[n], 6) for n in per},
            "max_abs_error": round(max((abs(shares[n] - sched.target[n]) for n in per), default=0.0), 6),
        },
        "sources": per,
        "dedup": {
            "exact": cfg.dedup.exact,
            "minhash": near.params if near is not None else None,
            "index_size": len(near) if near is not None else 0,
            "index_evicted": near.evicted if near is not None else 0,
        },
        "filters": {**asdict(cfg.filters), "languages": list(cfg.filters.languages)},
        "max_total": cfg.max_total,
        "shards": shards,
        "elapsed_s": round(elapsed, 3),
        "docs_per_s": round(read / elapsed, 1) if elapsed > 0 else None,
    }
    tmp = out / (STATS_FILE + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATS_FILE)
    return stats


def parse_weights(text: str | None, names: list[str]) -> dict[str, float]:
    """``0.5,0.3,0.2`` (in source order) or ``books=0.5,web=0.5`` -> weight per source name."""
    if not text:
        return dict.fromkeys(names, 1.0)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out: dict[str, float] = {}
    if all("=" in p for p in parts):
        for p in parts:
            k, v = p.split("=", 1)
            if k.strip() not in names:
                raise ValueError(f"--weights names unknown source {k.strip()!r} (sources: {', '.join(names)})")
            out[k.strip()] = float(v)
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"--weights gives no weight for {', '.join(missing)}")
    else:
        if len(parts) != len(names):
            raise ValueError(f"--weights has {len(parts)} values for {len(names)} sources")
        out = {n: float(v) for n, v in zip(names, parts, strict=True)}
    if any(w < 0 for w in out.values()) or not any(w > 0 for w in out.values()):
        raise ValueError("weights must be >= 0 with at least one above 0")
    return out


def build(specs: list[SourceSpec], out_dir: str | os.PathLike, cfg: BuildConfig | None = None) -> dict:
    """Open every source (hub sources fail here, fast, when the hub is unreachable) and build."""
    cfg = cfg or BuildConfig()
    streams = []
    for s in specs:
        docs = open_source(s, chunk_chars=cfg.chunk_chars, hub_timeout=cfg.hub_timeout) if s.weight > 0 else iter(())
        streams.append(Stream(s.name, s.weight, docs, info=s.describe()))
    return build_from_streams(streams, out_dir, cfg)


def format_stats(stats: dict) -> str:
    lines = [
        f"read {stats['read']}  kept {stats['kept']}  dropped {stats['dropped_total']}  "
        f"(stopped: {stats['stopped']}, {stats['elapsed_s']} s, {stats['docs_per_s']} docs/s)",
    ]
    if stats["dropped"]:
        lines.append("dropped by reason: " + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()))
    lines.append(f"{'source':<20} {'read':>9} {'kept':>9} {'share':>7} {'target':>7}  dropped")
    for name, p in stats["sources"].items():
        dr = ", ".join(f"{k} {v}" for k, v in p["dropped"].items()) or "-"
        lines.append(f"{name[:20]:<20} {p['read']:>9} {p['kept']:>9} {p['share']:>7.3f} {p['target_share']:>7.3f}  {dr}")
    lines.append(f"shards: {len(stats['shards'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "Source spec: [NAME=]LOCATION, where LOCATION is a folder of text files, a .jsonl(.gz) file " \
               "or folder, a datasets save_to_disk folder, or hf:REPO[:CONFIG] (also a bare hub name such as " \
               "openwebtext or wikipedia)."
    p.add_argument("--source", "-s", action="append", required=True, metavar="SPEC", help="An input; repeat for a mix.")
    p.add_argument("--out", "-o", required=True, help="Output folder for JSONL shards and stats.json.")
    p.add_argument("--weights", help="Mix weights: 0.5,0.3,0.2 in source order, or name=0.5,name2=0.5 (default: equal).")
    p.add_argument("--weight-by", choices=("docs", "chars"), default="docs", help="What the weights share out.")
    p.add_argument("--max-total", type=int, help="Stop after this many kept documents.")
    p.add_argument("--max-read", type=int, help="Stop after reading this many documents (a guard for endless sources).")
    p.add_argument("--shard-size", type=int, default=10_000, help="Documents per output shard.")
    p.add_argument("--text-field", default="text", help="Text field of JSONL records and data set columns.")
    p.add_argument("--split", default="train", help="Split of saved or hub data sets.")
    p.add_argument("--chunk-chars", type=int, default=8000, help="Document size when cutting text files (e-books).")
    p.add_argument("--min-chars", type=int, default=200, help="Drop shorter documents (after cleaning).")
    p.add_argument("--max-chars", type=int, default=200_000, help="Drop longer documents.")
    p.add_argument("--min-words", type=int, default=20, help="Drop documents with fewer words.")
    p.add_argument("--lang", default="en", help="Languages to keep, comma separated (ISO 639-1), or 'any'.")
    p.add_argument("--no-quality", action="store_true", help="Skip the quality heuristics.")
    p.add_argument("--no-exact-dedup", action="store_true", help="Keep exact duplicates.")
    p.add_argument("--use-minhash", action="store_true", help="Remove near duplicates with MinHash LSH.")
    p.add_argument("--minhash-threshold", type=float, default=0.8, help="Jaccard similarity from which documents are near duplicates.")
    p.add_argument("--minhash-num-perm", type=int, default=128, help="MinHash permutations.")
    p.add_argument("--minhash-ngram", type=int, default=5, help="Words per shingle.")
    p.add_argument("--minhash-capacity", type=int, default=500_000,
                   help="Most documents the LSH index holds (bounds memory; oldest leave first).")
    p.add_argument("--batch-size", type=int, default=256, help="Documents per deduplication batch.")
    p.add_argument("--hub-timeout", type=float, default=HUB_TIMEOUT_S, help="Seconds to wait for the hub before failing.")
    p.add_argument("--overwrite", action="store_true", help="Replace shards already in --out.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--json", action="store_true", help="Print the stats as JSON instead of a table.")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    langs = () if args.lang.strip().lower() in ("any", "", "all") else tuple(
        x.strip().lower() for x in args.lang.split(",") if x.strip())
    if args.max_total is not None and args.max_total < 1:
        raise ValueError("--max-total must be >= 1")
    if not 0 < args.minhash_threshold <= 1:
        raise ValueError("--minhash-threshold must be in (0, 1]")
    return BuildConfig(
        filters=FilterConfig(min_chars=args.min_chars, max_chars=args.max_chars, min_words=args.min_words,
                             languages=langs, quality=not args.no_quality),
        dedup=DedupConfig(exact=not args.no_exact_dedup, use_minhash=args.use_minhash,
                          threshold=args.minhash_threshold, num_perm=args.minhash_num_perm,
                          ngram=args.minhash_ngram, capacity=args.minhash_capacity),
        max_total=args.max_total, max_read=args.max_read, weight_by=args.weight_by, shard_size=args.shard_size,
        batch_size=args.batch_size, chunk_chars=args.chunk_chars, hub_timeout=args.hub_timeout,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        specs = [parse_source(s, text_field=args.text_field, split=args.split) for s in args.source]
        weights = parse_weights(args.weights, [s.name for s in specs])
        for s in specs:
            s.weight = weights[s.name]
        stats = build(specs, args.out, cfg)
    except (SourceError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    print(f"wrote {stats['kept']} documents to {args.out} ({len(stats['shards'])} shards, {STATS_FILE})",
          file=sys.stderr)
    return 0
