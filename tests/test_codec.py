"""Codec: every message type round-trips; tensors are bit-exact and zero-copy; bad input raises CodecError."""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npcbus import messages as M
from npcbus.codec import SUPPORTED_DTYPES, CodecError, decode, encode

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)

DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


def arrays():
    return st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))


def strategy_for(typ):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        return st.one_of(*[strategy_for(a) for a in args])
    if typ is type(None):
        return st.none()
    if typ is str:
        return st.text(max_size=30)
    if typ is int:
        return st.integers(-(2**62), 2**62)
    if typ is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if typ is bool:
        return st.booleans()
    if typ is bytes:
        return st.binary(max_size=64)
    if typ is np.ndarray:
        return arrays()
    if origin is dict or typ is dict:
        if args and args[1] is np.ndarray:
            return st.dictionaries(st.text(min_size=1, max_size=10), arrays(), max_size=3)
        if args and args[1] is bytes:
            return st.dictionaries(st.text(min_size=1, max_size=10), st.binary(max_size=64), max_size=3)
        return st.dictionaries(st.text(max_size=8), json_value, max_size=4)
    if origin is list or typ is list:
        return st.lists(strategy_for(args[0]) if args else json_value, max_size=4)
    raise NotImplementedError(typ)


def message_strategy(cls):
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **kwargs)


def assert_equal_messages(a, b):
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                assert x[k].tobytes() == y[k].tobytes()
        else:
            assert x == y, f.name


@pytest.mark.parametrize("cls", list(M.REGISTRY.values()), ids=lambda c: c.TYPE)
def test_every_message_type_round_trips(cls):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(message_strategy(cls))
    def check(msg):
        assert_equal_messages(msg, decode(encode(msg)))

    check()


@pytest.mark.parametrize("dtype", sorted(SUPPORTED_DTYPES))
def test_tensors_round_trip_bit_exact_and_zero_copy(dtype):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    itemsize = np.dtype(dtype).itemsize
    arr = np.frombuffer(raw[: (4096 // itemsize) * itemsize], dtype=dtype).reshape(-1, 8)
    if dtype == "bool":
        arr = arr.astype(bool)
    msg = M.Delta("d", "t", "a", 0, "w", 1, tensors={"x": arr, "empty": np.zeros((0, 3), dtype)})
    body = encode(msg)
    out = decode(body)
    assert out.tensors["x"].tobytes() == arr.tobytes()  # bit-exact, NaN payloads included
    assert out.tensors["x"].dtype == arr.dtype and out.tensors["x"].shape == arr.shape
    assert out.tensors["empty"].shape == (0, 3)
    # zero-copy: the decoded array is a view of the received buffer
    assert not out.tensors["x"].flags.owndata
    assert np.shares_memory(out.tensors["x"], np.frombuffer(body, np.uint8))


def test_non_contiguous_and_big_endian_tensors():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    b = np.arange(5, dtype=">i4")
    out = decode(encode(M.Delta("d", "t", "a", 0, "w", 1, tensors={"a": a, "b": b})))
    np.testing.assert_array_equal(out.tensors["a"], a)
    np.testing.assert_array_equal(out.tensors["b"], b)


def test_unknown_fields_tolerated():
    body = encode(M.Cancel("r1"))
    import struct

    hlen = struct.unpack_from("<I", body, 4)[0]
    header = msgpack.unpackb(body[8:8 + hlen])
    header["future_field"] = {"x": 1}
    packed = msgpack.packb(header)
    out = decode(body[:4] + struct.pack("<I", len(packed)) + packed)
    assert out == M.Cancel("r1")


def _frame(header: dict) -> bytes:
    import struct

    packed = msgpack.packb(header)
    return b"NB\x01\x00" + struct.pack("<I", len(packed)) + packed


def test_missing_required_field_named():
    with pytest.raises(CodecError, match="request_id"):
        decode(_frame({"v": 1, "type": "cancel"}))


def test_mistyped_field_named():
    with pytest.raises(CodecError, match="'steps'"):
        decode(_frame({"v": 1, "type": "training_task", "task_id": "t", "adapter": "a", "data": {}, "steps": "ten"}))
    with pytest.raises(CodecError, match="'seq'"):
        decode(_frame({"v": 1, "type": "token_delta", "request_id": "r", "seq": True, "text": "x"}))


def test_unknown_type_and_newer_version():
    with pytest.raises(CodecError, match="unknown message type"):
        decode(_frame({"v": 1, "type": "nope"}))
    with pytest.raises(CodecError, match="newer"):
        decode(_frame({"v": 99, "type": "cancel", "request_id": "r"}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_codec_error_only(data):
    try:
        decode(data)
    except CodecError:
        pass


@settings(max_examples=200, deadline=None)
@given(message_strategy(M.Delta), st.data())
def test_truncated_or_flipped_input_raises_codec_error_only(msg, data):
    body = encode(msg)
    cut = data.draw(st.integers(0, max(0, len(body) - 1)))
    for bad in (body[:cut], body[:cut] + bytes([body[cut] ^ 0xFF]) + body[cut + 1:]):
        try:
            decode(bad)
        except CodecError:
            pass


def test_wrong_types_raise_codec_error():
    for bad in ["text", 12, None, [1, 2]]:
        with pytest.raises(CodecError):
            decode(bad)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode(_frame([1, 2, 3]))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="size mismatch"):
        import struct

        ext = msgpack.ExtType(1, msgpack.packb(["float32", [4], 0, 8]))
        packed = msgpack.packb({"v": 1, "type": "delta", "delta_id": "d", "task_id": "t", "adapter": "a",
                                "base_version": 0, "worker_id": "w", "num_samples": 1, "tensors": {"x": ext}})
        decode(b"NB\x01\x00" + struct.pack("<I", len(packed)) + packed + b"\0" * 16)


def test_encode_rejects_non_messages():
    with pytest.raises(CodecError):
        encode(object())  # type: ignore[arg-type]


def test_adapter_list_reply_keeps_only_well_formed_entries():
    reply = decode(encode(M.AdapterListReply([
        {"adapter": "innkeeper", "version": 2, "base_model": "m", "content_hash": "h2", "parent": 1},
        {"adapter": "blacksmith", "version": 0, "content_hash": "h0"},
        {"adapter": "bad", "version": True, "content_hash": "x"},  # a boolean is no version
        {"adapter": "", "version": 1, "content_hash": "x"},
        {"version": 1, "content_hash": "x"},
    ])))
    anns = reply.announcements()
    assert [(a.adapter, a.version, a.base_model, a.content_hash, a.parent) for a in anns] == [
        ("innkeeper", 2, "m", "h2", 1), ("blacksmith", 0, "", "h0", None)]
    with pytest.raises(CodecError, match="versions"):
        decode(encode(M.AdapterListReply(["not a map"])))  # type: ignore[list-item]
