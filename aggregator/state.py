"""The aggregator's persistent state: adapter versions on disk and task leases.

Layout under ``CHECKPOINT_DIR``::

    <adapter>/v<N>/adapter_config.json        PEFT files of version N (immutable)
    <adapter>/v<N>/adapter_model.safetensors
    <adapter>/v<N>/manifest.json              version, parent, delta ids, hashes, metrics
    <adapter>/v<N>/server_optimizer.safetensors  the server optimizer's state after the round that
                                              made version N (momentum / adam only; not part of
                                              the adapter's files or content hash)
    <adapter>/current                         {"version": N, "content_hash": ...} (a pointer)
    leases.json                               open task leases (see :class:`LeaseBook`)

Rules that make a crash (``kill -9`` at any instant) harmless:

* A version folder is written whole, with its manifest inside, into a temporary sibling folder
  that is fsynced and then renamed into place (:func:`npcbus.adapter_store.write_atomic_folder`).
  A folder ``v<N>`` that exists is therefore complete: the *version folders are the truth*.
  ``current`` is a convenience pointer, replaced atomically after the folder; on load the highest
  complete version wins and a lagging pointer is moved forward.
* Versions only grow: a new version is ``current + 1`` and an existing folder is never rewritten.
* Every manifest lists the delta ids (and task ids) it applied. Their union over all manifests is
  the set of applied deltas, so a delta redelivered after a crash (the aggregator persisted the
  version but died before acknowledging) is recognised and never applied twice.
* The server optimizer's state (:class:`npcbus.lora.ServerOptimizer`) after a round is written
  inside the folder of the version that round produced, with its hash and step count in the
  manifest. Weights and optimizer state therefore always belong to the same round: after a crash
  the aggregator resumes from the newest version's state, a round that was lost before its
  version was written is aggregated again from that state (one step, not two), and a round whose
  version was written is never stepped again (its redelivered deltas are duplicates).
* Leases are a small JSON file replaced atomically on each change.

Everything here is synchronous file I/O and numpy; the service calls it through
``asyncio.to_thread``. No broker, no event loop, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npcbus.adapter_store import ADAPTER_FILES, content_hash, write_atomic_folder
from npcbus.logs import get_logger
from npcbus.lora import AdapterSpec

log = get_logger("aggregator.state")

MANIFEST = "manifest.json"
POINTER = "current"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
SERVER_STATE_FILE = "server_optimizer.safetensors"
SERVER_BLOCK = "server_optimizer"  # the manifest's entry describing it
_VERSION_DIR = re.compile(r"^v(\d+)$")


class StateError(RuntimeError):
    """The checkpoint directory is inconsistent (a version folder fails its own hashes)."""


def write_atomic_file(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_safetensors(tensors: dict[str, np.ndarray], dtypes: dict[str, np.dtype] | None = None) -> bytes:
    """Serialize a state dict as PEFT does (safetensors, ``format: pt`` metadata), casting each
    tensor to ``dtypes[name]`` when given. Names are sorted so that equal weights give equal bytes."""
    from safetensors.numpy import save

    out = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if dtypes and name in dtypes and arr.dtype != dtypes[name]:
            arr = arr.astype(dtypes[name])
        out[name] = arr
    return save(out, metadata={"format": "pt"})


def safetensors_to_tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(data))


@dataclass
class VersionRecord:
    """One committed version as read back from disk."""

    adapter: str
    version: int
    path: Path
    manifest: dict

    @property
    def content_hash(self) -> str:
        return self.manifest.get("content_hash", "")


@dataclass
class AdapterState:
    """The current version of one adapter, in memory."""

    adapter: str
    version: int
    content_hash: str
    base_model: str
    config: bytes  # adapter_config.json, unchanged across versions
    tensors: dict[str, np.ndarray]  # float32 weights of the current version
    dtypes: dict[str, np.dtype]  # dtypes as saved in version 0 (new versions keep them)
    manifest: dict
    applied_delta_ids: set[str] = field(default_factory=set)
    applied_task_ids: set[str] = field(default_factory=set)
    #: the server optimizer's state after this version's round (``ServerOptimizer.state_dict()``;
    #: empty for version 0 or when none was kept) and its kind (``""``: none recorded)
    server_state: dict[str, np.ndarray] = field(default_factory=dict)
    server_kind: str = ""

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.adapter, {k: tuple(v.shape) for k, v in self.tensors.items()})


class CheckpointStore:
    """Versions of every adapter under one root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # paths -------------------------------------------------------------------------------------
    def adapter_dir(self, adapter: str) -> Path:
        if not adapter or "/" in adapter or adapter.startswith(".") or adapter in ("leases.json",):
            raise ValueError(f"bad adapter name {adapter!r}")
        return self.root / adapter

    def version_dir(self, adapter: str, version: int) -> Path:
        return self.adapter_dir(adapter) / f"v{int(version)}"

    def versions(self, adapter: str) -> list[int]:
        """Committed versions of ``adapter`` (folders with a manifest), ascending."""
        d = self.adapter_dir(adapter)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _VERSION_DIR.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def manifest(self, adapter: str, version: int) -> dict:
        return json.loads((self.version_dir(adapter, version) / MANIFEST).read_text())

    def manifests(self, adapter: str) -> list[dict]:
        return [self.manifest(adapter, v) for v in self.versions(adapter)]

    def read_pointer(self, adapter: str) -> dict | None:
        p = self.adapter_dir(adapter) / POINTER
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_pointer(self, adapter: str, version: int, chash: str) -> None:
        data = json.dumps({"version": version, "content_hash": chash, "updated_at": time.time()}).encode()
        write_atomic_file(self.adapter_dir(adapter) / POINTER, data)

    # reading ------------------------------------------------------------------------------------
    def read_files(self, adapter: str, version: int | None = None) -> tuple[int, dict, dict[str, bytes]]:
        """``(version, manifest, PEFT files)`` of a version (None: the current one)."""
        if version is None:
            vs = self.versions(adapter)
            if not vs:
                raise FileNotFoundError(f"adapter {adapter!r} has no version")
            version = vs[-1]
        d = self.version_dir(adapter, version)
        if not (d / MANIFEST).is_file():
            raise FileNotFoundError(f"adapter {adapter!r} has no version {version}")
        files = {name: (d / name).read_bytes() for name in ADAPTER_FILES if (d / name).is_file()}
        return version, json.loads((d / MANIFEST).read_text()), files

    def load(self, adapter: str) -> AdapterState | None:
        """The adapter's current state (None when it has no version yet).

        Verifies the current version's files against its manifest's hashes, moves a lagging
        ``current`` pointer forward, and collects the applied delta and task ids of every version.
        """
        vs = self.versions(adapter)
        if not vs:
            return None
        version, manifest, files = self.read_files(adapter, vs[-1])
        chash = content_hash(files)
        if manifest.get("content_hash") != chash:
            raise StateError(f"{adapter} v{version}: files do not match the manifest's content hash")
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise StateError(f"{adapter} v{version}: missing {CONFIG_FILE} or {WEIGHTS_FILE}")
        raw = safetensors_to_tensors(files[WEIGHTS_FILE])
        applied: set[str] = set()
        tasks: set[str] = set()
        for v in vs:
            m = manifest if v == version else self.manifest(adapter, v)
            applied.update(m.get("delta_ids", []))
            tasks.update(t for t in m.get("task_ids", []) if t)
        server_kind, server_state = self._read_server_state(adapter, version, manifest)
        ptr = self.read_pointer(adapter)
        if ptr is None or ptr.get("version") != version:
            log.info("moving the current pointer to the newest complete version", adapter=adapter,
                     version=version, pointer=None if ptr is None else ptr.get("version"))
            self._write_pointer(adapter, version, chash)
        return AdapterState(
            adapter=adapter, version=version, content_hash=chash, base_model=manifest.get("base_model", ""),
            config=files[CONFIG_FILE], tensors={k: v.astype(np.float32) for k, v in raw.items()},
            dtypes={k: v.dtype for k, v in raw.items()}, manifest=manifest,
            applied_delta_ids=applied, applied_task_ids=tasks, server_state=server_state, server_kind=server_kind,
        )

    def _read_server_state(self, adapter: str, version: int, manifest: dict) -> tuple[str, dict[str, np.ndarray]]:
        """``(kind, state arrays)`` of the server optimizer kept with a version (``("", {})``: none)."""
        block = manifest.get(SERVER_BLOCK)
        if not isinstance(block, dict):
            return "", {}
        kind = str(block.get("kind", ""))
        name = block.get("file")
        if not name:
            return kind, {"step": np.array([int(block.get("step", 0))], dtype=np.int64)}
        if name != SERVER_STATE_FILE:
            raise StateError(f"{adapter} v{version}: unexpected server optimizer file {name!r}")
        try:
            data = (self.version_dir(adapter, version) / name).read_bytes()
        except FileNotFoundError:
            raise StateError(f"{adapter} v{version}: the manifest lists {name} but it is missing") from None
        if _sha256(data) != block.get("sha256"):
            raise StateError(f"{adapter} v{version}: {name} does not match the manifest's hash")
        return kind, safetensors_to_tensors(data)

    # writing ------------------------------------------------------------------------------------
    def _commit(self, adapter: str, version: int, parent: int | None, files: dict[str, bytes],
                manifest_extra: dict[str, Any], side_files: dict[str, bytes] | None = None) -> tuple[str, dict]:
        """Write a version folder: ``files`` (the adapter: content hash, ``hashes``), the manifest
        and ``side_files`` (kept with the version but not part of the adapter), all in one
        atomic folder write."""
        dest = self.version_dir(adapter, version)
        if dest.exists():
            raise StateError(f"{adapter} v{version} exists already; versions are immutable")
        chash = content_hash(files)
        manifest = {
            "adapter": adapter,
            "version": version,
            "parent": parent,
            "content_hash": chash,
            "hashes": {name: _sha256(data) for name, data in sorted(files.items())},
            "created_at": time.time(),
            **manifest_extra,
        }
        manifest.setdefault("delta_ids", [])
        manifest.setdefault("task_ids", [])
        manifest.setdefault("deltas", [])
        manifest.setdefault("metrics", {})
        body = dict(files)
        body.update(side_files or {})
        body[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
        write_atomic_folder(dest, body)
        self._write_pointer(adapter, version, chash)
        return chash, manifest

    def create_initial(self, adapter: str, files: dict[str, bytes], *, base_model: str,
                       metrics: dict | None = None, extra: dict | None = None) -> AdapterState:
        """Write version 0 from PEFT files (a fresh adapter) and return its state."""
        if self.versions(adapter):
            raise StateError(f"adapter {adapter!r} has versions already")
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise ValueError(f"version 0 needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        self._commit(adapter, 0, None, {k: files[k] for k in (CONFIG_FILE, WEIGHTS_FILE)},
                     {"base_model": base_model, "metrics": dict(metrics or {}), **(extra or {})})
        state = self.load(adapter)
        assert state is not None
        return state

    def commit(self, state: AdapterState, new_tensors: dict[str, np.ndarray], *, delta_ids: Iterable[str],
               task_ids: Iterable[str], deltas: list[dict], metrics: dict, extra: dict | None = None,
               server_config: dict | None = None, server_state: dict[str, np.ndarray] | None = None) -> AdapterState:
        """Persist ``new_tensors`` as version ``state.version + 1`` and return the new state.

        ``server_config`` (``ServerOptimizer.config()``) and ``server_state`` (its ``state_dict()``
        after this round's step) are kept with the version, in the same atomic folder write: the
        arrays in ``server_optimizer.safetensors`` (when there are per-tensor arrays), the config,
        step count and file hash in the manifest's ``server_optimizer`` entry.
        ``state`` is not modified; the caller swaps it for the returned one once this returns.
        """
        version = state.version + 1
        weights = tensors_to_safetensors(new_tensors, state.dtypes)
        files = {CONFIG_FILE: state.config, WEIGHTS_FILE: weights}
        delta_ids = list(delta_ids)
        task_ids = [t for t in task_ids if t]
        extra = dict(extra or {})
        side: dict[str, bytes] = {}
        server_state = dict(server_state or {})
        if server_config is not None:
            step = np.asarray(server_state.get("step", np.zeros(1, np.int64))).reshape(-1)
            block = {**server_config, "step": int(step[0]) if step.size else 0}
            if any(k != "step" for k in server_state):
                side[SERVER_STATE_FILE] = tensors_to_safetensors(server_state)
                block.update(file=SERVER_STATE_FILE, sha256=_sha256(side[SERVER_STATE_FILE]))
            extra[SERVER_BLOCK] = block
        chash, manifest = self._commit(state.adapter, version, state.version, files, {
            "base_model": state.base_model, "delta_ids": delta_ids, "task_ids": task_ids, "deltas": deltas,
            "metrics": metrics, **extra}, side_files=side)
        return AdapterState(
            adapter=state.adapter, version=version, content_hash=chash, base_model=state.base_model,
            config=state.config,
            tensors={k: v.astype(np.float32) for k, v in safetensors_to_tensors(weights).items()},
            dtypes=state.dtypes, manifest=manifest,
            applied_delta_ids=state.applied_delta_ids | set(delta_ids),
            applied_task_ids=state.applied_task_ids | set(task_ids),
            server_state=server_state if server_config is not None else {},
            server_kind=str(server_config.get("kind", "")) if server_config is not None else "",
        )


# ------------------------------------------------------------------------------------------------
# leases
# ------------------------------------------------------------------------------------------------


@dataclass
class Lease:
    """A task a worker accepted; re-issued when it expires without a delta.

    ``state``: ``leased`` (waiting for a delta) or ``delivered`` (a delta for it sits in an open
    round; it no longer expires; it is dropped when the round's version is written).
    """

    task_id: str
    adapter: str
    worker_id: str
    attempt: int
    accepted_at: float
    expires_at: float
    task: dict
    state: str = "leased"

    def to_json(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_json(cls, d: dict) -> Lease:
        return cls(**{k: d[k] for k in ("task_id", "adapter", "worker_id", "attempt", "accepted_at",
                                         "expires_at", "task", "state") if k in d})


class LeaseBook:
    """Open leases by task id, persisted in one JSON file replaced atomically on every change."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.leases: dict[str, Lease] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.leases = {k: Lease.from_json(v) for k, v in raw.get("leases", {}).items()}
            except (ValueError, TypeError, KeyError) as e:
                raise StateError(f"cannot read {self.path}: {e}") from e

    def save(self) -> None:
        data = json.dumps({"leases": {k: v.to_json() for k, v in self.leases.items()}, "saved_at": time.time()},
                          sort_keys=True).encode()
        write_atomic_file(self.path, data)

    def get(self, task_id: str) -> Lease | None:
        return self.leases.get(task_id)

    def put(self, lease: Lease) -> None:
        self.leases[lease.task_id] = lease

    def drop(self, task_ids: Iterable[str]) -> int:
        n = 0
        for t in task_ids:
            if self.leases.pop(t, None) is not None:
                n += 1
        return n

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.state == "leased" and lease.expires_at <= now]

    def __len__(self) -> int:
        return len(self.leases)
