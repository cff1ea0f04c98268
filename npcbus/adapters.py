"""The adapter manifest: adapter names -> base model, current version, where the weights are.

One JSON file (``ADAPTER_MANIFEST``, default ``.npcbus/adapters.json``)::

    {"format": 1,
     "adapters": {
       "innkeeper": {"name": "innkeeper", "base_model": "", "current_version": 3,
                     "content_hash": "9f2c...", "path": "", "source": "bus",
                     "description": "Marta at the Sleepy Lantern", "persona_id": "innkeeper",
                     "created": "2026-11-26T05:00:00Z", "updated": "2026-11-26T06:12:09Z",
                     "history": [{"version": 3, "content_hash": "9f2c...", "at": "..."}]}}}

- ``base_model``: the base model's hub name or path; empty means the configured default
  (``BASE_MODEL``, else the offline default model).
- ``path``: a local PEFT folder; ``source``: where versions come from otherwise (``bus`` for the
  aggregator's versions, or a hub repository id).
- ``current_version``/``content_hash``: the newest version the aggregator announced
  (:meth:`AdapterManifest.set_version`), ``None`` before the first.

The gateway and the inference consumers resolve adapter names with :meth:`AdapterManifest.resolve`
(also ``name@version``). Reads are cached and re-read when the file changes. Writes take an
exclusive lock beside the file, re-read it, and replace it atomically (temporary file, fsync,
rename), so concurrent writers on one machine never lose an update and readers never see half a file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from npcbus.settings import Settings, env_field

FORMAT = 1
HISTORY_MAX = 50
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


@dataclass
class ManifestSettings(Settings):
    """Where the adapter manifest lives."""

    title: ClassVar[str] = "gateway, workers, adapter tools"

    manifest_path: str = env_field(
        "ADAPTER_MANIFEST", ".npcbus/adapters.json",
        "JSON file of registered adapters (name -> base model, current version, path or source); the gateway "
        "and inference consumers resolve adapter names with it.",
        check=lambda s: bool(s.strip()), check_msg="must not be empty")


@dataclass
class AdapterToolSettings(Settings):
    """Where the adapter tools (``npcbus adapter``, ``npcbus eval``) find the aggregator's versions."""

    title: ClassVar[str] = "adapter tools, eval"

    checkpoint_dir: str = env_field(
        "CHECKPOINT_DIR", ".npcbus/checkpoints",
        "Where adapter versions are kept (<adapter>/v<N>/: PEFT files and manifest.json); the aggregator writes "
        "them, the adapter tools and `npcbus eval` read them.")


class ManifestError(ValueError):
    """A manifest operation was refused; the message says why."""


class UnknownAdapterError(ManifestError, KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ManifestError(f"bad adapter name {name!r}: use 1-64 lower-case letters, digits, '_', '-' or '.', "
                            "starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@N`` / ``name@vN`` -> (name, version or None)."""
    name, sep, ver = ref.partition("@")
    if not sep:
        return check_name(name), None
    v = ver[1:] if ver[:1] in ("v", "V") else ver
    if not v.isdigit():
        raise ManifestError(f"bad adapter reference {ref!r}: want NAME or NAME@VERSION")
    return check_name(name), int(v)


@dataclass
class AdapterEntry:
    name: str
    base_model: str = ""
    current_version: int | None = None
    content_hash: str = ""
    path: str = ""
    source: str = ""
    description: str = ""
    persona_id: str = ""
    created: str = ""
    updated: str = ""
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterEntry:
        """Tolerant: unknown keys are ignored, a missing name or a bad version is an error."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ManifestError(f"bad manifest entry {d!r:.80}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        v = kw.get("current_version")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ManifestError(f"adapter {d['name']!r}: bad current_version {v!r}")
        for k in ("base_model", "content_hash", "path", "source", "description", "persona_id", "created", "updated"):
            if kw.get(k) is None:
                kw.pop(k, None)
            elif not isinstance(kw[k], str):
                kw[k] = str(kw[k])
        if not isinstance(kw.get("history", []), list):
            kw["history"] = []
        return cls(**kw)

    @property
    def location(self) -> str:
        """Where the weights are: the local path, else the source."""
        return self.path or self.source


class AdapterManifest:
    """The adapter manifest file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            path = ManifestSettings.from_env().manifest_path
        self.path = Path(path).expanduser()
        self._cache: dict[str, AdapterEntry] | None = None
        self._stamp: tuple[int, int, int] | None = None

    # ---------------------------------------------------------------------------------- reading

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_file(self) -> dict[str, AdapterEntry]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{self.path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("adapters", {}), dict):
            raise ManifestError(f"{self.path}: expected an object with an 'adapters' object")
        if data.get("format", FORMAT) > FORMAT:
            raise ManifestError(f"{self.path}: format {data.get('format')} is newer than this version understands")
        out = {}
        for name, d in data.get("adapters", {}).items():
            e = AdapterEntry.from_dict({**d, "name": d.get("name", name)} if isinstance(d, dict) else d)
            out[e.name] = e
        return out

    def load(self) -> dict[str, AdapterEntry]:
        """Every entry by name (a copy); re-reads the file only when it changed."""
        stamp = self._file_stamp()
        if self._cache is None or stamp != self._stamp:
            self._cache = self._read_file()
            self._stamp = stamp
        return copy.deepcopy(self._cache)

    def names(self) -> list[str]:
        return sorted(self.load())

    def list(self) -> list[AdapterEntry]:
        entries = self.load()
        return [entries[n] for n in sorted(entries)]

    def get(self, name: str) -> AdapterEntry | None:
        return self.load().get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.load()

    def resolve(self, name: str) -> AdapterEntry:
        """The entry of ``name`` (``name@N`` is accepted too: see :meth:`resolve_ref`)."""
        entry, _ = self.resolve_ref(name)
        return entry

    def resolve_ref(self, ref: str) -> tuple[AdapterEntry, int | None]:
        """``name`` -> (entry, its current version); ``name@N`` -> (entry, N).

        Raises :class:`UnknownAdapterError` when the name is not registered, and
        :class:`ManifestError` when N is above the current version.
        """
        name, version = parse_ref(ref)
        entries = self.load()
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none registered"
            raise UnknownAdapterError(f"unknown adapter {name!r} (known: {known}; manifest {self.path})")
        e = entries[name]
        if version is None:
            return e, e.current_version
        if e.current_version is not None and version > e.current_version:
            raise ManifestError(f"adapter {name!r} has no version {version} yet (current {e.current_version})")
        return e, version

    def by_persona(self, persona_id: str) -> AdapterEntry | None:
        """The adapter registered for a persona (the first by name when several are)."""
        for e in self.list():
            if e.persona_id == persona_id:
                return e
        return None

    # ---------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, AdapterEntry]]:
        """Exclusive read-modify-write: yields the current entries; writes them back on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock:
            try:
                import fcntl

                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            entries = self._read_file()
            yield entries
            self._write(entries)

    def _write(self, entries: dict[str, AdapterEntry]) -> None:
        data = {"format": FORMAT, "adapters": {n: entries[n].to_dict() for n in sorted(entries)}}
        blob = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._cache = copy.deepcopy(entries)
        self._stamp = self._file_stamp()

    def register(
        self,
        name: str,
        *,
        base_model: str = "",
        path: str | os.PathLike | None = None,
        source: str = "",
        description: str = "",
        persona_id: str = "",
        version: int | None = None,
        content_hash: str = "",
        replace: bool = False,
    ) -> AdapterEntry:
        """Add an adapter. An existing name is an error unless ``replace`` (which keeps its
        ``created`` time, its history and, when no ``version`` is given, its current version)."""
        check_name(name)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
            raise ManifestError(f"bad version {version!r}: want an integer >= 0")
        now = utc_now()
        with self._locked() as entries:
            old = entries.get(name)
            if old is not None and not replace:
                raise ManifestError(f"adapter {name!r} is already registered (use replace to update it)")
            e = AdapterEntry(
                name=name, base_model=base_model or "", path=str(path) if path else "", source=source or "",
                description=description or "", persona_id=persona_id or "", created=old.created if old else now,
                updated=now, history=list(old.history) if old else [],
            )
            if version is not None:
                e.current_version, e.content_hash = version, content_hash
                e.history = (e.history + [{"version": version, "content_hash": content_hash, "at": now}])[-HISTORY_MAX:]
            elif old is not None:
                e.current_version, e.content_hash = old.current_version, old.content_hash
            entries[name] = e
        return copy.deepcopy(e)

    def set_version(self, name: str, version: int, content_hash: str, *, path: str | os.PathLike | None = None,
                    allow_older: bool = False) -> AdapterEntry:
        """Record a new current version (the aggregator's announcement). Versions only grow unless
        ``allow_older`` (a deliberate rollback); setting the current version again is a no-op."""
        check_name(name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ManifestError(f"bad version {version!r}: want an integer >= 0")
        with self._locked() as entries:
            if name not in entries:
                raise UnknownAdapterError(f"unknown adapter {name!r} (manifest {self.path})")
            e = entries[name]
            cur = e.current_version
            if cur is not None and version < cur and not allow_older:
                raise ManifestError(f"adapter {name!r}: version {version} is older than the current {cur}")
            if cur == version and e.content_hash and content_hash and e.content_hash != content_hash:
                raise ManifestError(f"adapter {name!r}: version {version} already has content hash "
                                    f"{e.content_hash[:12]}..., not {content_hash[:12]}...")
            if not (cur == version and e.content_hash == content_hash and path is None):
                now = utc_now()
                e.current_version, e.content_hash, e.updated = version, content_hash, now
                if path is not None:
                    e.path = str(path)
                e.history = (e.history + [{"version": version, "content_hash": content_hash, "at": now}])[-HISTORY_MAX:]
        return copy.deepcopy(e)

    def remove(self, name: str) -> None:
        with self._locked() as entries:
            if name not in entries:
                raise UnknownAdapterError(f"unknown adapter {name!r} (manifest {self.path})")
            del entries[name]


# --------------------------------------------------------------------------------------------
# finding an adapter's files
# --------------------------------------------------------------------------------------------

_VERSION_DIR = re.compile(r"^v(\d+)$")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def checkpoint_versions(checkpoint_dir: str | os.PathLike, adapter: str) -> list[int]:
    """Versions of ``adapter`` under the aggregator's checkpoint folder (complete folders), ascending."""
    root = Path(checkpoint_dir).expanduser() / adapter
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _VERSION_DIR.match(d.name)
        if m and (d / "adapter_config.json").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


@dataclass
class LocatedAdapter:
    path: Path
    entry: AdapterEntry | None = None
    version: int | None = None


def locate_adapter(ref: str, *, manifest: AdapterManifest | None = None,
                   checkpoint_dir: str | os.PathLike | None = None) -> LocatedAdapter:
    """A local PEFT folder for ``ref``: a folder path, or a registered ``name[@N]``.

    For a name: the entry's ``path`` when it is a PEFT folder (with ``name@N``, its ``v<N>``
    subfolder if it has one), else ``CHECKPOINT_DIR/<name>/v<N>`` (N: the asked version, else the
    current one, else the highest there).
    """
    p = Path(ref).expanduser()
    if is_adapter_folder(p):
        return LocatedAdapter(p)
    if p.exists():
        raise ManifestError(f"{ref} is not a PEFT adapter folder (no adapter_config.json)")
    if "/" in ref or ref.startswith((".", "~")):
        raise ManifestError(f"no adapter folder at {ref}")
    manifest = manifest or AdapterManifest()
    entry, version = manifest.resolve_ref(ref)
    _, asked = parse_ref(ref)
    if entry.path:
        ep = Path(entry.path).expanduser()
        if asked is not None and is_adapter_folder(ep / f"v{asked}"):
            return LocatedAdapter(ep / f"v{asked}", entry, asked)
        if is_adapter_folder(ep) and (asked is None or asked == entry.current_version):
            return LocatedAdapter(ep, entry, version)
    ckpt = Path(checkpoint_dir if checkpoint_dir is not None else AdapterToolSettings.from_env().checkpoint_dir)
    have = checkpoint_versions(ckpt, entry.name)
    want = asked if asked is not None else (version if version in have else (have[-1] if have else None))
    if want is not None and want in have:
        return LocatedAdapter(ckpt.expanduser() / entry.name / f"v{want}", entry, want)
    raise ManifestError(f"no local files for adapter {ref!r}: path {entry.path or '(none)'}, "
                        f"versions under {ckpt / entry.name}: {have or 'none'}")
