"""Aggregator hot path: decode + validate + streaming weighted mean of LoRA deltas.

Eight deltas the size of a 13B model's rank-16 q,v adapter (40 layers x (q, v) x (A 16x5120 +
B 5120x16), about 13.1M parameters) arrive as encoded :class:`npcbus.messages.Delta` messages.
Figures, each against a baseline measured in the same run:

* ``aggregate.time_ratio``: decode + validation + streaming weighted mean of fp16 deltas, against a
  plain numpy float32 weighted mean of the same values already in memory as float32, computed the
  same streaming way (one delta at a time into float32 sums) (goal <= 2). The summary on stderr also
  gives the time of a tensor-major numpy sum over all deltas at once, which keeps each sum in cache
  but needs every delta in memory as float32; streaming one delta at a time reads and writes the
  float32 sums once per delta, which that layout avoids.
* ``aggregate.peak_memory_ratio``: peak memory the aggregator allocates for that work (tracemalloc;
  the received messages are its input and are not counted), against the size of one float32 delta
  (goal <= 3).
* ``aggregate.int8_wire_ratio``: bytes on the wire of int8 deltas against fp16 deltas (goal <= 0.55).
* ``aggregate.int8_cosine``: cosine similarity of the aggregate of int8 deltas with the exact
  float32 aggregate of the unquantized deltas (goal >= 0.999; ``ratio`` is the cosine itself).

``--quick`` uses 16 of the 40 layers and fewer repeats. (Much smaller deltas fit in the CPU caches,
where the fixed costs of decoding and of the float16 conversion weigh more: with 4 layers of width
1024 the time ratio is about 4.) Run: ``python -m bench.aggregate [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import tracemalloc

import numpy as np

from npcbus import codec, lora

NAME = "base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
CURRENT_VERSION = 7
MAX_STALENESS = 4


def make_deltas(n: int, layers: int, hidden: int, rank: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        d = {}
        for i in range(layers):
            for m in ("q", "v"):
                d[NAME.format(i=i, m=m, ab="A")] = rng.standard_normal((rank, hidden), dtype=np.float32) * 1e-3
                d[NAME.format(i=i, m=m, ab="B")] = rng.standard_normal((hidden, rank), dtype=np.float32) * 1e-3
        deltas.append(d)
    return deltas


def encode_all(deltas, quant: str, versions, samples) -> list[bytes]:
    return [
        codec.encode(lora.make_delta(d, adapter="npc", base_version=v, num_samples=s, quant=quant,
                                     delta_id=f"{quant}-{i}", worker_id=f"w{i}"))
        for i, (d, v, s) in enumerate(zip(deltas, versions, samples, strict=True))
    ]


def aggregate_messages(payloads: list[bytes], spec: lora.AdapterSpec, max_norm: float) -> dict[str, np.ndarray]:
    """What the aggregator does per round: decode, validate and fold in each delta, then the mean."""
    acc = lora.WeightedMeanAccumulator()
    seen: set[str] = set()
    for payload in payloads:
        msg = codec.decode(payload)
        # header, names, shapes and dtypes here; finiteness and the norm bound while folding in
        why = lora.validate_delta(msg, spec, current_version=CURRENT_VERSION, max_staleness=MAX_STALENESS,
                                  max_norm=max_norm, seen_ids=seen, check_values=False)
        if why is None:
            weight = lora.delta_weight(msg.num_samples, CURRENT_VERSION, msg.base_version)
            why = acc.add(msg, weight, max_norm=max_norm)
        if why is not None:
            raise RuntimeError(f"bench delta rejected: {why}")
        seen.add(msg.delta_id)
    return acc.result()


def numpy_weighted_sum(arrays: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The baseline: the same streaming weighted mean in plain numpy, one delta at a time into float32
    sums, over float32 arrays already in memory (no decoding, no checks, no float16)."""
    sums = {name: np.zeros_like(a) for name, a in arrays[0].items()}
    for a, w in zip(arrays, weights, strict=True):
        w = np.float32(w)
        for name in sums:
            sums[name] += a[name] * w
    inv = np.float32(1.0 / sum(weights))
    return {name: s * inv for name, s in sums.items()}


def numpy_weighted_sum_tensor_major(arrays: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """For reference only: tensor by tensor over all deltas at once, each sum staying in cache. Not
    streaming (every delta must be in memory as float32), so not the goal's baseline."""
    ws = [np.float32(w) for w in weights]
    inv = np.float32(1.0 / sum(weights))
    out = {}
    for name in arrays[0]:
        acc = arrays[0][name] * ws[0]
        for a, w in zip(arrays[1:], ws[1:], strict=True):
            acc += a[name] * w
        out[name] = acc * inv
    return out


def timed(fn, *args) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    dot = na = nb = 0.0
    for k in a:
        x = a[k].astype(np.float64).ravel()
        y = b[k].astype(np.float64).ravel()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot / math.sqrt(na * nb)


def figure(name: str, value: float, baseline: float, ratio: float, goal: str) -> dict:
    op, target = goal[:2], float(goal[2:])
    met = ratio <= target if op == "<=" else ratio >= target
    return {"bench": name, "value": value, "baseline": baseline, "ratio": round(ratio, 6), "goal": goal,
            "met": bool(met)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.aggregate", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 layers instead of 40, fewer repeats")
    ap.add_argument("--deltas", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    layers, hidden, rank = (16, 5120, 16) if args.quick else (40, 5120, 16)
    repeats = args.repeats or (3 if args.quick else 5)
    n = args.deltas

    deltas = make_deltas(n, layers, hidden, rank)
    spec = lora.AdapterSpec.from_state("npc", deltas[0])
    params = spec.num_params
    fp32_bytes = params * 4
    versions = [CURRENT_VERSION - (i % 3) for i in range(n)]
    samples = [16 + 8 * (i % 5) for i in range(n)]
    weights = [lora.delta_weight(s, CURRENT_VERSION, v) for s, v in zip(samples, versions, strict=True)]
    max_norm = 10.0 * max(lora.delta_norm(d) for d in deltas)
    print(f"{n} deltas of {params / 1e6:.2f}M parameters ({len(spec.shapes)} tensors, {fp32_bytes / 2**20:.1f} MiB "
          f"in float32); {repeats} repeats", file=sys.stderr)

    fp16 = encode_all(deltas, "fp16", versions, samples)
    # the baseline sums the very values that travel: the fp16 wire values, held as float32
    wire_fp32 = [lora.delta_tensors_fp32(codec.decode(p)) for p in fp16]

    # interleaved, best of N each: both sides see the same machine (other processes share it)
    ours, base, major = [], [], []
    for _ in range(repeats):
        ours.append(timed(aggregate_messages, fp16, spec, max_norm))
        base.append(timed(numpy_weighted_sum, wire_fp32, weights))
        major.append(timed(numpy_weighted_sum_tensor_major, wire_fp32, weights))
    t_ours, t_base, t_major = min(ours), min(base), min(major)

    got = aggregate_messages(fp16, spec, max_norm)
    ref = numpy_weighted_sum(wire_fp32, weights)
    worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    scale = max(float(np.abs(ref[k]).max()) for k in ref)
    if worst > 1e-5 * scale:
        raise SystemExit(f"aggregate differs from the baseline by {worst:g} (max |value| {scale:g})")
    del got, ref, wire_fp32

    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    result = aggregate_messages(fp16, spec, max_norm)
    peak = tracemalloc.get_traced_memory()[1] - start
    tracemalloc.stop()
    del result

    int8 = encode_all(deltas, "int8", versions, samples)
    wire8, wire16 = sum(map(len, int8)), sum(map(len, fp16))
    agg8 = aggregate_messages(int8, spec, max_norm)
    exact = lora.WeightedMeanAccumulator()
    for d, w in zip(deltas, weights, strict=True):
        exact.add(d, w)
    cos = cosine(agg8, exact.result())

    print(f"decode+validate+aggregate {t_ours * 1e3:.1f} ms vs plain numpy streaming fp32 weighted mean "
          f"{t_base * 1e3:.1f} ms (tensor-major, non-streaming numpy: {t_major * 1e3:.1f} ms, ratio "
          f"{t_ours / t_major:.2f}); "
          f"peak {peak / 2**20:.1f} MiB; int8 {wire8 / 2**20:.1f} MiB vs fp16 {wire16 / 2**20:.1f} MiB on the wire",
          file=sys.stderr)
    figures = [
        figure("aggregate.time_ratio", round(t_ours, 5), round(t_base, 5), t_ours / t_base, "<=2"),
        figure("aggregate.peak_memory_ratio", peak, fp32_bytes, peak / fp32_bytes, "<=3"),
        figure("aggregate.int8_wire_ratio", wire8, wire16, wire8 / wire16, "<=0.55"),
        figure("aggregate.int8_cosine", round(cos, 7), 1.0, cos, ">=0.999"),
    ]
    for f in figures:
        print(json.dumps(f))
    return 0  # a missed goal is reported in the JSON lines, not an error


if __name__ == "__main__":
    sys.exit(main())
