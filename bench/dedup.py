"""Near-duplicate removal: the build's MinHash LSH stage against a plain datasketch loop.

    python -m bench.dedup [--quick]

Both sides get the same generated documents (with planted near and exact duplicates), the same
word 5-gram shingles, 128 permutations and threshold 0.8, in the same process:

- baseline: for each document, a datasketch ``MinHash`` (permutations shared, so their generation
  is not counted), ``update_batch`` over the shingles, ``MinHashLSH.query``, ``insert`` when new;
- build: :class:`npcbus.data.dedup.NearDuplicateIndex` exactly as ``npcbus data build`` runs it
  (batches of 256 documents).

Figures (one JSON line each, last in the output):

- ``dedup.docs_per_s``: documents per second, goal ratio >= 1.0;
- ``dedup.peak_mem_mb``: peak traced memory over an input four times the build's index capacity
  (the build's index is bounded, the plain loop's is not), goal ratio <= 1.0.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import time
import tracemalloc

NUM_PERM = 128
THRESHOLD = 0.8
NGRAM = 5
_WORDS = re.compile(r"[0-9a-z\u0080-\U0010ffff]+")


def make_docs(n: int, seed: int = 7, words_per_doc: tuple[int, int] = (80, 200)) -> tuple[list[str], set[int]]:
    """Documents and the indices of planted duplicates (about 20 % near, 5 % exact)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(20000)]
    docs: list[str] = []
    planted: set[int] = set()
    for i in range(n):
        r = rng.random()
        if i > 10 and r < 0.20:
            src = docs[rng.randrange(len(docs))].split()
            for _ in range(max(1, len(src) // 100)):  # ~1 % of the words changed
                src[rng.randrange(len(src))] = rng.choice(vocab)
            docs.append(" ".join(src))
            planted.add(i)
        elif i > 10 and r < 0.25:
            docs.append(docs[rng.randrange(len(docs))])
            planted.add(i)
        else:
            k = rng.randint(*words_per_doc)
            docs.append(" ".join(rng.choice(vocab) for _ in range(k)).capitalize() + ".")
    return docs, planted


def plain_loop(docs: list[str]) -> list[bool]:
    from datasketch import MinHash, MinHashLSH

    perms = MinHash(num_perm=NUM_PERM).permutations
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    keep = []
    for i, text in enumerate(docs):
        words = _WORDS.findall(text.lower())
        shingles = {" ".join(words[j : j + NGRAM]).encode() for j in range(max(1, len(words) - NGRAM + 1))}
        m = MinHash(num_perm=NUM_PERM, permutations=perms, scheme="affine32")
        m.update_batch(shingles)
        if lsh.query(m):
            keep.append(False)
        else:
            lsh.insert(i, m)
            keep.append(True)
    return keep


def build_dedup(docs: list[str], capacity: int | None = None, batch: int = 256) -> list[bool]:
    from npcbus.data.dedup import NearDuplicateIndex

    index = NearDuplicateIndex(threshold=THRESHOLD, num_perm=NUM_PERM, ngram=NGRAM,
                               capacity=capacity or max(1, len(docs)))
    keep: list[bool] = []
    for s in range(0, len(docs), batch):
        keep.extend(index.add_batch(docs[s : s + batch]))
    return keep


def _timed(fn, *a, **kw) -> tuple[float, list[bool]]:
    gc.collect()
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def _peak_mb(fn, *a, **kw) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        fn(*a, **kw)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _recall(keep: list[bool], planted: set[int]) -> float:
    return sum(1 for i in planted if not keep[i]) / max(1, len(planted))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Small inputs (CI).")
    args = ap.parse_args(argv)
    n = 3000 if args.quick else 20000
    n_mem = 2000 if args.quick else 8000
    reps = 2 if args.quick else 3

    docs, planted = make_docs(n)
    build_dedup(docs[:300])  # warm-up: imports, caches
    plain_loop(docs[:300])
    t_plain = t_build = float("inf")
    keep_plain = keep_build = []
    for _ in range(reps):
        dt, keep_plain = _timed(plain_loop, docs)
        t_plain = min(t_plain, dt)
        dt, keep_build = _timed(build_dedup, docs)
        t_build = min(t_build, dt)
    plain_dps = n / t_plain
    build_dps = n / t_build
    agree = sum(a == b for a, b in zip(keep_plain, keep_build, strict=True)) / n
    print(f"documents: {n} ({len(planted)} planted duplicates), threshold {THRESHOLD}, {NUM_PERM} permutations")
    print(f"plain datasketch loop: {plain_dps:,.0f} docs/s, removed {keep_plain.count(False)}, "
          f"planted recall {_recall(keep_plain, planted):.3f}")
    print(f"build dedup:           {build_dps:,.0f} docs/s, removed {keep_build.count(False)}, "
          f"planted recall {_recall(keep_build, planted):.3f}")
    print(f"keep/drop agreement between the two: {agree:.4f}")

    mem_docs, _ = make_docs(4 * n_mem, seed=11)
    cap = n_mem
    peak_plain = _peak_mb(plain_loop, mem_docs)
    peak_build = _peak_mb(build_dedup, mem_docs, capacity=cap)
    peak_build_small = _peak_mb(build_dedup, mem_docs[:n_mem], capacity=cap)
    print(f"peak traced memory over {len(mem_docs)} documents: plain loop {peak_plain:.1f} MiB, "
          f"build (index capacity {cap}) {peak_build:.1f} MiB; build over {n_mem} documents {peak_build_small:.1f} MiB")

    figures = [
        {"bench": "dedup.docs_per_s", "value": round(build_dps, 1), "baseline": round(plain_dps, 1),
         "ratio": round(build_dps / plain_dps, 3), "goal": ">=1.0", "met": build_dps / plain_dps >= 1.0},
        {"bench": "dedup.peak_mem_mb", "value": round(peak_build, 2), "baseline": round(peak_plain, 2),
         "ratio": round(peak_build / peak_plain, 3), "goal": "<=1.0", "met": peak_build / peak_plain <= 1.0},
    ]
    for f in figures:
        print(json.dumps(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
