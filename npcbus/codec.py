"""Wire codec for :mod:`npcbus.messages`.

Frame layout (all integers little-endian)::

    b"NB" | u8 frame version (1) | u8 flags (0) | u32 header length | msgpack header | tensor bytes

The msgpack header is a map with ``v`` (protocol version), ``type`` (the registered message type)
and the message's fields. A ``numpy.ndarray`` value is written in the header as msgpack extension
type 1 holding ``[dtype, shape, offset, nbytes]``; its bytes follow the header, each tensor at a
64-byte aligned offset from the start of the tensor section. Decoding returns read-only numpy views
of the received buffer: no tensor byte is copied.

Every decoding failure raises :class:`CodecError`, whose message names the offending field.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from functools import cache
from typing import Any, Union

import msgpack
import numpy as np

from npcbus.messages import PROTOCOL_VERSION, REGISTRY, Message

MAGIC = b"NB"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<2sBBI")
_ALIGN = 64
_EXT_NDARRAY = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024

SUPPORTED_DTYPES = {
    "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
    "uint64", "bool",
}


class CodecError(ValueError):
    """A message could not be encoded or decoded; the text says why and names the field."""


def _encode_array(arr: np.ndarray, blobs: list, pos: list[int]) -> msgpack.ExtType:
    if arr.dtype.name not in SUPPORTED_DTYPES:
        raise CodecError(f"unsupported tensor dtype {arr.dtype.name!r}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    offset = pos[0]
    pad = (-offset) % _ALIGN
    if pad:
        blobs.append(b"\0" * pad)
        offset += pad
    nbytes = arr.nbytes
    blobs.append(memoryview(arr.reshape(-1)).cast("B") if nbytes else b"")
    pos[0] = offset + nbytes
    meta = msgpack.packb([arr.dtype.name, list(arr.shape), offset, nbytes], use_bin_type=True)
    return msgpack.ExtType(_EXT_NDARRAY, meta)


def encode(msg: Message) -> bytes:
    """Encode a message to bytes."""
    if not dataclasses.is_dataclass(msg) or not getattr(msg, "TYPE", ""):
        raise CodecError(f"not a registered message: {type(msg).__name__}")
    blobs: list = []
    pos = [0]

    def default(obj):
        if isinstance(obj, np.ndarray):
            return _encode_array(obj, blobs, pos)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        if isinstance(obj, memoryview):
            return obj.tobytes()
        raise TypeError(f"cannot encode {type(obj).__name__}")

    header = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for name in _field_names(type(msg)):
        header[name] = getattr(msg, name)
    try:
        packed = msgpack.packb(header, default=default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode {msg.TYPE}: {e}") from e
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, 0, len(packed))
    return b"".join([prefix, packed, *blobs])


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def _required(cls: type) -> tuple[set[str], tuple[dataclasses.Field, ...]]:
    fields = tuple(f for f in dataclasses.fields(cls) if f.init)
    req = {
        f.name for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    }
    return req, fields


def _typename(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _check(value: Any, typ: Any, path: str) -> Any:
    if typ is Any:
        return value
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path)
            except CodecError as e:
                errors.append(str(e))
        raise CodecError(f"field {path!r}: expected {_typename(typ)}, got {type(value).__name__}")
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CodecError(f"field {path!r}: expected a number, got {type(value).__name__}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError(f"field {path!r}: expected an integer, got {type(value).__name__}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise CodecError(f"field {path!r}: expected a boolean, got {type(value).__name__}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise CodecError(f"field {path!r}: expected a string, got {type(value).__name__}")
        return value
    if typ is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise CodecError(f"field {path!r}: expected bytes, got {type(value).__name__}")
        return bytes(value)
    if typ is np.ndarray:
        if not isinstance(value, np.ndarray):
            raise CodecError(f"field {path!r}: expected a tensor, got {type(value).__name__}")
        return value
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise CodecError(f"field {path!r}: expected a map, got {type(value).__name__}")
        if args:
            kt, vt = args
            return {_check(k, kt, f"{path}.<key>"): _check(v, vt, f"{path}.{k}") for k, v in value.items()}
        return value
    if typ is list or origin is list:
        if not isinstance(value, list):
            raise CodecError(f"field {path!r}: expected a list, got {type(value).__name__}")
        if args:
            return [_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        return value
    raise CodecError(f"field {path!r}: unsupported field type {typ!r}")


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode bytes to a message. Raises :class:`CodecError` on any malformed input."""
    try:
        return _decode(data)
    except CodecError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of untrusted input is a codec error
        raise CodecError(f"malformed message: {type(e).__name__}: {e}") from e


def _decode(data: bytes | bytearray | memoryview) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    if len(buf) < _PREFIX.size:
        raise CodecError(f"message too short ({len(buf)} bytes)")
    magic, fver, _flags, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError("not an npcbus message (bad magic)")
    if fver != FRAME_VERSION:
        raise CodecError(f"unsupported frame version {fver}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(buf):
        raise CodecError(f"truncated message: header of {hlen} bytes, {len(buf) - _PREFIX.size} present")
    tensor_base = _PREFIX.size + hlen
    tail_len = len(buf) - tensor_base

    def ext_hook(code: int, payload: bytes):
        if code != _EXT_NDARRAY:
            raise CodecError(f"unknown extension type {code}")
        meta = msgpack.unpackb(payload, raw=False)
        if not (isinstance(meta, list) and len(meta) == 4):
            raise CodecError("malformed tensor descriptor")
        dtype, shape, offset, nbytes = meta
        if dtype not in SUPPORTED_DTYPES:
            raise CodecError(f"unsupported tensor dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CodecError("malformed tensor shape")
        if not (isinstance(offset, int) and isinstance(nbytes, int) and offset >= 0 and nbytes >= 0):
            raise CodecError("malformed tensor offset")
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dt.itemsize != nbytes:
            raise CodecError(f"tensor size mismatch: shape {shape} of {dtype} is not {nbytes} bytes")
        if offset + nbytes > tail_len:
            raise CodecError("truncated message: tensor bytes missing")
        start = tensor_base + offset
        arr = np.frombuffer(buf[start:start + nbytes], dtype=dt, count=count).reshape(tuple(shape))
        return arr

    header = msgpack.unpackb(
        buf[_PREFIX.size:tensor_base], raw=False, ext_hook=ext_hook, strict_map_key=True,
    )
    if not isinstance(header, dict):
        raise CodecError("message header is not a map")
    if "type" not in header:
        raise CodecError("missing field 'type'")
    mtype = header["type"]
    if not isinstance(mtype, str) or mtype not in REGISTRY:
        raise CodecError(f"unknown message type {mtype!r}")
    v = header.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise CodecError("missing or mistyped field 'v' (protocol version)")
    if v > PROTOCOL_VERSION:
        raise CodecError(f"protocol version {v} is newer than this build's {PROTOCOL_VERSION}")
    cls = REGISTRY[mtype]
    kwargs = {}
    for name, required, fast, typ in _plan(cls):
        if name in header:
            value = header[name]
            # the common scalar cases without a call; everything else through _check
            kwargs[name] = value if type(value) in fast else _check(value, typ, name)
        elif required:
            raise CodecError(f"{mtype}: missing required field {name!r}")
    return cls(**kwargs)


@cache
def _plan(cls: type) -> tuple[tuple[str, bool, frozenset, Any], ...]:
    """Per field: name, required, the exact value types accepted as they are (scalars, bare
    list/dict, and None for optional fields), the type hint for everything else."""
    required, fields = _required(cls)
    hints = _hints(cls)
    scalars = (str, int, bool, float, list, dict)  # bare list/dict: any contents
    out = []
    for f in fields:
        typ = hints[f.name]
        if typ in scalars:
            fast = frozenset([typ])
        elif typing.get_origin(typ) in (Union, types.UnionType):
            args = typing.get_args(typ)
            fast = frozenset(a for a in args if a in scalars or a is type(None))
        else:
            fast = frozenset()
        out.append((f.name, f.name in required, fast, typ))
    return tuple(out)


def peek_type(data: bytes | memoryview) -> str | None:
    """The message type of an encoded frame, or None when it cannot be read."""
    try:
        return decode(data).TYPE
    except CodecError:
        return None
