"""Which models the gateway offers: the base model and the adapters over it.

OpenAI clients pick a model by name; here a name is the base model's id (no adapter) or an adapter
reference of the adapter manifest (``name`` or ``name@version``). Adapters that inference
consumers report in their heartbeats count as known too.
"""

from __future__ import annotations

import time

from npcbus.logs import get_logger
from npcbus.messages import ConsumerHeartbeat

from .core import GatewayError

log = get_logger("npcbus.gateway")

try:  # the manifest is optional: without it only the base model and heartbeat adapters are known
    from npcbus.adapters import AdapterManifest, ManifestError, ManifestSettings, parse_ref
except ImportError:  # pragma: no cover - depends on the checkout
    AdapterManifest = None  # type: ignore[assignment,misc]
    ManifestError = ValueError  # type: ignore[assignment,misc]
    ManifestSettings = None  # type: ignore[assignment,misc]
    parse_ref = None  # type: ignore[assignment]


class ModelCatalog:
    def __init__(self, model_id: str, base_model: str, manifest_path: str | None = None):
        self.model_id = model_id
        self.base_model = base_model
        self.base_names = {model_id, base_model} - {""}
        self.created = int(time.time())
        self.seen: dict[str, float] = {}  # adapter name -> when a consumer reported it (unix time)
        # adapter name -> the newest version a consumer reports serving: the listing's version where
        # this gateway has no manifest (in containers the checkpoints live with the aggregator)
        self.served: dict[str, int] = {}
        self.manifest = None
        if AdapterManifest is not None:
            path = manifest_path or ManifestSettings.from_env().manifest_path
            self.manifest = AdapterManifest(path)

    def note_heartbeat(self, hb: ConsumerHeartbeat) -> None:
        for name, version in (hb.adapters or {}).items():
            if isinstance(name, str):
                self.seen.setdefault(name, time.time())
                if isinstance(version, int) and not isinstance(version, bool) and version > self.served.get(name, -1):
                    self.served[name] = version

    def _entries(self) -> dict:
        if self.manifest is None:
            return {}
        try:
            entries = self.manifest.load()
        except (OSError, ManifestError) as e:
            log.warning("adapter manifest unreadable", path=str(self.manifest.path), error=str(e))
            return {}
        return {n: e for n, e in entries.items() if e.base_model in ("", self.base_model)}

    def resolve(self, model: str | None) -> tuple[str | None, int | None]:
        """``model`` -> (adapter name or None for the base model, pinned version or None)."""
        if model is None or model in self.base_names or model == "":
            return None, None
        if parse_ref is not None:
            try:
                name, version = parse_ref(model)
            except ManifestError as e:
                raise GatewayError("model_not_found", f"the model {model!r} does not exist: {e}", status=404,
                                   param="model") from None
        else:
            name, version = model, None
        entry = self._entries().get(name)
        if entry is None and name not in self.seen:
            raise GatewayError("model_not_found", f"the model {model!r} does not exist (GET /v1/models lists them)",
                               status=404, param="model")
        if entry is not None and version is not None and entry.current_version is not None \
                and version > entry.current_version:
            raise GatewayError("model_not_found", f"adapter {name!r} has no version {version} yet "
                               f"(current {entry.current_version})", status=404, param="model")
        return name, version

    def default_for_persona(self, persona_id: str) -> str | None:
        """The adapter a session of this persona uses when it names none: the one named after the persona
        (in the manifest, or reported by an inference consumer: the aggregator's persona adapters), else
        the first one the manifest registers for it."""
        entries = self._entries()
        if persona_id in entries or persona_id in self.seen:
            return persona_id
        for name in sorted(entries):
            if entries[name].persona_id == persona_id:
                return name
        return None

    def listing(self) -> list[dict]:
        """OpenAI-style model objects: the base model first, then the adapters."""
        out = [{"id": self.model_id, "object": "model", "created": self.created, "owned_by": "npcbus",
                "base_model": self.base_model, "adapter": None, "version": None}]
        entries = self._entries()
        for name in sorted(set(entries) | set(self.seen)):
            e = entries.get(name)
            out.append({"id": name, "object": "model", "created": self.created, "owned_by": "npcbus",
                        "base_model": self.base_model, "adapter": name,
                        "version": e.current_version if e is not None else self.served.get(name),
                        "persona_id": (e.persona_id or None) if e is not None else None,
                        "description": e.description if e is not None else ""})
        return out
