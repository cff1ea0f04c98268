"""Rate limits and the concurrency cap: plain classes, no event loop."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """Token buckets by key: ``rate`` per second sustained, ``burst`` at once.

    ``take(key, cost)`` returns 0.0 when allowed, else the seconds to wait before the same request
    would be allowed. A rate of 0 turns the limit off. Idle buckets are forgotten (they would be full
    anyway), so memory stays bounded by ``max_keys``.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, cost: float = 1.0) -> float:
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if cost > self.burst:
            # can never be satisfied in one go: refuse, and say when a full bucket would be back
            self._buckets[key] = (tokens, now)
            return max((self.burst - tokens) / self.rate, 1.0 / self.rate)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (cost - tokens) / self.rate
        self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        full_after = self.burst / self.rate
        while self._buckets:
            key, (_tokens, at) = next(iter(self._buckets.items()))
            if len(self._buckets) > self.max_keys or now - at >= full_after:
                self._buckets.popitem(last=False)
            else:
                break


def retry_after_header(seconds: float) -> str:
    """A Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))


class ConcurrencyCap:
    """Counts generations in flight; ``try_acquire`` refuses at once when the cap is reached."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.peak = 0

    def try_acquire(self, n: int = 1) -> bool:
        if self.in_flight + n > self.limit:
            return False
        self.in_flight += n
        self.peak = max(self.peak, self.in_flight)
        return True

    def release(self, n: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - n)
