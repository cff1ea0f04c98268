"""Pure LoRA tensor maths: deltas, quantization, aggregation, the server optimizer, validation and the
round policy.

Everything here works on numpy arrays (and :class:`npcbus.messages.Delta` messages) with no event
loop, no broker and no torch, so the aggregator's decisions can be tested on their own.

State dicts map tensor names, as PEFT saves them in ``adapter_model.safetensors`` (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), to arrays. A *delta* is
trained weights minus the weights of the version the worker started from (its ``base_version``).

Wire formats of a delta (``Delta.quant``):

* ``fp16`` (default): tensors in float16; a value beyond float16's range is refused when the delta
  is made.
* ``fp32``: tensors in float32.
* ``int8``: symmetric int8 per block of ``Delta.block`` values along the flattened tensor, with one
  float32 scale per block in ``Delta.scales`` (``scale = max|x| / 127`` over the block). Every
  element satisfies ``|x - dequantize(quantize(x))| <= scale / 2``, up to float32 rounding of the
  product ``q * scale`` (a relative ``2**-24``).

Aggregation accumulates in float32 and reads the codec's zero-copy views of a received message
directly, a cache-sized chunk at a time, so the only full-size float32 array the weighted mean
holds is its running sum. The median and the trimmed mean need every value of a coordinate; they
work tensor by tensor, so they hold one tensor of every delta at a time (plus their inputs).

The hot path of an aggregator, one pass over each delta's values::

    why = validate_delta(msg, spec, current_version=v, max_staleness=s, seen_ids=seen, check_values=False)
    if why is None:
        why = acc.add(msg, delta_weight(msg.num_samples, v, msg.base_version), max_norm=bound)
    # why is None: folded in; else reject the delta with why.code

(``validate_delta`` with ``check_values=True``, the default, reads the values itself: use it where
nothing folds the delta in afterwards.)

Reason codes returned by :func:`validate_delta` (short snake_case strings, for logs, metrics and
the dead-letter header):

* ``unknown_adapter``: no spec for the delta's adapter.
* ``unauthorized_sender``: the service's sender check (the broker-authenticated user does not
  match the delta's worker) refused it.
* ``duplicate``: a delta with this ``delta_id`` was already accepted.
* ``unknown_base_version``: ``base_version`` is negative or newer than the current version.
* ``stale``: ``current_version - base_version`` exceeds the staleness limit.
* ``bad_quant``: unknown ``quant``, a bad block size, or missing / misshapen / non-float32 scales.
* ``tensor_names``: tensor names differ from the adapter's (missing or extra names).
* ``tensor_shape``: a tensor's shape differs from the adapter's.
* ``tensor_dtype``: a tensor's dtype does not match ``quant``.
* ``bad_num_samples``: ``num_samples`` is not a positive integer.
* ``non_finite_metrics``: a numeric training metric is NaN or infinite.
* ``non_finite``: a tensor value (or an int8 scale) is NaN or infinite.
* ``norm_too_large``: the delta's L2 norm exceeds the bound.

One more code belongs to the round policy: ``round_expired`` is the reason the service gives the
deltas of a round that :meth:`RoundPolicy.decide` expired (see there).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from npcbus.messages import Delta

StateDict = Mapping[str, np.ndarray]
DeltaLike = Delta | Mapping[str, Any]

QUANT_FORMATS = ("fp16", "fp32", "int8")
WIRE_DTYPES = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32), "int8": np.dtype(np.int8)}
DEFAULT_INT8_BLOCK = 256
INT8_MAX = 127
INT8_INPUT_MAX = 1e38
FP16_MAX = float(np.finfo(np.float16).max)

# Elements per working chunk: 128 Ki float32 values (512 KiB) stay in a core's L2 cache.
CHUNK_ELEMS = 1 << 17

REASON_CODES = (
    "unknown_adapter", "unauthorized_sender", "duplicate", "unknown_base_version", "stale", "bad_quant",
    "tensor_names", "tensor_shape", "tensor_dtype", "bad_num_samples", "non_finite_metrics", "non_finite",
    "norm_too_large", "round_expired", "wrong_type", "invalid",
)


# --------------------------------------------------------------------------------------------
# state dicts and deltas
# --------------------------------------------------------------------------------------------


def as_numpy(x: Any) -> np.ndarray:
    """An array as numpy; a torch tensor (any dtype, any device) becomes a float32 CPU copy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor; torch itself is not imported here
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x)


def _check_same_keys(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:3]
        extra = sorted(set(b) - set(a))[:3]
        raise ValueError(f"{what}: tensor names differ (missing {missing}, extra {extra})")


def compute_delta(new: StateDict, base: StateDict) -> dict[str, np.ndarray]:
    """``new - base`` per tensor, in float32. Both state dicts must have the same names and shapes."""
    _check_same_keys(base, new, "compute_delta")
    out = {}
    for name, b in base.items():
        n = as_numpy(new[name])
        b = as_numpy(b)
        if n.shape != b.shape:
            raise ValueError(f"compute_delta: {name}: shape {n.shape} != base shape {b.shape}")
        out[name] = np.subtract(n, b, dtype=np.float32)
    return out


def apply_delta(state: StateDict, delta: DeltaLike, scale: float = 1.0) -> dict[str, np.ndarray]:
    """``state + scale * delta`` per tensor, as a new float32 state dict.

    ``delta`` is a mapping of arrays or a :class:`Delta` message (dequantized on the fly).
    """
    names = delta.tensors.keys() if isinstance(delta, Delta) else delta.keys()
    if state.keys() != names:
        _check_same_keys(state, dict.fromkeys(names), "apply_delta")
    out = {}
    for name, base in state.items():
        d = tensor_fp32(delta, name)
        base = as_numpy(base)
        if d.shape != base.shape:
            raise ValueError(f"apply_delta: {name}: delta shape {d.shape} != state shape {base.shape}")
        if scale != 1.0:
            d = d * np.float32(scale)
        out[name] = np.add(base, d, dtype=np.float32)
    return out


def _quiet_fp(fn):
    """Run ``fn`` with float overflow / invalid warnings off: the code checks for them itself."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **kwargs)

    return wrapper


@_quiet_fp
def delta_norm(delta: DeltaLike) -> float:
    """The L2 norm of a delta over all its tensors (NaN or inf when a value is not finite)."""
    total = 0.0
    scratch = np.empty(CHUNK_ELEMS, dtype=np.float32)
    for name in _names(delta):
        for chunk, ss in _iter_fp32_chunks(delta, name, 1.0, scratch):
            total += _sumsq(chunk) if ss is None else ss
    return math.sqrt(total)


def _sumsq(chunk: np.ndarray) -> float:
    # BLAS dot in float32; a finite result proves every element finite (squares are >= 0, so
    # inf - inf cannot occur). An infinite result may only be an overflow of finite squares:
    # redo that chunk in float64.
    s = float(np.dot(chunk, chunk))
    if math.isfinite(s):
        return s
    if not np.isfinite(chunk).all():
        return math.nan if np.isnan(chunk).any() else math.inf
    c64 = chunk.astype(np.float64)
    return float(np.dot(c64, c64))


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def quantize_fp16(x: np.ndarray) -> np.ndarray:
    """``x`` as float16; raises ValueError when a finite value is beyond float16's range."""
    x = as_numpy(x)
    if x.dtype == np.float16:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        out = x.astype(np.float16)
    if x.size and not np.isfinite(out).all():
        bad = np.isfinite(x) & ~np.isfinite(out)
        if bad.any():
            raise ValueError(f"value {float(x[bad].flat[0]):.4g} is beyond float16's range (+-{FP16_MAX:g}); "
                             "use quant='int8' or 'fp32'")
    return out


def num_blocks(size: int, block: int) -> int:
    return -(-size // block)


def quantize_int8(x: np.ndarray, block: int = DEFAULT_INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization per block of ``block`` values along the flattened tensor.

    Returns ``(q, scales)``: ``q`` int8 with ``x``'s shape, ``scales`` float32 of length
    ``ceil(x.size / block)``, ``scale = max|x| / 127`` over each block (0 for an all-zero block).
    ``|x - q * scale| <= scale / 2`` for every element (see the module docstring). Non-finite
    input, or a magnitude above ``INT8_INPUT_MAX`` (1e38, where ``127 * scale`` could overflow
    float32), raises ValueError.
    """
    if block <= 0:
        raise ValueError(f"block must be > 0, got {block}")
    x = as_numpy(x)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantize non-finite values to int8")
    n = flat.size
    nb = num_blocks(n, block)
    padded = flat
    if nb * block != n:
        padded = np.zeros(nb * block, dtype=np.float32)
        padded[:n] = flat
    blocks = padded.reshape(nb, block)
    amax = np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32)
    if n and float(amax.max()) > INT8_INPUT_MAX:
        raise ValueError(f"cannot quantize values above {INT8_INPUT_MAX:g} in magnitude to int8")
    scales = (amax / np.float32(INT8_MAX)).astype(np.float32)
    # a scale rounded down (to float32, or to zero for subnormal input) could push max|x| past
    # 127.5 steps, where clipping would break the bound: step such scales up by one ulp
    low = amax.astype(np.float64) > (INT8_MAX + 0.5) * scales.astype(np.float64)
    if low.any():
        scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    # divide in float64 so that rounding to the nearest step is exact up to the scale's own value
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    q = np.rint(blocks / safe[:, None])
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    q8 = q.astype(np.int8).reshape(-1)[:n].reshape(x.shape)
    return q8, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of an int8-quantized tensor (into ``out`` when given)."""
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    _dequant_into(q.reshape(-1), scales, block, 0, q.size, out.reshape(-1), 1.0)
    return out


def _dequant_into(qflat: np.ndarray, scales: np.ndarray, block: int, start: int, stop: int,
                  out: np.ndarray, weight: float) -> None:
    """out[: stop-start] = weight * dequant(qflat[start:stop]); ``start`` is a multiple of ``block``."""
    n = stop - start
    b0 = start // block
    full = n // block
    sc = scales[b0:b0 + num_blocks(n, block)]
    if weight != 1.0:
        sc = sc * np.float32(weight)
    out = out[:n]
    np.copyto(out, qflat[start:stop])  # int8 -> float32, exact
    if full:
        blocks = out[:full * block].reshape(full, block)
        np.multiply(blocks, sc[:full, None], out=blocks)
    if n > full * block:
        np.multiply(out[full * block:], sc[full], out=out[full * block:])


def quantize_state(tensors: StateDict, quant: str = "fp16",
                   block: int = DEFAULT_INT8_BLOCK) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tensors in a wire format: ``(tensors, scales)`` (scales empty except for int8)."""
    if quant == "fp16":
        return {k: quantize_fp16(v) for k, v in tensors.items()}, {}
    if quant == "fp32":
        return {k: np.ascontiguousarray(as_numpy(v), dtype=np.float32) for k, v in tensors.items()}, {}
    if quant == "int8":
        qs, scales = {}, {}
        for k, v in tensors.items():
            qs[k], scales[k] = quantize_int8(v, block)
        return qs, scales
    raise ValueError(f"unknown quant {quant!r}; use one of {', '.join(QUANT_FORMATS)}")


# --------------------------------------------------------------------------------------------
# Delta messages
# --------------------------------------------------------------------------------------------


def make_delta(tensors: StateDict, *, adapter: str, base_version: int, num_samples: int, quant: str = "fp16",
               block: int = DEFAULT_INT8_BLOCK, delta_id: str | None = None, task_id: str = "",
               worker_id: str = "", metrics: Mapping[str, Any] | None = None) -> Delta:
    """A :class:`Delta` message holding ``tensors`` (a delta, e.g. from :func:`compute_delta`)
    in the wire format ``quant``."""
    wire, scales = quantize_state(tensors, quant, block)
    return Delta(
        delta_id=delta_id or uuid.uuid4().hex, task_id=task_id, adapter=adapter, base_version=int(base_version),
        worker_id=worker_id, num_samples=int(num_samples), tensors=wire, quant=quant, scales=scales,
        block=block if quant == "int8" else 0, metrics=dict(metrics or {}),
    )


def _names(delta: DeltaLike) -> Iterable[str]:
    return delta.tensors.keys() if isinstance(delta, Delta) else delta.keys()


# float16 -> float32 by bit manipulation, several times faster than numpy's own cast: the
# float16 bits, sign-extended to int32 and shifted left by 13, hold the exponent and mantissa in
# float32's places (the sign-extension bits 28-30 are masked off, the sign stays in bit 31); as a
# float32 that is the value times 2**-112, subnormals included, so one multiplication by
# 2**112 * weight gives weight * value exactly rounded once. Infinities and NaNs (exponent 31)
# come out finite, at least 65536 * weight in magnitude: the chunk's sum of squares, computed
# anyway, reveals them, and such a chunk is converted again with numpy's cast, which keeps them.
_F16_TO_F32_SHIFT = 2.0 ** 112
_SIGN_AND_MAGNITUDE = np.int32(np.uint32(0x8FFFFFFF).view(np.int32))
_F16_EXP_MASK = np.uint16(0x7C00)
_F32_MAX = float(np.finfo(np.float32).max)


def _f16_to_f32(h: np.ndarray, out: np.ndarray, weight: float) -> float:
    """out = weight * h (flat float16 -> flat float32, same length); returns sum(out**2)."""
    bits = out.view(np.int32)
    np.copyto(bits, h.view(np.int16))
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _SIGN_AND_MAGNITUDE, out=bits)
    factor = _F16_TO_F32_SHIFT * weight
    if factor < _F32_MAX:
        np.multiply(out, np.float32(factor), out=out)
    else:
        np.multiply(out, np.float32(_F16_TO_F32_SHIFT), out=out)
        np.multiply(out, np.float32(weight), out=out)
    ss = float(np.dot(out, out))  # may overflow to inf: the slow path below sorts that out
    if ss < 0.99 * (65536.0 * weight) ** 2:
        return ss  # no element reached 65536 * weight: no infinity or NaN among them
    if (np.bitwise_and(h.view(np.uint16), _F16_EXP_MASK) == _F16_EXP_MASK).any():
        np.multiply(h, np.float32(weight), out=out, dtype=np.float32)
    return _sumsq(out)


def _source(delta: DeltaLike, name: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(flat wire array, int8 scales or None, int8 block) of one tensor."""
    if isinstance(delta, Delta):
        arr = delta.tensors[name]
        if delta.quant == "int8":
            return arr.reshape(-1), delta.scales[name], delta.block
        return arr.reshape(-1), None, 0
    return as_numpy(delta[name]).reshape(-1), None, 0


def _to_fp32(flat: np.ndarray, scales: np.ndarray | None, block: int, a: int, b: int, out: np.ndarray,
             weight: float) -> float | None:
    """out[:b-a] = weight * values of flat[a:b], in float32; for int8 ``a`` is a multiple of ``block``.

    Returns the sum of squares of the written values when it came for free (float16), else None.
    """
    out = out[:b - a]
    if scales is not None:
        _dequant_into(flat, scales, block, a, b, out, weight)
    elif flat.dtype == np.float16:
        return _f16_to_f32(flat[a:b], out, weight)
    elif weight == 1.0:
        np.copyto(out, flat[a:b], casting="unsafe")
    else:
        np.multiply(flat[a:b], np.float32(weight), out=out, dtype=np.float32, casting="unsafe")
    return None


def _iter_fp32_chunks(delta: DeltaLike, name: str, weight: float = 1.0,
                      scratch: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, float | None]]:
    """Yield ``(chunk, sum of squares or None)``: ``weight * tensor`` as float32 chunks of the
    flattened tensor.

    Chunks are written into ``scratch`` (reused: consume each before the next) unless the tensor
    is float32 already and ``weight`` is 1, in which case views are yielded without copying.
    """
    flat, scales, block = _source(delta, name)
    n = flat.size
    step = CHUNK_ELEMS if scales is None else max(block, (CHUNK_ELEMS // block) * block)
    if flat.dtype == np.float32 and scales is None and weight == 1.0:
        for a in range(0, n, step):
            yield flat[a:a + step], None
        return
    if scratch is None or scratch.size < min(step, n):
        scratch = np.empty(min(step, n), dtype=np.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        ss = _to_fp32(flat, scales, block, a, b, scratch, weight)
        yield scratch[:b - a], ss


@_quiet_fp
def tensor_fp32(delta: DeltaLike, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """One tensor of a delta as a float32 array (dequantized for int8), into ``out`` when given
    (a contiguous float32 array of the tensor's shape); a new, writable array otherwise."""
    flat, scales, block = _source(delta, name)
    if out is None:
        out = np.empty(_shape(delta, name), dtype=np.float32)
    _to_fp32(flat, scales, block, 0, flat.size, out.reshape(-1), 1.0)
    return out


def delta_tensors_fp32(delta: Delta) -> dict[str, np.ndarray]:
    """Every tensor of a :class:`Delta` as a new, writable float32 array."""
    return {name: tensor_fp32(delta, name) for name in delta.tensors}


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


def staleness(current_version: int, base_version: int) -> int:
    """How many versions behind the current one a delta's base is."""
    return int(current_version) - int(base_version)


def staleness_weight(s: int, alpha: float = 0.5) -> float:
    """Weight factor of a delta ``s`` versions stale: ``1 / (1 + s) ** alpha`` (1 when fresh)."""
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")
    return 1.0 / (1.0 + s) ** alpha


def delta_weight(num_samples: int, current_version: int, base_version: int, alpha: float = 0.5) -> float:
    """Aggregation weight of a delta: sample count times its staleness weight."""
    return float(num_samples) * staleness_weight(staleness(current_version, base_version), alpha)


class WeightedMeanAccumulator:
    """Streaming weighted mean of deltas: fold them in one at a time, read the mean at the end.

    Holds one float32 running sum per tensor (plus a chunk-sized scratch buffer), never the deltas.
    ``add`` reads a :class:`Delta`'s tensors straight from the codec's views, converting and
    scaling a cache-sized chunk at a time, and checks the values on the way (one pass over the
    delta does the checks and the folding). Not thread-safe: one ``add`` at a time.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self._sums: dict[str, np.ndarray] | None = None
        if shapes is not None:
            self._sums = {k: np.zeros(tuple(s), dtype=np.float32) for k, s in shapes.items()}
        self._scratch = np.empty(CHUNK_ELEMS, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0
        #: L2 norm of the delta that the last successful :meth:`add` folded in.
        self.last_norm = math.nan

    @_quiet_fp
    def add(self, delta: DeltaLike, weight: float, *, max_norm: float | None = None) -> Rejection | None:
        """Fold in ``delta`` (a :class:`Delta` or a mapping of arrays) with ``weight`` > 0.

        Returns None when it was folded in, or a :class:`Rejection` (``non_finite``, or
        ``norm_too_large`` above ``max_norm``) when its values fail those checks, which run while
        folding: a chunk is added only after it was found finite and within the bound, and a
        refused delta's chunks already added are subtracted again, which restores the sums up to
        float32 rounding (an ulp of the values involved). So callers may skip the value pass of
        :func:`validate_delta` (``check_values=False``) and let this do it. Names or shapes that
        differ from the earlier deltas' raise ValueError.
        """
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        names = list(_names(delta))
        if self._sums is None:
            self._sums = {k: np.zeros(_shape(delta, k), dtype=np.float32) for k in names}
        elif len(names) != len(self._sums) or any(k not in self._sums for k in names):
            _check_same_keys(self._sums, dict.fromkeys(names), "WeightedMeanAccumulator.add")
        for name in names:
            acc = self._sums[name]
            if _shape(delta, name) != acc.shape:
                raise ValueError(f"{name}: shape {_shape(delta, name)} != {acc.shape}")
        limit = math.inf if max_norm is None else (max_norm * weight) ** 2
        total = 0.0  # sum of squares of weight * delta
        done: list[tuple[str, int]] = []  # (tensor, elements added) for a rollback
        for name in names:
            flat = self._sums[name].reshape(-1)
            pos = 0
            for chunk, ss in _iter_fp32_chunks(delta, name, weight, self._scratch):
                ss = _sumsq(chunk) if ss is None else ss
                total += ss
                if not math.isfinite(ss) or total > limit:
                    self._rollback(delta, weight, done + [(name, pos)])
                    if not math.isfinite(ss):
                        return _reject("non_finite", f"{name}: a value is NaN or infinite")
                    return _norm_rejection(math.sqrt(total) / weight, max_norm, partial=True)
                m = chunk.size
                np.add(flat[pos:pos + m], chunk, out=flat[pos:pos + m])
                pos += m
            done.append((name, pos))
        self.total_weight += weight
        self.count += 1
        self.last_norm = math.sqrt(total) / weight
        return None

    def _rollback(self, delta: DeltaLike, weight: float, done: list[tuple[str, int]]) -> None:
        for name, upto in done:
            flat = self._sums[name].reshape(-1)
            pos = 0
            for chunk, _ in _iter_fp32_chunks(delta, name, weight, self._scratch):
                if pos >= upto:
                    break
                m = chunk.size
                np.subtract(flat[pos:pos + m], chunk, out=flat[pos:pos + m])
                pos += m

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean so far, as new float32 arrays."""
        if self._sums is None or self.count == 0:
            raise ValueError("no delta was added")
        inv = np.float32(1.0 / self.total_weight)
        return {k: v * inv for k, v in self._sums.items()}

    def reset(self) -> None:
        if self._sums is not None:
            for v in self._sums.values():
                v.fill(0)
        self.total_weight = 0.0
        self.count = 0


def _shape(delta: DeltaLike, name: str) -> tuple[int, ...]:
    arr = delta.tensors[name] if isinstance(delta, Delta) else delta[name]
    return tuple(arr.shape)


def _stack_fp32(deltas: Sequence[DeltaLike], name: str) -> np.ndarray:
    first = _shape(deltas[0], name)
    stacked = np.empty((len(deltas), *first), dtype=np.float32)
    for i, d in enumerate(deltas):
        if _shape(d, name) != first:
            raise ValueError(f"{name}: shape {_shape(d, name)} != {first}")
        tensor_fp32(d, name, out=stacked[i])
    return stacked


def _robust(deltas: Sequence[DeltaLike], fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    if not deltas:
        raise ValueError("no deltas to aggregate")
    names = list(_names(deltas[0]))
    for d in deltas[1:]:
        if set(_names(d)) != set(names):
            _check_same_keys(dict.fromkeys(names), dict.fromkeys(_names(d)), "aggregate")
    return {name: fn(_stack_fp32(deltas, name)).astype(np.float32, copy=False) for name in names}


def coordinate_median(deltas: Sequence[DeltaLike]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of deltas (unweighted), tensor by tensor, in float32."""
    return _robust(deltas, lambda s: np.median(s, axis=0))


def trim_count(n: int, trim_ratio: float) -> int:
    """How many values a trimmed mean drops at each end: ``floor(trim_ratio * n)``, leaving >= 1."""
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    return min(int(math.floor(trim_ratio * n)), (n - 1) // 2)


def trimmed_mean(deltas: Sequence[DeltaLike], trim_ratio: float = 0.1) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (unweighted): per coordinate, drop the ``trim_count`` smallest
    and largest values and average the rest; tensor by tensor, in float32."""
    k = trim_count(len(deltas), trim_ratio)

    def fn(s: np.ndarray) -> np.ndarray:
        if k == 0:
            return s.mean(axis=0, dtype=np.float32)
        s.sort(axis=0)
        return s[k:s.shape[0] - k].mean(axis=0, dtype=np.float32)

    return _robust(deltas, fn)


AGGREGATION_METHODS = ("weighted_mean", "median", "trimmed_mean")


def aggregate(deltas: Sequence[DeltaLike], weights: Sequence[float] | None = None, method: str = "weighted_mean",
              trim_ratio: float = 0.1) -> dict[str, np.ndarray]:
    """Aggregate deltas held together. ``weights`` apply to ``weighted_mean`` only (default 1 each);
    a non-finite value raises ValueError there (the median and trimmed mean let NaN through)."""
    if method == "weighted_mean":
        if not deltas:
            raise ValueError("no deltas to aggregate")
        acc = WeightedMeanAccumulator()
        for i, (d, w) in enumerate(zip(deltas, weights if weights is not None else [1.0] * len(deltas), strict=True)):
            why = acc.add(d, w)
            if why is not None:
                raise ValueError(f"delta {i}: {why.code}: {why.text}")
        return acc.result()
    if method == "median":
        return coordinate_median(deltas)
    if method == "trimmed_mean":
        return trimmed_mean(deltas, trim_ratio)
    raise ValueError(f"unknown aggregation method {method!r}; use one of {', '.join(AGGREGATION_METHODS)}")


# --------------------------------------------------------------------------------------------
# server optimizer
# --------------------------------------------------------------------------------------------

SERVER_OPTIMIZERS = ("none", "momentum", "adam")


class ServerOptimizer:
    """An optimizer across rounds, run by the aggregator: it turns each round's aggregated delta
    into the update applied to the adapter.

    ``step(mean_delta)`` takes the round's aggregate ``d`` (the mean of what the workers' local
    training moved, a descent direction: the opposite of a gradient) and returns the update ``u``
    (new weights = current + ``u``), per tensor and element, in float32:

    * ``none``: ``u = lr * d`` (``lr`` 1: plain federated averaging).
    * ``momentum`` (heavy ball over rounds): ``m = momentum * m + d``, ``u = lr * m``; with
      ``nesterov``, ``u = lr * (momentum * m + d)`` (using the new ``m``). ``m`` starts at zero.
    * ``adam``: ``m = momentum * m + (1 - momentum) * d``, ``v = beta2 * v + (1 - beta2) * d**2``,
      bias-corrected ``m_hat = m / (1 - momentum**t)``, ``v_hat = v / (1 - beta2**t)`` at round
      ``t`` (1, 2, ...), ``u = lr * m_hat / (sqrt(v_hat) + eps)``. Each element then moves by about
      ``lr`` per round whatever the deltas' scale, so ``lr`` is in weight units here (a few times a
      worker's per-coordinate movement in one task), not a multiplier as for the other two.

    State: :meth:`state_dict` gives plain numpy arrays (``m/<tensor>``, ``v/<tensor>`` as the kind
    needs them, and ``step``, the rounds taken) and :meth:`load_state_dict` takes them back, so
    the aggregator persists them beside each version and a restart resumes exactly. ``step``
    never writes into arrays it holds or was given (it replaces them), so a state dict taken
    before a step stays valid: a caller can step a :meth:`copy` and keep the original until the
    new version is safely written.
    """

    def __init__(self, kind: str = "none", *, lr: float = 1.0, momentum: float = 0.9, beta2: float = 0.99,
                 eps: float = 1e-8, nesterov: bool = False) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {kind!r}; use one of {', '.join(SERVER_OPTIMIZERS)}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        self.kind = kind
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.nesterov = bool(nesterov)
        self.steps = 0
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    @property
    def slots(self) -> tuple[str, ...]:
        """The per-tensor state this kind keeps: ``()``, ``("m",)`` or ``("m", "v")``."""
        return {"none": (), "momentum": ("m",), "adam": ("m", "v")}[self.kind]

    def config(self) -> dict[str, Any]:
        """The kind and hyperparameters (JSON-ready), for manifests and logs."""
        out: dict[str, Any] = {"kind": self.kind, "lr": self.lr}
        if self.kind == "momentum":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        elif self.kind == "adam":
            out.update(momentum=self.momentum, beta2=self.beta2, eps=self.eps)
        return out

    def copy(self) -> ServerOptimizer:
        """An independent optimizer with the same settings and state (arrays shared, see above)."""
        other = ServerOptimizer(self.kind, lr=self.lr, momentum=self.momentum, beta2=self.beta2, eps=self.eps,
                                nesterov=self.nesterov)
        other.steps = self.steps
        other._m = dict(self._m)
        other._v = dict(self._v)
        return other

    @_quiet_fp
    def step(self, mean_delta: StateDict) -> dict[str, np.ndarray]:
        """The update for a round whose aggregated delta is ``mean_delta``; advances the state.

        Raises ValueError when tensor names or shapes differ from the state's, or when the
        result is not finite (the state is then left as it was)."""
        names = list(mean_delta.keys())
        if self._m and self._m.keys() != mean_delta.keys():
            _check_same_keys(self._m, mean_delta, "ServerOptimizer.step")
        t = self.steps + 1
        lr = np.float32(self.lr)
        new_m: dict[str, np.ndarray] = {}
        new_v: dict[str, np.ndarray] = {}
        update: dict[str, np.ndarray] = {}
        for name in names:
            d = np.asarray(as_numpy(mean_delta[name]), dtype=np.float32)
            if self.kind == "none":
                update[name] = d * lr if self.lr != 1.0 else d.copy()
                continue
            m = self._m.get(name)
            if m is not None and m.shape != d.shape:
                raise ValueError(f"ServerOptimizer.step: {name}: shape {d.shape} != state shape {m.shape}")
            if self.kind == "momentum":
                m = d.copy() if m is None else np.float32(self.momentum) * m + d
                u = np.float32(self.momentum) * m + d if self.nesterov else m
                update[name] = u * lr
                new_m[name] = m
            else:
                b1, b2 = np.float32(self.momentum), np.float32(self.beta2)
                m0 = np.zeros_like(d) if m is None else m
                v0 = self._v.get(name, np.zeros_like(d))
                m = b1 * m0 + (np.float32(1) - b1) * d
                v = b2 * v0 + (np.float32(1) - b2) * (d * d)
                m_hat = m / np.float32(1.0 - self.momentum ** t)
                v_hat = v / np.float32(1.0 - self.beta2 ** t)
                update[name] = lr * m_hat / (np.sqrt(v_hat) + np.float32(self.eps))
                new_m[name], new_v[name] = m, v
            if not np.isfinite(update[name]).all():
                raise ValueError(f"ServerOptimizer.step: {name}: the update is not finite")
        if self.kind == "none":
            for name, u in update.items():
                if not np.isfinite(u).all():
                    raise ValueError(f"ServerOptimizer.step: {name}: the update is not finite")
        self._m, self._v = new_m, new_v
        self.steps = t
        return update

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as numpy arrays: ``step`` (int64, shape (1,)) plus ``m/<tensor>`` and
        ``v/<tensor>`` (float32) as the kind keeps them (none before the first step)."""
        out = {"step": np.array([self.steps], dtype=np.int64)}
        out.update({f"m/{k}": v for k, v in self._m.items()})
        out.update({f"v/{k}": v for k, v in self._v.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Resume from :meth:`state_dict`'s arrays (an empty mapping: a fresh start).

        Raises ValueError when the state does not fit this kind (slots missing or extra, tensor
        names of ``m`` and ``v`` differing, a bad step count); the optimizer is then unchanged."""
        if not state:
            self.steps, self._m, self._v = 0, {}, {}
            return
        step = np.asarray(state.get("step", np.zeros(0)))
        if step.size != 1 or not np.issubdtype(step.dtype, np.integer) or int(step.reshape(-1)[0]) < 0:
            raise ValueError("server optimizer state: 'step' must be one non-negative integer")
        steps = int(step.reshape(-1)[0])
        slots: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}
        for key, arr in state.items():
            if key == "step":
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in slots or not name:
                raise ValueError(f"server optimizer state: unexpected entry {key!r}")
            slots[slot][name] = np.ascontiguousarray(as_numpy(arr), dtype=np.float32)
        for slot in ("m", "v"):
            if slots[slot] and slot not in self.slots:
                raise ValueError(f"server optimizer state has {slot!r} entries, which {self.kind} does not keep")
        if steps and self.slots:
            want = slots[self.slots[0]].keys()
            for slot in self.slots:
                if not slots[slot] or slots[slot].keys() != want:
                    raise ValueError(f"server optimizer state: {self.kind} needs {slot!r} for the same tensors "
                                     f"as {self.slots[0]!r}")
                for name, arr in slots[slot].items():
                    if arr.shape != slots[self.slots[0]][name].shape:
                        raise ValueError(f"server optimizer state: {slot}/{name}: shape differs")
        elif any(slots.values()):
            raise ValueError("server optimizer state: per-tensor entries at step 0")
        self.steps, self._m, self._v = steps, slots["m"], slots["v"]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    """What a delta of one adapter must look like: its tensor names and shapes."""

    adapter: str
    shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def from_state(cls, adapter: str, state: StateDict) -> AdapterSpec:
        return cls(adapter, {k: tuple(as_numpy(v).shape) for k, v in state.items()})

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


class Rejection(NamedTuple):
    """Why a delta was refused: a reason code (see the module docstring) and a human text."""

    code: str
    text: str


def _reject(code: str, text: str) -> Rejection:
    assert code in REASON_CODES, code
    return Rejection(code, text)


def validate_delta(
    delta: Delta,
    spec: AdapterSpec | None,
    *,
    current_version: int,
    max_staleness: int,
    max_norm: float | None = None,
    seen_ids: Container[str] = (),
    sender_check: Callable[[Delta], str | None] | None = None,
    check_values: bool = True,
) -> Rejection | None:
    """Check a received delta; None when it may be aggregated, else a :class:`Rejection`.

    ``spec`` is the adapter's spec (None: the adapter is unknown). ``seen_ids`` holds the ids of
    deltas already accepted. ``sender_check`` is the service's hook for the broker-authenticated
    sender: it returns None when the sender may publish this delta, else a text.
    Cheap checks run first; the values are read (one pass, chunk by chunk) only at the end, and
    only with ``check_values``: without it, ``non_finite`` and ``norm_too_large`` are left to
    :meth:`WeightedMeanAccumulator.add`, which checks them while folding the delta in.
    """
    if spec is None or spec.adapter != delta.adapter:
        return _reject("unknown_adapter", f"unknown adapter {delta.adapter!r}")
    if sender_check is not None:
        why = sender_check(delta)
        if why is not None:
            return _reject("unauthorized_sender", why)
    if delta.delta_id in seen_ids:
        return _reject("duplicate", f"delta {delta.delta_id} was already accepted")
    if delta.base_version < 0 or delta.base_version > current_version:
        return _reject("unknown_base_version",
                       f"base version {delta.base_version} is unknown (current is {current_version})")
    s = staleness(current_version, delta.base_version)
    if s > max_staleness:
        return _reject("stale", f"base version {delta.base_version} is {s} versions behind {current_version} "
                                f"(at most {max_staleness})")
    quant = delta.quant
    if quant not in WIRE_DTYPES:
        return _reject("bad_quant", f"unknown quant {quant!r}")
    if quant == "int8" and not (isinstance(delta.block, int) and delta.block > 0):
        return _reject("bad_quant", f"int8 delta needs a block size > 0, got {delta.block}")
    if delta.tensors.keys() != spec.shapes.keys():
        missing = sorted(set(spec.shapes) - set(delta.tensors))
        extra = sorted(set(delta.tensors) - set(spec.shapes))
        return _reject("tensor_names", f"tensor names differ from the adapter's: {len(missing)} missing "
                                       f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    want = WIRE_DTYPES[quant]
    for name, arr in delta.tensors.items():
        if tuple(arr.shape) != tuple(spec.shapes[name]):
            return _reject("tensor_shape", f"{name}: shape {tuple(arr.shape)}, expected {tuple(spec.shapes[name])}")
        if arr.dtype != want:
            return _reject("tensor_dtype", f"{name}: dtype {arr.dtype.name}, expected {want.name} for {quant}")
        if quant == "int8":
            sc = delta.scales.get(name)
            nb = num_blocks(arr.size, delta.block)
            if sc is None or sc.dtype != np.float32 or sc.shape != (nb,):
                got = "none" if sc is None else f"{sc.dtype.name}{tuple(sc.shape)}"
                return _reject("bad_quant", f"{name}: scales must be float32 of shape ({nb},), got {got}")
    if quant == "int8" and delta.scales.keys() != delta.tensors.keys():
        return _reject("bad_quant", "scales given for tensors that the delta does not have")
    if isinstance(delta.num_samples, bool) or not isinstance(delta.num_samples, int) or delta.num_samples <= 0:
        return _reject("bad_num_samples", f"num_samples must be a positive integer, got {delta.num_samples!r}")
    for key, value in delta.metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return _reject("non_finite_metrics", f"metric {key!r} is {value}")
    if quant == "int8":
        for name, sc in delta.scales.items():
            if not np.isfinite(sc).all():
                return _reject("non_finite", f"{name}: non-finite int8 scale")
    if not check_values:
        return None
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        return _reject("non_finite", "a tensor value is NaN or infinite")
    if max_norm is not None and norm > max_norm:
        return _norm_rejection(norm, max_norm)
    return None


def _norm_rejection(norm: float, max_norm: float, partial: bool = False) -> Rejection:
    what = "L2 norm of the tensors read so far" if partial else "L2 norm"
    return _reject("norm_too_large", f"{what} {norm:.4g} exceeds the bound {max_norm:.4g}")


# --------------------------------------------------------------------------------------------
# round policy
# --------------------------------------------------------------------------------------------

Decision = Literal["wait", "close", "expire"]


@dataclass(frozen=True)
class RoundPolicy:
    """When a round of updates ends.

    A round opens with its first accepted update (``opened_at``). :meth:`decide` says:

    * ``close`` at quorum (``num_tasks_per_round`` updates), or once ``round_timeout_s`` has passed
      since ``opened_at`` with at least ``min_updates_per_round`` updates: aggregate what is in.
    * ``expire`` once the timeout has passed with fewer updates: the round ends without a new
      version. Its updates are not applied; the service rejects them with reason ``round_expired``
      (dead-lettered, not requeued, so that their tasks can be issued again), and the next update
      opens a new round.
    * ``wait`` otherwise (always, for an empty round).
    """

    num_tasks_per_round: int = 4
    min_updates_per_round: int = 1
    round_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_tasks_per_round < 1:
            raise ValueError("num_tasks_per_round must be >= 1")
        if not 1 <= self.min_updates_per_round <= self.num_tasks_per_round:
            raise ValueError("min_updates_per_round must be between 1 and num_tasks_per_round")
        if not self.round_timeout_s > 0:
            raise ValueError("round_timeout_s must be > 0")

    def decide(self, now: float, n_updates: int, opened_at: float | None) -> Decision:
        if n_updates <= 0 or opened_at is None:
            return "wait"
        if n_updates >= self.num_tasks_per_round:
            return "close"
        if now - opened_at >= self.round_timeout_s:
            return "close" if n_updates >= self.min_updates_per_round else "expire"
        return "wait"

    def deadline(self, opened_at: float | None) -> float | None:
        """When the open round times out (None for an empty round): when to call decide again."""
        return None if opened_at is None else opened_at + self.round_timeout_s
