"""Streaming document sources for ``npcbus data build``.

A source spec is ``[NAME=]LOCATION``:

- a folder of text files (``.txt``, ``.md``, ``.text``; e-books included): each file is read line
  by line and cut into documents of about ``chunk_chars`` characters on paragraph boundaries;
- a ``.jsonl`` / ``.jsonl.gz`` file, or a folder holding only such files: one record per line, the
  text in ``text_field``;
- a folder written by ``datasets``' ``save_to_disk`` (memory-mapped, read in batches);
- ``hf:REPO[:CONFIG]`` (or a bare name that is no local path, such as ``openwebtext`` or
  ``wikipedia``): a Hugging Face hub data set, streamed. Where the hub cannot be reached
  (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or no connection within a few seconds) opening
  it raises :class:`HubUnavailableError` at once, never a hang.

Readers yield :class:`Doc` records one at a time, so memory does not depend on the input size. A
record that cannot be read (bad JSON, missing text field) is yielded with ``text=None`` and a
``reason``, so that the build can count it.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 3.0

# short names of well-known hub data sets -> (repository, config)
HUB_ALIASES: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
}


class SourceError(ValueError):
    """A source spec names nothing readable; the message says what was expected."""


class HubUnavailableError(SourceError):
    """A hub data set was asked for but the hub cannot be reached."""


@dataclass
class Doc:
    text: str | None
    source: str
    id: str
    reason: str = ""  # set when text is None: why the record could not be read


@dataclass
class SourceSpec:
    name: str
    kind: str  # text | jsonl | disk | hub
    location: str
    weight: float = 1.0
    text_field: str = "text"
    config: str | None = None
    split: str = "train"
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        d = {"kind": self.kind, "location": self.location, "weight": self.weight}
        if self.config:
            d["config"] = self.config
        return d


# --------------------------------------------------------------------------------------------
# hub reachability
# --------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_reason(environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if str(env.get(var, "")).strip().lower() in _TRUE:
            return f"{var} is set"
    return None


def check_hub_reachable(endpoint: str | None = None, timeout: float = HUB_TIMEOUT_S,
                        repo: str | None = None) -> str | None:
    """None if the hub answers an HTTP request within ``timeout`` seconds, else why not.

    A TCP connection alone proves little (some networks accept every connection and answer nothing,
    or answer 404 for every address), so this asks the hub's API about ``repo`` (or its root) and
    wants an answer that a hub gives. The request runs in a daemon thread, so that neither name
    resolution nor a silent peer can hold the caller past ``timeout``.
    """
    import urllib.error
    import urllib.request

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/")
    u = urlparse(endpoint)
    if not u.hostname or u.scheme not in ("http", "https"):
        return f"bad hub endpoint {endpoint!r}"
    url = f"{endpoint}/api/datasets/{repo}" if repo else f"{endpoint}/api/datasets?limit=1"
    result: list[str | None] = []

    def probe() -> None:
        req = urllib.request.Request(url, headers={"User-Agent": "npcbus-data-build"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read(1)
                result.append(None)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # gated or private: the hub is there, the loader will say more
                result.append(None)
            elif e.code == 404:
                result.append(f"{endpoint} answered 404 for {url} (no such data set, or not a hub)")
            else:
                result.append(f"{endpoint} answered HTTP {e.code}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result.append(f"cannot reach {endpoint} ({type(reason).__name__}: {reason})")

    t = threading.Thread(target=probe, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {endpoint} within {timeout:g} s"
    return result[0]


def ensure_hub(name: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise :class:`HubUnavailableError` (quickly) unless the hub can be used for ``name``."""
    why = hub_offline_reason() or check_hub_reachable(timeout=timeout, repo=name)
    if why:
        raise HubUnavailableError(
            f"hub data set {name!r} needs the Hugging Face hub, which is not reachable here ({why}). "
            "Use a local copy instead: a folder written by datasets' save_to_disk, a JSONL file, or a "
            "folder of text files."
        )


# --------------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------------

_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _is_jsonl(p: Path) -> bool:
    return p.name.endswith(JSONL_SUFFIXES)


def _default_name(location: str) -> str:
    base = location.rstrip("/").split("/")[-1].split(":")[0] or location
    for suf in (*JSONL_SUFFIXES, *TEXT_SUFFIXES):
        if base.endswith(suf):
            base = base[: -len(suf)]
    return base or "source"


def parse_source(spec: str, *, text_field: str = "text", split: str = "train") -> SourceSpec:
    """Parse ``[NAME=]LOCATION`` into a :class:`SourceSpec` (no hub check yet: see :func:`open_source`)."""
    name = None
    loc = spec.strip()
    if "=" in loc and not loc.startswith(("hf:", "hub:", "/", ".")):
        head, rest = loc.split("=", 1)
        if head and "/" not in head:
            name, loc = head, rest
    if not loc:
        raise SourceError(f"empty source spec {spec!r}")
    if loc.startswith(("hf:", "hub:")):
        body = loc.split(":", 1)[1]
        repo, _, config = body.partition(":")
        if not _HUB_NAME.match(repo):
            raise SourceError(f"bad hub data set name {repo!r} in {spec!r}")
        return _hub_spec(name or repo.split("/")[-1], repo, config or None, text_field, split)
    p = Path(loc).expanduser()
    if p.is_dir():
        if any((p / m).exists() for m in _DATASETS_MARKERS):
            return SourceSpec(name or _default_name(loc), "disk", str(p), text_field=text_field, split=split)
        files = sorted(str(f) for f in p.rglob("*") if f.is_file())
        jsonl = [f for f in files if _is_jsonl(Path(f))]
        text = [f for f in files if f.lower().endswith(TEXT_SUFFIXES)]
        if jsonl and not text:
            return SourceSpec(name or _default_name(loc), "jsonl", str(p), text_field=text_field, files=jsonl)
        if text:
            return SourceSpec(name or _default_name(loc), "text", str(p), files=text)
        raise SourceError(f"folder {loc!r} holds no text ({', '.join(TEXT_SUFFIXES)}) or JSONL files "
                          "and is not a saved datasets folder")
    if p.is_file():
        if _is_jsonl(p):
            return SourceSpec(name or _default_name(loc), "jsonl", str(p), text_field=text_field, files=[str(p)])
        return SourceSpec(name or _default_name(loc), "text", str(p), files=[str(p)])
    if _HUB_NAME.match(loc) and not loc.lower().endswith((*JSONL_SUFFIXES, *TEXT_SUFFIXES, ".json")):
        return _hub_spec(name or loc.split("/")[-1], loc, None, text_field, split)
    raise SourceError(f"no such file or folder: {loc!r}")


def _hub_spec(name: str, repo: str, config: str | None, text_field: str, split: str) -> SourceSpec:
    if repo in HUB_ALIASES:
        real, default_config = HUB_ALIASES[repo]
        repo, config = real, config or default_config
    return SourceSpec(name, "hub", repo, text_field=text_field, config=config, split=split)


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------

_BOOK_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) .*\*{3}\s*$", re.IGNORECASE)
_BOOK_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) .*\*{3}\s*$", re.IGNORECASE)


def _split_long(par: str, limit: int) -> Iterator[str]:
    while len(par) > limit:
        cut = par.rfind(". ", 0, limit)
        if cut < limit // 2:
            cut = par.rfind(" ", 0, limit)
        if cut <= 0:
            cut = limit
        else:
            cut += 1
        yield par[:cut].strip()
        par = par[cut:].lstrip()
    if par.strip():
        yield par.strip()


def _book_lines(f) -> Iterator[str]:
    """Lines of a text file without an e-book licence header/footer (``*** START OF`` / ``*** END OF``)."""
    head: list[str] = []
    for line in f:
        if _BOOK_START.match(line.strip()):
            head = []
            break
        head.append(line)
        if len(head) >= 400:  # a licence header sits near the top; past that there is none
            break
    for line in itertools.chain(head, f):
        if _BOOK_END.match(line.strip()):
            return
        yield line


def read_text_file(path: str, source: str, chunk_chars: int = 8000, rel: str | None = None) -> Iterator[Doc]:
    """Documents of about ``chunk_chars`` characters, cut at paragraph boundaries, read line by line.

    Lines of a paragraph are joined with spaces (hard-wrapped e-book text becomes flowing text);
    paragraphs are joined with a blank line. A paragraph longer than ``chunk_chars`` is cut at a
    sentence or word boundary.
    """
    rel = rel or os.path.basename(path)
    chunk: list[str] = []
    size = 0
    idx = 0
    par: list[str] = []

    def pieces() -> Iterator[str]:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:  # type: ignore[operator]
            for line in _book_lines(f):
                if line.strip():
                    par.append(line.strip())
                elif par:
                    yield from _split_long(" ".join(par), chunk_chars)
                    par.clear()
        if par:
            yield from _split_long(" ".join(par), chunk_chars)
            par.clear()

    for piece in pieces():
        if size and size + len(piece) > chunk_chars:
            yield Doc("\n\n".join(chunk), source, f"{rel}#{idx}")
            idx += 1
            chunk.clear()
            size = 0
        chunk.append(piece)
        size += len(piece) + 2
    if chunk:
        yield Doc("\n\n".join(chunk), source, f"{rel}#{idx}")


def read_jsonl_file(path: str, source: str, text_field: str = "text") -> Iterator[Doc]:
    rel = os.path.basename(path)
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            did = f"{rel}:{i + 1}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield Doc(None, source, did, "bad_record")
                continue
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                yield Doc(None, source, did, "bad_record")
                continue
            rid = rec.get("id")
            yield Doc(text, source, str(rid) if isinstance(rid, (str, int)) else did)


def _check_column(ds, source: str, text_field: str) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_field not in cols:
        raise SourceError(f"source {source!r}: no column {text_field!r} (columns: {', '.join(cols)}); "
                          "pass --text-field")


def _iter_rows(ds, source: str, text_field: str, batch_size: int = 256) -> Iterator[Doc]:
    n = 0
    for batch in ds.iter(batch_size=batch_size):
        ids = batch.get("id")
        for j, text in enumerate(batch[text_field]):
            did = str(ids[j]) if ids is not None else str(n)
            n += 1
            if isinstance(text, str):
                yield Doc(text, source, did)
            else:
                yield Doc(None, source, did, "bad_record")


def read_disk_dataset(path: str, source: str, text_field: str, split: str) -> Iterator[Doc]:
    """Rows of a ``save_to_disk`` folder (memory-mapped); the folder and column are checked at once."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"source {source!r}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    _check_column(ds, source, text_field)
    return _iter_rows(ds, source, text_field)


def read_hub_dataset(spec: SourceSpec) -> Iterator[Doc]:
    import datasets

    ds = datasets.load_dataset(spec.location, spec.config, split=spec.split, streaming=True)
    n = 0
    for rec in ds:
        text = rec.get(spec.text_field)
        rid = rec.get("id")
        did = str(rid) if rid is not None else str(n)
        n += 1
        yield Doc(text, spec.name, did) if isinstance(text, str) else Doc(None, spec.name, did, "bad_record")


def open_source(spec: SourceSpec, *, chunk_chars: int = 8000, hub_timeout: float = HUB_TIMEOUT_S) -> Iterator[Doc]:
    """A lazy iterator of the source's documents. Hub sources are checked here, before any reading."""
    if spec.kind == "hub":
        ensure_hub(spec.location, timeout=hub_timeout)
        return read_hub_dataset(spec)
    if spec.kind == "disk":
        return read_disk_dataset(spec.location, spec.name, spec.text_field, spec.split)
    if spec.kind == "jsonl":
        return _chain(read_jsonl_file(f, spec.name, spec.text_field) for f in spec.files)
    if spec.kind == "text":
        root = Path(spec.location)
        return _chain(
            read_text_file(f, spec.name, chunk_chars, rel=os.path.relpath(f, root) if root.is_dir() else None)
            for f in spec.files
        )
    raise SourceError(f"unknown source kind {spec.kind!r}")


def _chain(its) -> Iterator[Doc]:
    for it in its:
        yield from it
