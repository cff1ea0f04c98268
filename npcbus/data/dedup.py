"""Exact and near-duplicate removal with bounded memory.

Near duplicates: MinHash signatures indexed in datasketch's :class:`~datasketch.MinHashLSH`.
The signatures are the ones datasketch's ``MinHash`` (``affine32`` scheme) computes for the same
shingle hashes — :func:`datasketch_minhash` builds one that way, and the tests check they agree —
but they are computed for a whole batch of documents at once with numpy:

1. documents are lower-cased, joined into one byte buffer and cut into words (runs of ASCII letters
   and digits, or of non-ASCII bytes);
2. each word gets a 64-bit polynomial hash from prefix sums over the buffer;
3. each run of ``ngram`` consecutive words of one document (a shingle) gets a hash combining its
   word hashes, folded to 32 bits;
4. the signature is the column-wise minimum of the permuted shingle hashes, per document.

A candidate from the LSH index counts as a duplicate only when the two signatures agree on at least
``threshold`` of their positions (the MinHash estimate of the Jaccard similarity), which removes
most of the LSH's false positives. The index holds at most ``capacity`` documents: past that, the
oldest one leaves it (so memory is bounded whatever the input size; duplicates further apart than
``capacity`` kept documents are then no longer caught).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from npcbus.data.text import normalize_for_hash

_U64 = np.uint64
_M32 = np.uint32(0xFFFFFFFF)
_P = 0x9E3779B97F4A7C15  # odd multiplier of the per-word polynomial hash
_Q = pow(_P, -1, 1 << 64)  # its inverse mod 2^64
_R = 0xD6E8FEB86659FD93  # odd multiplier combining word hashes into a shingle hash
_MAX_ROWS = 2048  # shingles per (rows x num_perm) block of the signature computation
_GROUP_CHARS = 1 << 16  # characters hashed together (bounds the temporary arrays)

# byte -> is a word byte: ASCII letters, digits, and every byte of a multi-byte UTF-8 character
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyz0123456789":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on a uint32 array (the pre-mix of datasketch's affine32)."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


class _Powers:
    """Cached powers of P and of its inverse mod 2^64, grown on demand."""

    def __init__(self) -> None:
        self.p = np.ones(1, dtype=_U64)
        self.q = np.ones(1, dtype=_U64)

    def ensure(self, n: int) -> None:
        if len(self.p) >= n:
            return
        n = max(n, 2 * len(self.p))
        with np.errstate(over="ignore"):
            self.p = np.concatenate([[_U64(1)], np.cumprod(np.full(n - 1, _P, dtype=_U64))])
            self.q = np.concatenate([[_U64(1)], np.cumprod(np.full(n - 1, _Q, dtype=_U64))])


_POW = _Powers()


def shingle_hashes_batch(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit shingle hashes of every document: (hashes, doc index of each), grouped by document.

    A document with fewer than ``ngram`` words (but at least one) gets one shingle of all its words;
    a document with no word gets none.
    """
    if not texts:
        return np.empty(0, np.uint32), np.empty(0, np.int64)
    encoded = [t.lower().encode("utf-8", "replace") for t in texts]
    starts_doc = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) + 1 for b in encoded], out=starts_doc[1:])
    buf = np.frombuffer(b"\n".join(encoded) + b"\n", dtype=np.uint8)
    L = len(buf)
    is_w = _WORD_BYTE[buf]
    edges = np.diff(np.concatenate([[False], is_w, [False]]).astype(np.int8))
    w_start = np.flatnonzero(edges == 1)
    w_end = np.flatnonzero(edges == -1)
    if len(w_start) == 0:
        return np.empty(0, np.uint32), np.empty(0, np.int64)
    _POW.ensure(L + 1)
    with np.errstate(over="ignore"):
        pref = np.empty(L + 1, dtype=_U64)
        pref[0] = 0
        np.cumsum(buf.astype(_U64) * _POW.q[:L], out=pref[1:])
        wh = (pref[w_end] - pref[w_start]) * _POW.p[w_end - 1]
    w_doc = np.searchsorted(starts_doc, w_start, side="right") - 1
    counts = np.bincount(w_doc, minlength=len(texts))
    parts_h: list[np.ndarray] = []
    parts_d: list[np.ndarray] = []
    m = len(wh) - ngram + 1
    if m > 0:
        with np.errstate(over="ignore"):
            sh = wh[:m].copy()
            for k in range(1, ngram):
                sh = sh * _U64(_R) + wh[k : m + k]
        ok = w_doc[:m] == w_doc[ngram - 1 : m + ngram - 1]
        parts_h.append(sh[ok])
        parts_d.append(w_doc[:m][ok])
    short = np.flatnonzero((counts > 0) & (counts < ngram))
    if len(short):
        first = np.searchsorted(w_doc, short, side="left")
        extra = np.empty(len(short), dtype=_U64)
        with np.errstate(over="ignore"):
            for j, (d, f) in enumerate(zip(short, first, strict=True)):
                h = wh[f]
                for k in range(1, int(counts[d])):
                    h = h * _U64(_R) + wh[f + k]
                extra[j] = h
        parts_h.append(extra)
        parts_d.append(short.astype(np.int64))
    h64 = np.concatenate(parts_h) if parts_h else np.empty(0, _U64)
    docs = np.concatenate(parts_d) if parts_d else np.empty(0, np.int64)
    if len(parts_h) > 1:
        order = np.argsort(docs, kind="stable")
        h64, docs = h64[order], docs[order]
    h32 = ((h64 >> _U64(32)) ^ h64).astype(np.uint32)
    return h32, docs


def shingle_set(text: str, ngram: int = 5) -> set[int]:
    """The set of 32-bit shingle hashes of one document (exact Jaccard in tests and reports)."""
    h, _ = shingle_hashes_batch([text], ngram)
    return set(h.tolist())


def datasketch_minhash(text: str, num_perm: int = 128, ngram: int = 5, seed: int = 1):
    """A plain datasketch ``MinHash`` of the same shingles: the reference the fast path must match."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
    m.update_batch(sorted(shingle_set(text, ngram)))
    return m


class MinHashSigner:
    """Batch MinHash signatures (datasketch ``affine32`` permutations of the given seed)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        from datasketch import MinHash

        if num_perm < 2:
            raise ValueError("num_perm must be at least 2")
        if ngram < 1:
            raise ValueError("ngram must be at least 1")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.empty = np.uint32(0xFFFFFFFF)

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures ``[len(texts), num_perm]`` uint32, bool mask of documents with a shingle).

        Texts are hashed in groups of about ``_GROUP_CHARS`` characters, so the temporary arrays stay
        small whatever the batch size (one document longer than that is a group of its own).
        """
        n = len(texts)
        sig = np.full((n, self.num_perm), self.empty, dtype=np.uint32)
        has = np.zeros(n, dtype=bool)
        start = 0
        while start < n:
            end, size = start, 0
            while end < n and (end == start or size + len(texts[end]) <= _GROUP_CHARS):
                size += len(texts[end]) + 1
                end += 1
            self._sign_group(texts[start:end], sig[start:end], has[start:end])
            start = end
        return sig, has

    def _sign_group(self, texts: Sequence[str], sig: np.ndarray, has: np.ndarray) -> None:
        h, docs = shingle_hashes_batch(texts, self.ngram)
        if len(h) == 0:
            return
        h = fmix32(h)
        bounds = np.flatnonzero(np.diff(docs)) + 1
        seg_start = np.concatenate([[0], bounds])
        seg_end = np.concatenate([bounds, [len(h)]])
        seg_doc = docs[seg_start]
        has[seg_doc] = True
        a, b = self.a, self.b
        i = 0
        nseg = len(seg_start)
        while i < nseg:
            r0 = seg_start[i]
            j = i
            while j < nseg and seg_end[j] - r0 <= _MAX_ROWS:
                j += 1
            if j == i:  # one document with more shingles than a block: reduce it piecewise
                acc = np.full(self.num_perm, self.empty, dtype=np.uint32)
                for s in range(r0, seg_end[i], _MAX_ROWS):
                    block = np.multiply.outer(h[s : min(s + _MAX_ROWS, seg_end[i])], a)
                    block += b
                    np.minimum(acc, block.min(axis=0), out=acc)
                sig[seg_doc[i]] = acc
                i += 1
                continue
            r1 = seg_end[j - 1]
            block = np.multiply.outer(h[r0:r1], a)
            block += b
            sig[seg_doc[i:j]] = np.minimum.reduceat(block, seg_start[i:j] - r0, axis=0)
            i = j


class ExactDuplicateFilter:
    """Remembers 64-bit digests of normalized texts (at most ``capacity``, oldest forgotten first)."""

    def __init__(self, capacity: int = 4_000_000):
        self.capacity = max(1, int(capacity))
        self._seen: set[int] = set()
        self._order: deque[int] = deque()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, text: str) -> bool:
        """True if an equal text was seen before; otherwise remember it and return False."""
        d = int.from_bytes(hashlib.blake2b(normalize_for_hash(text).encode("utf-8", "replace"), digest_size=8).digest(),
                           "little")
        if d in self._seen:
            return True
        self._seen.add(d)
        self._order.append(d)
        if len(self._order) > self.capacity:
            self._seen.discard(self._order.popleft())
            self.evicted += 1
        return False


class NearDuplicateIndex:
    """MinHash LSH (datasketch) over kept documents; :meth:`add_batch` says which are new.

    ``threshold`` is the Jaccard similarity (over word ``ngram`` shingles) from which two documents
    count as near duplicates. ``capacity`` bounds how many documents the index holds.
    """

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        capacity: int = 500_000,
        verify: bool = True,
    ):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.capacity = max(1, int(capacity))
        self.verify = verify
        self.signer = MinHashSigner(num_perm, ngram, seed)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._sigs = np.empty((min(self.capacity, 1024), num_perm), dtype=np.uint32)
        self._next = 0
        self._oldest = 0
        self.evicted = 0
        self.no_shingles = 0

    @property
    def params(self) -> dict:
        return {
            "threshold": self.threshold, "num_perm": self.signer.num_perm, "ngram": self.signer.ngram,
            "seed": self.signer.seed, "bands": self.lsh.b, "rows": self.lsh.r, "capacity": self.capacity,
            "verify": self.verify,
        }

    def __len__(self) -> int:
        return self._next - self._oldest

    def _store(self, key: int, sig: np.ndarray) -> None:
        slot = key % self.capacity
        if slot >= len(self._sigs):
            grown = np.empty((min(self.capacity, 2 * len(self._sigs)), self._sigs.shape[1]), dtype=np.uint32)
            grown[: len(self._sigs)] = self._sigs
            self._sigs = grown
        self._sigs[slot] = sig

    def _is_dup(self, m, sig: np.ndarray) -> bool:
        cands = self.lsh.query(m)
        if not cands:
            return False
        if not self.verify:
            return True
        rows = self._sigs[[c % self.capacity for c in cands]]
        agree = (rows == sig).mean(axis=1)
        return bool(agree.max() >= self.threshold)

    def add_batch(self, texts: Sequence[str]) -> list[bool]:
        """For each text in order: True if it is new (and now indexed), False if a near duplicate
        of an indexed document or of an earlier text of the same batch."""
        from datasketch import LeanMinHash

        sigs, has = self.signer.signatures(texts)
        out: list[bool] = []
        seed = self.signer.seed
        for i in range(len(texts)):
            if not has[i]:
                self.no_shingles += 1
                out.append(True)
                continue
            sig = sigs[i]
            m = LeanMinHash(seed=seed, hashvalues=sig, scheme="affine32")
            if self._is_dup(m, sig):
                out.append(False)
                continue
            key = self._next
            self._next += 1
            self.lsh.insert(key, m, check_duplication=False)
            self._store(key, sig)
            if self._next - self._oldest > self.capacity:
                self.lsh.remove(self._oldest)
                self._oldest += 1
                self.evicted += 1
            out.append(True)
        return out

    def add(self, text: str) -> bool:
        return self.add_batch([text])[0]


def dedup_texts(texts: Iterable[str], threshold: float = 0.8, batch_size: int = 256, **kw) -> Iterable[tuple[int, bool]]:
    """Stream (index, is_new) over ``texts`` with one :class:`NearDuplicateIndex` (used by the bench)."""
    index = NearDuplicateIndex(threshold=threshold, **kw)
    batch: list[str] = []
    base = 0
    for t in texts:
        batch.append(t)
        if len(batch) >= batch_size:
            for j, keep in enumerate(index.add_batch(batch)):
                yield base + j, keep
            base += len(batch)
            batch = []
    if batch:
        for j, keep in enumerate(index.add_batch(batch)):
            yield base + j, keep
