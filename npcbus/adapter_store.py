"""Adapter versions on disk and over the bus.

An adapter version is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).
Its *content hash* is the SHA-256 over its files' names and bytes, so identical weights share one
cache entry whatever the version number. No shared disk is assumed: a process that lacks a
version asks for it on the bus (:func:`fetch_adapter`), and whoever holds versions (the
aggregator) answers with :func:`serve_adapter_fetches`. On the same queue :func:`list_adapters`
asks for every adapter's current version, so that a process that starts between two version
announcements knows every adapter at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from npcbus.logs import get_logger
from npcbus.messages import (
    AdapterFetchReply,
    AdapterFetchRequest,
    AdapterListReply,
    AdapterListRequest,
    VersionAnnouncement,
)

log = get_logger("npcbus.adapter_store")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterUnavailable(RuntimeError):
    """The adapter version could not be fetched."""


def content_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(name.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def read_adapter_files(path: str | os.PathLike) -> dict[str, bytes]:
    """The files of a PEFT adapter folder that travel on the bus."""
    p = Path(path)
    out = {}
    for name in ADAPTER_FILES:
        f = p / name
        if not f.exists() and name == "adapter_model.safetensors" and (p / "adapter_model.bin").exists():
            f = p / "adapter_model.bin"
            name = "adapter_model.bin"
        if f.exists():
            out[name] = f.read_bytes()
    if "adapter_config.json" not in out:
        raise FileNotFoundError(f"{p} is not a PEFT adapter folder (no adapter_config.json)")
    return out


def write_atomic_folder(dest: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``dest`` atomically (a temporary sibling folder, then rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"bad file name {name!r}")
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if dest.exists():
            shutil.rmtree(tmp)
            return dest
        os.rename(tmp, dest)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class AdapterCache:
    """Adapter folders cached by content hash under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, chash: str) -> Path:
        return self.root / chash

    def has(self, chash: str) -> bool:
        return (self.path_for(chash) / "adapter_config.json").exists()

    def put(self, files: dict[str, bytes], expected_hash: str | None = None) -> tuple[str, Path]:
        chash = content_hash(files)
        if expected_hash and chash != expected_hash:
            raise AdapterUnavailable(f"content hash mismatch: got {chash[:12]}, expected {expected_hash[:12]}")
        path = self.path_for(chash)
        if not self.has(chash):
            write_atomic_folder(path, files)
        return chash, path


@dataclass
class FetchedAdapter:
    adapter: str
    version: int
    content_hash: str
    base_model: str
    path: Path


async def fetch_adapter(bus, cache: AdapterCache, adapter: str, version: int | None = None, *,
                        content_hash_hint: str | None = None, timeout: float = 60.0) -> FetchedAdapter:
    """Return a local folder holding ``adapter`` at ``version`` (None: the current one),
    from the cache when the content hash is known and present, else fetched through the bus."""
    if content_hash_hint and cache.has(content_hash_hint) and version is not None:
        return FetchedAdapter(adapter, version, content_hash_hint, "", cache.path_for(content_hash_hint))
    topo = bus.topology
    reply = await bus.request(topo.fetch_exchange, "adapter", AdapterFetchRequest(adapter, version), timeout=timeout)
    if not isinstance(reply, AdapterFetchReply):
        raise AdapterUnavailable(f"unexpected reply {reply.TYPE}")
    if reply.error:
        raise AdapterUnavailable(reply.error)
    chash, path = await asyncio.to_thread(cache.put, reply.files, reply.content_hash or None)
    log.info("adapter fetched", adapter=adapter, version=reply.version, hash=chash[:12])
    return FetchedAdapter(adapter, reply.version, chash, reply.base_model, path)


async def list_adapters(bus, *, timeout: float = 10.0) -> list[VersionAnnouncement] | None:
    """Every adapter's current version, from whoever serves adapter fetches; None (at once) when
    nothing consumes the fetch queue (no aggregator runs). Raises :class:`AdapterUnavailable` when
    the answer is an error or does not come within ``timeout``."""
    from npcbus.bus import BusTimeout

    topo = bus.topology
    if not await bus.queue_consumers(topo.fetch_queue.name):
        return None
    try:
        reply = await bus.request(topo.fetch_exchange, "adapter", AdapterListRequest(), timeout=timeout)
    except BusTimeout as e:
        raise AdapterUnavailable(f"no adapter list within {timeout:g} s") from e
    if not isinstance(reply, AdapterListReply):
        raise AdapterUnavailable(f"unexpected reply {reply.TYPE}")
    if reply.error:
        raise AdapterUnavailable(reply.error)
    return reply.announcements()


Resolver = Callable[[str, int | None], Awaitable[AdapterFetchReply]]
Lister = Callable[[], Awaitable[AdapterListReply]]


async def serve_adapter_fetches(bus, resolver: Resolver, *, lister: Lister | None = None, prefetch: int = 4):
    """Answer adapter fetch requests with ``resolver(adapter, version) -> AdapterFetchReply`` and,
    with ``lister``, adapter list requests with ``lister() -> AdapterListReply``."""
    from npcbus.bus import Ack, Reject

    async def handler(req, d):
        if isinstance(req, AdapterListRequest):
            try:
                reply = await lister() if lister is not None else AdapterListReply(
                    error="this server of adapter fetches does not list adapters")
            except Exception as e:  # noqa: BLE001 - answer the requester, do not crash
                reply = AdapterListReply(error=f"{type(e).__name__}: {e}")
            what = "list"
        elif isinstance(req, AdapterFetchRequest):
            try:
                reply = await resolver(req.adapter, req.version)
            except Exception as e:  # noqa: BLE001 - answer the requester, do not crash
                reply = AdapterFetchReply(req.adapter, error=f"{type(e).__name__}: {e}")
            what = req.adapter
        else:
            return Reject(f"expected adapter_fetch_request or adapter_list_request, got {req.TYPE}", "wrong_type")
        try:
            await bus.reply(d, reply)
        except Exception as e:  # noqa: BLE001 - requester gone
            log.warning("could not answer an adapter fetch", adapter=what, error=str(e))
        return Ack()

    return await bus.consume(bus.topology.fetch_queue, handler, prefetch=prefetch)
