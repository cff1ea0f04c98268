"""Chunking of large payloads: split into numbered, hashed pieces; reassemble and verify.

Pure logic, no broker. The bus (:mod:`npcbus.bus`) publishes a payload larger than
``CHUNK_BYTES`` as :class:`npcbus.messages.Chunk` messages and feeds received chunks to an
:class:`Assembler`, which reports each stream's state:

- ``partial``: more pieces are expected;
- ``complete``: every piece arrived, each piece's and the whole payload's SHA-256 match;
- ``corrupt``: a piece's bytes do not match its hash, or the pieces disagree about the stream
  (count, size, total hash), or the reassembled payload does not match the total hash;
- ``duplicate``: a piece with this index already arrived (the newer token replaces the older,
  which the caller should settle);
- ``missing``: reported by :meth:`Assembler.expire` for streams that stayed incomplete too long.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from npcbus.messages import Chunk, new_id


def split(payload: bytes | memoryview, chunk_bytes: int, stream_id: str | None = None) -> list[Chunk]:
    """Split ``payload`` into chunks of at most ``chunk_bytes`` bytes of data each."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    mv = memoryview(payload).cast("B")
    total = len(mv)
    sid = stream_id or new_id()
    total_sha = hashlib.sha256(mv).hexdigest()
    count = max(1, -(-total // chunk_bytes))
    out = []
    for i in range(count):
        piece = bytes(mv[i * chunk_bytes:(i + 1) * chunk_bytes])
        out.append(Chunk(stream_id=sid, index=i, count=count, total_size=total,
                         sha256=hashlib.sha256(piece).hexdigest(), total_sha256=total_sha, data=piece))
    return out


@dataclass
class AddResult:
    status: str  # partial | complete | corrupt | duplicate
    stream_id: str
    payload: bytes | None = None
    tokens: list[Any] = field(default_factory=list)  # every token of the stream (complete/corrupt)
    replaced: Any = None  # the older token of a duplicate piece
    reason: str = ""


@dataclass
class _Stream:
    count: int
    total_size: int
    total_sha256: str
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    tokens: dict[int, Any] = field(default_factory=dict)
    extra_tokens: list[Any] = field(default_factory=list)


class Assembler:
    """Collects chunks by stream id. ``token`` is whatever the caller needs to settle a piece
    (the broker delivery); tokens come back with the stream's outcome."""

    def __init__(self, *, max_payload_bytes: int = 1 << 30, timeout_s: float = 120.0):
        self.max_payload_bytes = max_payload_bytes
        self.timeout_s = timeout_s
        self._streams: dict[str, _Stream] = {}
        self._failed: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def _fail(self, sid: str, st: _Stream | None, token: Any, reason: str) -> AddResult:
        tokens = []
        if st is not None:
            tokens = list(st.tokens.values()) + st.extra_tokens
            self._streams.pop(sid, None)
        tokens.append(token)
        self._failed[sid] = time.monotonic()
        return AddResult("corrupt", sid, tokens=tokens, reason=reason)

    def add(self, chunk: Chunk, token: Any = None, *, verify: bool = True) -> AddResult:
        sid = chunk.stream_id
        if sid in self._failed:
            self._failed[sid] = time.monotonic()
            return AddResult("corrupt", sid, tokens=[token], reason="stream already failed")
        st = self._streams.get(sid)
        if chunk.count <= 0 or not (0 <= chunk.index < chunk.count) or chunk.total_size < 0:
            return self._fail(sid, st, token, f"bad chunk numbering {chunk.index}/{chunk.count}")
        if chunk.total_size > self.max_payload_bytes:
            return self._fail(sid, st, token, f"payload of {chunk.total_size} bytes exceeds the limit")
        if verify and hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
            return self._fail(sid, st, token, f"chunk {chunk.index}/{chunk.count} hash mismatch")
        if st is None:
            st = _Stream(chunk.count, chunk.total_size, chunk.total_sha256, time.monotonic())
            self._streams[sid] = st
        elif (st.count, st.total_size, st.total_sha256) != (chunk.count, chunk.total_size, chunk.total_sha256):
            return self._fail(sid, st, token, "chunks disagree about the stream")
        if chunk.index in st.pieces:
            if st.pieces[chunk.index] != chunk.data:
                return self._fail(sid, st, token, f"chunk {chunk.index} arrived twice with different bytes")
            old = st.tokens.get(chunk.index)
            st.tokens[chunk.index] = token
            return AddResult("duplicate", sid, replaced=old)
        st.pieces[chunk.index] = chunk.data
        st.tokens[chunk.index] = token
        if len(st.pieces) < st.count:
            return AddResult("partial", sid)
        payload = b"".join(st.pieces[i] for i in range(st.count))
        tokens = [st.tokens[i] for i in range(st.count)] + st.extra_tokens
        del self._streams[sid]
        if len(payload) != st.total_size:
            self._failed[sid] = time.monotonic()
            return AddResult("corrupt", sid, tokens=tokens, reason="reassembled size mismatch")
        if verify and hashlib.sha256(payload).hexdigest() != st.total_sha256:
            self._failed[sid] = time.monotonic()
            return AddResult("corrupt", sid, tokens=tokens, reason="reassembled payload hash mismatch")
        return AddResult("complete", sid, payload=payload, tokens=tokens)

    def expire(self, now: float | None = None) -> list[AddResult]:
        """Streams incomplete for longer than the timeout, as ``missing`` results."""
        now = time.monotonic() if now is None else now
        out = []
        for sid, st in list(self._streams.items()):
            if now - st.started > self.timeout_s:
                missing = sorted(set(range(st.count)) - set(st.pieces))
                out.append(AddResult("missing", sid, tokens=list(st.tokens.values()) + st.extra_tokens,
                                     reason=f"chunks missing after {self.timeout_s:.0f}s: {missing[:10]}"))
                del self._streams[sid]
                self._failed[sid] = now
        for sid, t in list(self._failed.items()):
            if now - t > max(600.0, self.timeout_s * 4):
                del self._failed[sid]
        return out

    def drop_tokens(self, predicate) -> int:
        """Forget pieces whose token matches ``predicate`` (e.g. deliveries of a closed channel)."""
        n = 0
        for sid, st in list(self._streams.items()):
            for idx, tok in list(st.tokens.items()):
                if predicate(tok):
                    del st.tokens[idx]
                    del st.pieces[idx]
                    n += 1
            if not st.pieces:
                del self._streams[sid]
        return n
