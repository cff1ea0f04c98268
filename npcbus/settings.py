"""Settings: one dataclass per service, read from environment variables in one place.

Every field is declared with :func:`env_field`, which records the environment variable that
sets it and a help string. ``Settings.from_env()`` reads, converts and validates every field and
raises :class:`SettingsError` naming the variable on any bad value. ``docs_table()`` renders the
README's configuration table from these declarations so that code and docs cannot drift.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def env_field(
    env: str,
    default: Any,
    help: str,
    *,
    check: Callable[[Any], bool] | None = None,
    check_msg: str = "",
    secret: bool = False,
) -> Any:
    """Declare a settings field bound to environment variable ``env``."""
    meta = {"env": env, "help": help, "check": check, "check_msg": check_msg, "secret": secret}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(raw: str, typ: Any, env: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        return _convert(raw, inner[0], env)
    if typ is bool:
        v = raw.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise SettingsError(f"{env}={raw!r}: expected a boolean (true/false/1/0)")
    if typ is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{env}={raw!r}: expected an integer") from None
    if typ is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise SettingsError(f"{env}={raw!r}: expected a number") from None
    if typ is str:
        return raw
    if origin in (list, tuple) or typ in (list, tuple):
        items = [x.strip() for x in raw.split(",") if x.strip()]
        inner = args[0] if args else str
        return [_convert(x, inner, env) for x in items]
    raise SettingsError(f"{env}: unsupported settings type {typ!r}")


@dataclass
class Settings:
    """Base class. Subclasses declare fields with :func:`env_field`."""

    title: ClassVar[str] = "settings"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            env = f.metadata.get("env")
            if f.name in overrides:
                kwargs[f.name] = overrides[f.name]
            elif env and env in environ:
                kwargs[f.name] = _convert(environ[env], hints[f.name], env)
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                value = getattr(self, f.name)
                ok = False
                try:
                    ok = bool(check(value))
                except Exception:  # noqa: BLE001 - a failing check is a failed validation
                    ok = False
                if not ok:
                    msg = f.metadata.get("check_msg") or "invalid value"
                    raise SettingsError(f"{f.metadata['env']}={value!r}: {msg}")

    def redacted(self) -> dict[str, Any]:
        """Field values with secrets masked, for logging at start."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and v else _mask_url_password(v)
        return out


def _mask_url_password(value: Any) -> Any:
    """``scheme://user:password@host`` with the password masked (AMQP_URL and the like)."""
    if isinstance(value, str) and "://" in value and "@" in value:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", value)
    return value


def docs_rows(cls: type[Settings]) -> list[tuple[str, str, str, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        if not env:
            continue
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            d = f.default_factory()  # type: ignore[misc]
        else:
            d = ""
        if isinstance(d, (list, tuple)):
            d = ",".join(str(x) for x in d)
        if f.metadata.get("secret") and d:
            d = "(set it)"
        rows.append((env, str(d), cls.title, f.metadata.get("help", "")))
    return rows


def docs_table(classes: list[type[Settings]]) -> str:
    seen: dict[str, tuple[str, str, str, str]] = {}
    for cls in classes:
        for row in docs_rows(cls):
            if row[0] in seen:
                env, d, who, h = seen[row[0]]
                if cls.title not in who.split(", "):
                    seen[row[0]] = (env, d, f"{who}, {cls.title}", h)
            else:
                seen[row[0]] = row
    lines = ["| variable | default | used by | meaning |", "| --- | --- | --- | --- |"]
    for env, d, who, h in seen.values():
        dd = f"`{d}`" if d != "" else "(empty)"
        lines.append(f"| `{env}` | {dd} | {who} | {h} |")
    return "\n".join(lines)


def _positive(x: Any) -> bool:
    return x > 0


def _nonneg(x: Any) -> bool:
    return x >= 0


MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def split_amqp_urls(value: str) -> list[str]:
    """The URLs of an ``AMQP_URL`` value: one URL, or several separated by commas (a cluster's nodes)."""
    return [u.strip() for u in value.split(",") if u.strip()]


def resolve_gen_queue_type(value: str, amqp_url: str) -> str:
    """``GEN_QUEUE_TYPE``: ``auto`` is quorum for a cluster (several URLs in ``AMQP_URL``), else classic."""
    if value == "auto":
        return "quorum" if len(split_amqp_urls(amqp_url)) > 1 else "classic"
    return value


def _amqp_urls_ok(value: str) -> bool:
    from urllib.parse import urlparse

    urls = split_amqp_urls(value)
    if not urls or not all(u.startswith(("amqp://", "amqps://")) for u in urls):
        return False
    # every message carries the connection's user id (checked by the broker), and a failover must
    # land in the same vhost: the nodes of one list differ only in host, port and scheme
    return len({(urlparse(u).username, urlparse(u).path.strip("/")) for u in urls}) == 1


@dataclass
class BusSettings(Settings):
    """Broker connection; shared by every service."""

    title: ClassVar[str] = "all"

    amqp_url: str = env_field(
        "AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/",
        "RabbitMQ URL (user, password, host, vhost); for a cluster, a comma-separated list of the nodes' URLs "
        "(same user and vhost): a service connects to the first that answers and, when its node goes, to the next.",
        check=lambda u: _amqp_urls_ok(u), check_msg="must be amqp:// or amqps:// URLs, comma-separated, all with the same user and vhost",
        secret=False,
    )
    gen_queue_type: str = env_field(
        "GEN_QUEUE_TYPE", "auto",
        "Type of the generation queues: `classic` (one broker), `quorum` (a cluster: replicated, survives a node's loss) "
        "or `auto` (quorum when AMQP_URL lists several nodes). Every service of a deployment must agree.",
        check=lambda s: s in ("auto", "classic", "quorum"), check_msg="must be auto, classic or quorum")
    reconnect_s: float = env_field("AMQP_RECONNECT_S", 1.0, "Pause between attempts to reconnect to the broker (each attempt tries the next URL of AMQP_URL).",
                                   check=_positive, check_msg="must be > 0")
    namespace: str = env_field(
        "NPCBUS_NAMESPACE", "npcbus", "Prefix of every exchange and queue name; lets deployments and test runs share a broker.",
        check=lambda s: bool(s) and all(c.isalnum() or c in "-_." for c in s),
        check_msg="use letters, digits, '-', '_' or '.'",
    )
    chunk_bytes: int = env_field(
        "CHUNK_BYTES", 4 * 1024 * 1024, "Payloads above this size travel as numbered, hashed chunks (at most 8 MiB).",
        check=lambda n: 1024 <= n <= MAX_MESSAGE_BYTES, check_msg="must be between 1024 and 8388608",
    )
    heartbeat_s: int = env_field("AMQP_HEARTBEAT_S", 30, "AMQP heartbeat interval in seconds.", check=_positive,
                                 check_msg="must be > 0")
    prefetch: int = env_field("AMQP_PREFETCH", 16, "Default consumer prefetch count.", check=_positive,
                              check_msg="must be > 0")
    log_format: str = env_field("LOG_FORMAT", "console", "Log output: `console` or `json`.",
                                check=lambda s: s in ("console", "json"), check_msg="must be console or json")
    log_level: str = env_field("LOG_LEVEL", "info", "Log level: debug, info, warning, error.",
                               check=lambda s: s.lower() in ("debug", "info", "warning", "error"),
                               check_msg="must be debug, info, warning or error")
    metrics_port: int = env_field("METRICS_PORT", 0, "Port of a Prometheus /metrics endpoint for workers and the aggregator (0: none).",
                                  check=_nonneg, check_msg="must be >= 0")
    metrics_host: str = env_field("METRICS_HOST", "127.0.0.1",
                                  "Address the /metrics endpoint of workers and the aggregator listens on (`0.0.0.0` in containers).")

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs to try, in order (``AMQP_URL`` may list a cluster's nodes)."""
        return split_amqp_urls(self.amqp_url)

    @property
    def effective_gen_queue_type(self) -> str:
        return resolve_gen_queue_type(self.gen_queue_type, self.amqp_url)


@dataclass
class ModelSettings(Settings):
    """Which base model to use."""

    title: ClassVar[str] = "all"

    base_model: str = env_field(
        "BASE_MODEL", "", "Hugging Face name or local path of the base model; empty: the offline default model under MODEL_DIR.")
    model_dir: str = env_field("MODEL_DIR", ".npcbus/models/default",
                               "Where `npcbus model init` writes, and services find, the offline default model.")
    model_seed: int = env_field("MODEL_SEED", 1234, "Seed of the offline default model.")

    def resolve(self) -> str:
        """The path or name of the base model to load."""
        return self.base_model or self.model_dir

    @property
    def model_id(self) -> str:
        """Routing id of the base model: generation requests are routed by it."""
        from npcbus.topology import model_route_key

        return model_route_key(self.base_model or "npcbus-default")
