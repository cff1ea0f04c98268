"""Helpers shared by the benchmarks: timing, percentiles and the JSON summary line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable


def engine_env() -> None:
    """Environment defaults of a benchmark that starts an inference engine (set before vLLM is
    imported): a small CPU KV cache, no hub access, and vLLM's logs on stderr, so that stdout
    carries only the figures."""
    for key, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("VLLM_LOGGING_STREAM", "ext://sys.stderr"), ("VLLM_LOGGING_LEVEL", "WARNING")):
        os.environ.setdefault(key, value)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a CI-sized run")
    return p


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def figure(name: str, value: float, baseline: float, goal: str, *, ratio: float | None = None,
           higher_is_better: bool | None = None, **extra) -> dict:
    """Print and return one summary line. ``goal`` is like ``<=1.3`` or ``>=0.9`` on the ratio."""
    if ratio is None:
        ratio = value / baseline if baseline else float("nan")
    met = None
    g = goal.strip()
    try:
        if g.startswith("<="):
            met = ratio <= float(g[2:].split()[0])
        elif g.startswith(">="):
            met = ratio >= float(g[2:].split()[0])
    except ValueError:
        met = None
    line = {"bench": name, "value": round(value, 6), "baseline": round(baseline, 6), "ratio": round(ratio, 4),
            "goal": goal, "met": met}
    line.update(extra)
    print(json.dumps(line), flush=True)
    return line
