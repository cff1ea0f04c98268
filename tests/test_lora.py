"""Unit tests of the pure LoRA maths (npcbus.lora): no broker, no torch."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npcbus import codec, lora
from npcbus.messages import Delta

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"


def adapter_state(rng: np.random.Generator, layers: int = 2, hidden: int = 96, rank: int = 4,
                  scale: float = 0.01) -> dict[str, np.ndarray]:
    state = {}
    for i in range(layers):
        for m in ("q", "v"):
            state[PREFIX.format(i=i, m=m, ab="A")] = (rng.standard_normal((rank, hidden)) * scale).astype(np.float32)
            state[PREFIX.format(i=i, m=m, ab="B")] = (rng.standard_normal((hidden, rank)) * scale).astype(np.float32)
    return state


def roundtrip(delta: Delta) -> Delta:
    return codec.decode(codec.encode(delta))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


# ------------------------------------------------------------------------------ deltas


def test_compute_and_apply_delta_roundtrip(rng):
    base = adapter_state(rng)
    new = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.001 for k, v in base.items()}
    d = lora.compute_delta(new, base)
    assert all(v.dtype == np.float32 for v in d.values())
    back = lora.apply_delta(base, d)
    for k in base:
        np.testing.assert_allclose(back[k], new[k], rtol=0, atol=1e-7)
    half = lora.apply_delta(base, d, scale=0.5)
    k0 = next(iter(base))
    np.testing.assert_allclose(half[k0], base[k0] + 0.5 * d[k0], atol=1e-7)


def test_compute_delta_rejects_mismatch(rng):
    base = adapter_state(rng)
    new = dict(base)
    new.pop(next(iter(new)))
    with pytest.raises(ValueError, match="names differ"):
        lora.compute_delta(new, base)
    k0 = next(iter(base))
    with pytest.raises(ValueError, match="shape"):
        lora.compute_delta({**base, k0: np.zeros((1, 1), np.float32)}, base)


def test_delta_norm_matches_numpy(rng):
    d = adapter_state(rng, scale=1.0)
    expect = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    assert lora.delta_norm(d) == pytest.approx(expect, rel=1e-5)
    msg = roundtrip(lora.make_delta(d, adapter="a", base_version=0, num_samples=1, quant="fp32"))
    assert lora.delta_norm(msg) == pytest.approx(expect, rel=1e-5)


def test_delta_norm_large_finite_values_do_not_overflow():
    d = {"x": np.full(4, 1e20, np.float32)}  # squares overflow float32
    assert lora.delta_norm(d) == pytest.approx(2e20, rel=1e-6)
    assert math.isnan(lora.delta_norm({"x": np.array([1.0, np.nan], np.float32)}))
    assert math.isinf(lora.delta_norm({"x": np.array([1.0, -np.inf], np.float32)}))


def test_make_delta_and_back_through_codec_zero_copy(rng):
    d = adapter_state(rng)
    for quant in ("fp16", "fp32", "int8"):
        msg = roundtrip(lora.make_delta(d, adapter="a", base_version=3, num_samples=5, quant=quant, block=64,
                                        metrics={"loss_mean": 1.5}))
        assert msg.quant == quant and msg.base_version == 3 and msg.num_samples == 5
        k0 = next(iter(d))
        assert not msg.tensors[k0].flags.writeable  # the codec's view of the received buffer
        assert msg.tensors[k0].dtype == lora.WIRE_DTYPES[quant]
        back = lora.delta_tensors_fp32(msg)
        assert back[k0].dtype == np.float32 and back[k0].flags.writeable
        tol = {"fp16": 1e-5, "fp32": 0, "int8": 1e-3}[quant]
        for k in d:
            np.testing.assert_allclose(back[k], d[k], atol=tol, rtol=1e-3 if quant == "fp16" else 0)


def test_make_delta_refuses_fp16_overflow():
    with pytest.raises(ValueError, match="float16"):
        lora.make_delta({"x": np.array([1e6], np.float32)}, adapter="a", base_version=0, num_samples=1)
    with pytest.raises(ValueError, match="unknown quant"):
        lora.make_delta({"x": np.zeros(2, np.float32)}, adapter="a", base_version=0, num_samples=1, quant="int4")


# ------------------------------------------------------------------------------ quantization


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=40),
                 elements=st.floats(-1e4, 1e4, width=32)),
    block=st.sampled_from([1, 7, 32, 256]),
)
def test_int8_error_bound(x, block):
    q, scales = lora.quantize_int8(x, block)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert scales.dtype == np.float32 and scales.shape == (lora.num_blocks(x.size, block),)
    assert np.abs(q.astype(np.int16)).max(initial=0) <= 127
    deq = lora.dequantize_int8(q, scales, block)
    per_elem_scale = np.repeat(scales, block)[: x.size].reshape(x.shape).astype(np.float64)
    err = np.abs(x.astype(np.float64) - deq.astype(np.float64))
    # the documented bound, plus float32 rounding of q * scale (relative 2**-24 of |deq|)
    bound = per_elem_scale / 2 + np.abs(deq.astype(np.float64)) * 2.0 ** -23
    assert (err <= bound).all()


def test_int8_zero_block_and_nonfinite():
    q, s = lora.quantize_int8(np.zeros(10, np.float32), 4)
    assert (q == 0).all() and (s == 0).all()
    assert (lora.dequantize_int8(q, s, 4) == 0).all()
    with pytest.raises(ValueError, match="non-finite"):
        lora.quantize_int8(np.array([1.0, np.inf], np.float32))


def test_int8_wire_size_about_half_of_fp16(rng):
    d = adapter_state(rng, hidden=512, rank=16)
    fp16 = len(codec.encode(lora.make_delta(d, adapter="a", base_version=0, num_samples=1)))
    int8 = len(codec.encode(lora.make_delta(d, adapter="a", base_version=0, num_samples=1, quant="int8")))
    assert int8 <= 0.55 * fp16


# ------------------------------------------------------------------------------ aggregation


def test_staleness_weights():
    assert lora.staleness(5, 5) == 0 and lora.staleness(5, 3) == 2
    assert lora.staleness_weight(0) == 1.0
    assert lora.staleness_weight(3, alpha=0.5) == pytest.approx(0.5)
    assert lora.staleness_weight(1, alpha=1.0) == pytest.approx(0.5)
    assert lora.staleness_weight(2, alpha=0.0) == 1.0
    ws = [lora.staleness_weight(s) for s in range(6)]
    assert all(a > b for a, b in zip(ws, ws[1:], strict=False))
    assert lora.delta_weight(10, current_version=4, base_version=1, alpha=0.5) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        lora.staleness_weight(-1)


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8"])
def test_weighted_mean_streaming_matches_numpy(rng, quant):
    deltas = [adapter_state(rng, scale=1.0) for _ in range(5)]
    weights = [3.0, 1.0, 0.5, 7.0, 2.25]
    msgs = [roundtrip(lora.make_delta(d, adapter="a", base_version=0, num_samples=1, quant=quant, block=32))
            for d in deltas]
    acc = lora.WeightedMeanAccumulator()
    for m, w in zip(msgs, weights, strict=True):
        acc.add(m, w)
    assert acc.count == 5 and acc.total_weight == pytest.approx(sum(weights))
    got = acc.result()
    tol = {"fp32": 1e-6, "fp16": 2e-3, "int8": 3e-2}[quant]
    for k in deltas[0]:
        expect = sum(w * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], expect, atol=tol, rtol=0)
    # mappings work the same, and the convenience dispatcher agrees
    agg = lora.aggregate(msgs, weights)
    for k in got:
        np.testing.assert_array_equal(agg[k], got[k])


def test_weighted_mean_large_tensor_spans_chunks(rng):
    big = {"w": rng.standard_normal(lora.CHUNK_ELEMS * 2 + 333).astype(np.float32)}
    other = {"w": rng.standard_normal(big["w"].shape).astype(np.float32)}
    msgs = [roundtrip(lora.make_delta(x, adapter="a", base_version=0, num_samples=1, quant="int8", block=100))
            for x in (big, other)]
    acc = lora.WeightedMeanAccumulator({"w": big["w"].shape})
    acc.add(msgs[0], 1.0)
    acc.add(msgs[1], 3.0)
    expect = (lora.tensor_fp32(msgs[0], "w") + 3 * lora.tensor_fp32(msgs[1], "w")) / 4
    np.testing.assert_allclose(acc.result()["w"], expect, atol=1e-6)


def test_weighted_mean_errors(rng):
    acc = lora.WeightedMeanAccumulator()
    with pytest.raises(ValueError, match="no delta"):
        acc.result()
    d = adapter_state(rng)
    with pytest.raises(ValueError, match="weight"):
        acc.add(d, 0.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add(d, float("nan"))
    acc.add(d, 1.0)
    wrong = dict(d)
    wrong.pop(next(iter(wrong)))
    with pytest.raises(ValueError, match="names differ"):
        acc.add(wrong, 1.0)
    acc.reset()
    assert acc.count == 0 and acc.total_weight == 0.0


@settings(max_examples=40, deadline=None)
@given(
    vals=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(1, 5)),
                    elements=st.floats(-100, 100, width=32)),
    trim=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.4]),
)
def test_median_and_trimmed_mean_match_numpy(vals, trim):
    deltas = [{"t": vals[i]} for i in range(vals.shape[0])]
    med = lora.coordinate_median(deltas)["t"]
    np.testing.assert_allclose(med, np.median(vals, axis=0), rtol=1e-6, atol=1e-5)
    n = vals.shape[0]
    k = lora.trim_count(n, trim)
    assert 0 <= k and n - 2 * k >= 1
    srt = np.sort(vals.astype(np.float64), axis=0)
    expect = srt[k:n - k].mean(axis=0)
    np.testing.assert_allclose(lora.trimmed_mean(deltas, trim)["t"], expect, rtol=1e-5, atol=1e-4)


def test_robust_aggregates_resist_an_outlier(rng):
    good = [adapter_state(rng) for _ in range(6)]
    bad = {k: np.full_like(v, 1e3) for k, v in good[0].items()}
    msgs = [roundtrip(lora.make_delta(d, adapter="a", base_version=0, num_samples=1, quant="fp16"))
            for d in [*good, bad]]
    k0 = next(iter(good[0]))
    med = lora.aggregate(msgs, method="median")[k0]
    trimmed = lora.aggregate(msgs, method="trimmed_mean", trim_ratio=0.2)[k0]
    mean = lora.aggregate(msgs)[k0]
    assert np.abs(med).max() < 0.1 and np.abs(trimmed).max() < 0.1 and np.abs(mean).max() > 100
    assert lora.trim_count(7, 0.2) == 1 and lora.trim_count(2, 0.49) == 0
    with pytest.raises(ValueError):
        lora.trim_count(5, 0.5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        lora.aggregate(msgs, method="mode")


# ------------------------------------------------------------------------------ validation


@pytest.fixture
def spec_and_delta(rng):
    d = adapter_state(rng)
    spec = lora.AdapterSpec.from_state("guard", d)
    msg = roundtrip(lora.make_delta(d, adapter="guard", base_version=4, num_samples=8, delta_id="d1",
                                    worker_id="w1", metrics={"loss_mean": 1.2, "steps": 3}))
    return spec, d, msg


def check(msg, spec, **kw):
    args = {"current_version": 5, "max_staleness": 2, "max_norm": 100.0}
    args.update(kw)
    return lora.validate_delta(msg, spec, **args)


def _with(msg: Delta, **changes) -> Delta:
    return dataclasses.replace(msg, **changes)


def test_validate_accepts_good_delta(spec_and_delta):
    spec, _d, msg = spec_and_delta
    assert check(msg, spec) is None
    assert spec.num_params == sum(v.size for v in _d.values())
    int8 = roundtrip(lora.make_delta(_d, adapter="guard", base_version=5, num_samples=1, quant="int8", block=64))
    assert check(int8, spec) is None


def test_validate_reason_codes(spec_and_delta, rng):
    spec, d, msg = spec_and_delta
    k0 = next(iter(d))
    cases = {
        "unknown_adapter": (msg, None, {}),
        "unauthorized_sender": (msg, spec, {"sender_check": lambda m: "user w2 may not publish for w1"}),
        "duplicate": (msg, spec, {"seen_ids": {"d1"}}),
        "unknown_base_version": (_with(msg, base_version=9), spec, {}),
        "stale": (_with(msg, base_version=1), spec, {}),
        "bad_quant": (_with(msg, quant="int4"), spec, {}),
        "tensor_names": (_with(msg, tensors={k: v for k, v in msg.tensors.items() if k != k0}), spec, {}),
        "tensor_shape": (_with(msg, tensors={**msg.tensors, k0: np.zeros((1, 2), np.float16)}), spec, {}),
        "tensor_dtype": (_with(msg, tensors={**msg.tensors, k0: msg.tensors[k0].astype(np.float32)}), spec, {}),
        "bad_num_samples": (_with(msg, num_samples=0), spec, {}),
        "non_finite_metrics": (_with(msg, metrics={"loss_mean": float("nan")}), spec, {}),
        "non_finite": (_with(msg, tensors={**msg.tensors, k0: np.full_like(msg.tensors[k0], np.inf)}), spec, {}),
        "norm_too_large": (msg, spec, {"max_norm": 1e-3}),
    }
    for code, (m, s, kw) in cases.items():
        r = check(m, s, **kw)
        assert r is not None and r.code == code, (code, r)
        assert r.text and code in lora.REASON_CODES
    assert check(_with(spec_and_delta[2], adapter="other"), spec).code == "unknown_adapter"
    assert check(_with(msg, base_version=-1), spec).code == "unknown_base_version"
    assert check(msg, spec, sender_check=lambda m: None) is None
    # stale exactly at the limit is still accepted
    assert check(_with(msg, base_version=3), spec) is None


def test_validate_int8_specifics(spec_and_delta):
    spec, d, _ = spec_and_delta
    msg = roundtrip(lora.make_delta(d, adapter="guard", base_version=5, num_samples=1, quant="int8", block=64))
    k0 = next(iter(d))
    assert check(_with(msg, block=0), spec).code == "bad_quant"
    assert check(_with(msg, scales={k: v for k, v in msg.scales.items() if k != k0}), spec).code == "bad_quant"
    assert check(_with(msg, scales={**msg.scales, k0: msg.scales[k0][:-1]}), spec).code == "bad_quant"
    bad_scale = np.array(msg.scales[k0])
    bad_scale[0] = np.nan
    assert check(_with(msg, scales={**msg.scales, k0: bad_scale}), spec).code == "non_finite"


# ------------------------------------------------------------------------------ round policy


def test_round_policy():
    p = lora.RoundPolicy(num_tasks_per_round=4, min_updates_per_round=2, round_timeout_s=60)
    assert p.decide(now=1000, n_updates=0, opened_at=None) == "wait"
    assert p.decide(now=1000, n_updates=1, opened_at=990) == "wait"
    assert p.decide(now=1000, n_updates=4, opened_at=999) == "close"  # quorum
    assert p.decide(now=1000, n_updates=5, opened_at=999) == "close"
    assert p.decide(now=1050, n_updates=3, opened_at=1000) == "wait"
    assert p.decide(now=1060, n_updates=2, opened_at=1000) == "close"  # timeout with the minimum
    assert p.decide(now=1060, n_updates=1, opened_at=1000) == "expire"  # timeout with too few
    assert p.deadline(1000) == 1060 and p.deadline(None) is None
    with pytest.raises(ValueError):
        lora.RoundPolicy(num_tasks_per_round=2, min_updates_per_round=3)
    with pytest.raises(ValueError):
        lora.RoundPolicy(round_timeout_s=0)


def test_fast_fp16_conversion_is_exact_for_every_value():
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    for weight in (1.0, 0.37, 3.0e4, 1.0e6):
        got = lora.tensor_fp32({"x": every}, "x") if weight == 1.0 else None
        msg = Delta(delta_id="d", task_id="", adapter="a", base_version=0, worker_id="", num_samples=1,
                    tensors={"x": every}, quant="fp16")
        acc = lora.WeightedMeanAccumulator()
        why = acc.add(msg, weight)
        assert why is not None and why.code == "non_finite"  # the infinities and NaNs are caught
        finite = every[np.isfinite(every)]
        expect = (finite.astype(np.float32) * np.float32(weight)).astype(np.float32)
        out = np.empty(finite.size, np.float32)
        ss = lora._f16_to_f32(finite, out, weight)
        np.testing.assert_array_equal(out, expect)
        assert ss == pytest.approx(float(np.dot(expect.astype(np.float64), expect)), rel=1e-4)
        if got is not None:
            np.testing.assert_array_equal(got, every.astype(np.float32))  # infinities and NaNs kept


def test_accumulator_checks_values_and_rolls_back(rng):
    good = [adapter_state(rng) for _ in range(3)]
    msgs = [roundtrip(lora.make_delta(d, adapter="a", base_version=0, num_samples=1)) for d in good]
    acc = lora.WeightedMeanAccumulator()
    assert acc.add(msgs[0], 2.0, max_norm=10.0) is None
    assert acc.last_norm == pytest.approx(lora.delta_norm(msgs[0]), rel=1e-5)
    before = {k: v.copy() for k, v in acc._sums.items()}
    # too large: refused, the sums are as they were (up to float32 rounding)
    assert acc.add(msgs[1], 3.0, max_norm=lora.delta_norm(msgs[1]) * 0.9).code == "norm_too_large"
    # a NaN in the last tensor: refused after the others were folded in, then rolled back
    k_last = list(good[2])[-1]
    bad = dict(msgs[2].tensors)
    poisoned = np.array(bad[k_last])
    poisoned[-1, -1] = np.nan
    bad[k_last] = poisoned
    assert acc.add(dataclasses.replace(msgs[2], tensors=bad), 1.0).code == "non_finite"
    assert acc.count == 1 and acc.total_weight == 2.0
    for k in before:
        np.testing.assert_allclose(acc._sums[k], before[k], rtol=0, atol=1e-7)
    assert acc.add(msgs[2], 1.0, max_norm=10.0) is None
    expect = (2 * lora.tensor_fp32(msgs[0], k_last) + lora.tensor_fp32(msgs[2], k_last)) / 3
    np.testing.assert_allclose(acc.result()[k_last], expect, atol=1e-7)


def test_validate_without_value_pass_then_fold(spec_and_delta):
    spec, _d, msg = spec_and_delta
    k0 = next(iter(msg.tensors))
    inf = _with(msg, tensors={**msg.tensors, k0: np.full_like(msg.tensors[k0], np.inf)})
    assert check(inf, spec, check_values=False) is None  # left to the accumulator
    assert lora.WeightedMeanAccumulator().add(inf, 1.0).code == "non_finite"
    assert check(inf, spec).code == "non_finite"


# ------------------------------------------------------------------------------ server optimizer


def _ref_server_updates(kind: str, deltas: list[dict], *, lr: float, momentum: float = 0.9, beta2: float = 0.99,
                        eps: float = 1e-8, nesterov: bool = False) -> list[dict]:
    """The server optimizers written out element by element, in float64 (the reference)."""
    out = []
    m: dict = {}
    v: dict = {}
    for t, delta in enumerate(deltas, 1):
        update = {}
        for name, d in delta.items():
            flat = [float(x) for x in d.reshape(-1)]
            mm = m.get(name, [0.0] * len(flat))
            vv = v.get(name, [0.0] * len(flat))
            u = []
            for i, g in enumerate(flat):
                if kind == "none":
                    u.append(lr * g)
                elif kind == "momentum":
                    mm[i] = momentum * mm[i] + g
                    u.append(lr * (momentum * mm[i] + g if nesterov else mm[i]))
                else:
                    mm[i] = momentum * mm[i] + (1 - momentum) * g
                    vv[i] = beta2 * vv[i] + (1 - beta2) * g * g
                    m_hat = mm[i] / (1 - momentum ** t)
                    v_hat = vv[i] / (1 - beta2 ** t)
                    u.append(lr * m_hat / (math.sqrt(v_hat) + eps))
            m[name], v[name] = mm, vv
            update[name] = np.array(u).reshape(d.shape)
        out.append(update)
    return out


def _round_deltas(rng, n: int = 4) -> list[dict]:
    # small, LoRA-sized aggregates; a shared drift plus noise, as successive rounds give
    drift = {k: rng.standard_normal(s).astype(np.float32) * 1e-3 for k, s in (("a", (3, 5)), ("b", (5, 3)))}
    return [{k: (d + rng.standard_normal(d.shape).astype(np.float32) * 5e-4).astype(np.float32)
             for k, d in drift.items()} for _ in range(n)]


@pytest.mark.parametrize("kind, kw", [
    ("none", {"lr": 1.0}),
    ("none", {"lr": 2.5}),
    ("momentum", {"lr": 1.0, "momentum": 0.9}),
    ("momentum", {"lr": 0.7, "momentum": 0.5, "nesterov": True}),
    ("adam", {"lr": 0.01, "momentum": 0.9, "beta2": 0.99, "eps": 1e-8}),
    ("adam", {"lr": 0.003, "momentum": 0.5, "beta2": 0.9, "eps": 1e-3}),
])
def test_server_optimizer_matches_reference(rng, kind, kw):
    deltas = _round_deltas(rng, 5)
    opt = lora.ServerOptimizer(kind, **kw)
    want = _ref_server_updates(kind, deltas, **kw)
    for t, (d, ref) in enumerate(zip(deltas, want, strict=True), 1):
        got = opt.step(d)
        assert opt.steps == t and got.keys() == d.keys()
        for name in d:
            assert got[name].dtype == np.float32 and got[name].shape == d[name].shape
            np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=1e-9 * kw["lr"])


def test_server_momentum_builds_up_along_a_steady_direction():
    d = {"w": np.full((2, 2), 1e-3, np.float32)}
    opt = lora.ServerOptimizer("momentum", lr=1.0, momentum=0.5)
    sizes = [float(opt.step(d)["w"][0, 0]) for _ in range(12)]
    assert sizes[0] == pytest.approx(1e-3) and sizes[1] == pytest.approx(1.5e-3)
    assert sizes[-1] == pytest.approx(2e-3, rel=1e-3)  # 1 / (1 - momentum) times the steady aggregate
    # adam moves each element by about lr per round whatever the aggregates' scale
    for scale in (1e-5, 1e-2):
        ad = lora.ServerOptimizer("adam", lr=0.01, momentum=0.9, beta2=0.99, eps=1e-12)
        u = ad.step({"w": np.full((3,), scale, np.float32)})["w"]
        np.testing.assert_allclose(u, 0.01, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "momentum", "adam"])
def test_server_optimizer_state_roundtrip_resumes_exactly(rng, kind):
    deltas = _round_deltas(rng, 6)
    kw = {"lr": 0.01} if kind == "adam" else {"lr": 1.0, "momentum": 0.6}
    straight = lora.ServerOptimizer(kind, **kw)
    first = [straight.step(d) for d in deltas]
    opt = lora.ServerOptimizer(kind, **kw)
    for d in deltas[:3]:
        opt.step(d)
    state = opt.state_dict()
    assert state["step"].dtype == np.int64 and state["step"].tolist() == [3]
    slots = {"none": set(), "momentum": {"m"}, "adam": {"m", "v"}}[kind]
    assert {k.split("/")[0] for k in state if k != "step"} == slots
    assert all(v.dtype == np.float32 for k, v in state.items() if k != "step")
    saved = {k: v.copy() for k, v in state.items()}
    resumed = lora.ServerOptimizer(kind, **kw)
    resumed.load_state_dict(saved)
    assert resumed.steps == 3
    for d, want in zip(deltas[3:], first[3:], strict=True):
        got = resumed.step(d)
        for name in d:
            np.testing.assert_array_equal(got[name], want[name])
    # the earlier state dict was not written into by later steps (a caller may keep it)
    opt.step(deltas[3])
    for k, v in saved.items():
        np.testing.assert_array_equal(state[k], v)
    # a copy steps on its own
    twin = resumed.copy()
    twin.step(deltas[0])
    assert twin.steps == resumed.steps + 1
    for k, v in resumed.state_dict().items():
        if k != "step":
            assert not np.array_equal(v, twin.state_dict()[k])
    # an empty state is a fresh start
    resumed.load_state_dict({})
    assert resumed.steps == 0 and resumed.state_dict().keys() == {"step"}


def test_server_optimizer_refuses_bad_settings_and_state(rng):
    for kw in ({"lr": 0.0}, {"lr": math.inf}, {"momentum": 1.0}, {"momentum": -0.1}, {"beta2": 1.0}, {"eps": 0.0}):
        with pytest.raises(ValueError):
            lora.ServerOptimizer("adam", **kw)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        lora.ServerOptimizer("sgd")
    deltas = _round_deltas(rng, 2)
    mom = lora.ServerOptimizer("momentum")
    mom.step(deltas[0])
    adam = lora.ServerOptimizer("adam", lr=0.01)
    adam.step(deltas[0])
    before = adam.state_dict()
    bad_states = [
        mom.state_dict(),  # no second moments for adam
        {**before, "step": np.array([1.5])},
        {**before, "step": np.array([-1], np.int64)},
        {**before, "x/a": before["m/a"]},
        {k: v for k, v in before.items() if k != "v/b"},
        {**before, "v/b": np.zeros((2, 2), np.float32)},
        {"step": np.array([0], np.int64), "m/a": before["m/a"], "v/a": before["v/a"]},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError):
            adam.load_state_dict(bad)
        assert adam.steps == 1 and adam.state_dict().keys() == before.keys()  # unchanged
    with pytest.raises(ValueError, match="does not keep"):
        mom.load_state_dict(before)  # momentum has no 'v'
    # names or shapes that differ from the state's, and non-finite results, leave the state as it was
    with pytest.raises(ValueError, match="names differ"):
        mom.step({"a": deltas[1]["a"]})
    with pytest.raises(ValueError, match="shape"):
        mom.step({"a": np.zeros((2, 2), np.float32), "b": deltas[1]["b"]})
    with pytest.raises(ValueError, match="not finite"):
        mom.step({"a": np.full((3, 5), np.inf, np.float32), "b": deltas[1]["b"]})
    assert mom.steps == 1
    np.testing.assert_array_equal(mom.state_dict()["m/a"], deltas[0]["a"])
