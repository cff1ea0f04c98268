"""``compose.yaml`` read as data: the services, their commands, environments, dependencies and
healthchecks, and how each runs as a local process on a machine without Docker.

``npcbus run`` and the compose parity test both take the system's process list from here, so the
compose file cannot drift from what runs locally. Pure functions, no processes: see
:mod:`npcbus.stack` for the supervisor that runs a plan.

Variables are interpolated as Compose does (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``$VAR``, ``$$`` for a literal ``$``). Each service says how it
runs locally in its ``x-npcbus-local`` field:

===============  ================================================================================
``process``      its command, as a local process, with its environment; restarted like the
                 container (``restart``); ``deploy.replicas`` copies
``once``         a job run to completion (``service_completed_successfully`` for its dependents)
``broker``       the local RabbitMQ (healthy when it accepts connections at AMQP_HOST:AMQP_PORT)
``broker-init``  its command writes the broker definitions, which are imported with
                 ``rabbitmqctl import_definitions`` (what the broker does with them at boot)
``skip``         not needed to run the system locally (Prometheus, Open WebUI, the GPU profile)
===============  ================================================================================

What differs locally is only what belongs to a container: paths under ``/data/`` (in the
environment and the command) live under a local data folder, ``METRICS_PORT`` is a free port per process, the gateway listens on the port
given, addresses ``0.0.0.0`` become ``127.0.0.1``, and ``AMQP_HOST`` names the local broker.
"""

from __future__ import annotations

import re
import shlex
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_KINDS = ("process", "once", "broker", "broker-init", "skip")
DATA_PREFIX = "/data/"


class ComposeError(ValueError):
    """compose.yaml cannot be read, or a required variable is missing."""


def default_compose_file() -> Path:
    return Path(__file__).resolve().parent.parent / "compose.yaml"


# ------------------------------------------------------------------------------------------------
# interpolation
# ------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        val = variables.get(name)
        if op is None:
            return val if val is not None else ""
        unset = val is None or (op.startswith(":") and val == "")
        if op.endswith("-"):
            return interpolate(arg or "", variables) if unset else val
        if unset:
            raise ComposeError(f"variable {name} is required: {arg or 'not set'}")
        return val

    return _VAR.sub(sub, value)


def _walk(obj: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate(obj, variables)
    if isinstance(obj, list):
        return [_walk(x, variables) for x in obj]
    if isinstance(obj, dict):
        return {k: _walk(v, variables) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------------
# services
# ------------------------------------------------------------------------------------------------


@dataclass
class Dependency:
    condition: str = "service_started"
    required: bool = True


@dataclass
class ComposeService:
    name: str
    local: str
    command: list[str]
    environment: dict[str, str]
    depends_on: dict[str, Dependency]
    healthcheck: list[str] | None
    restart: str
    replicas: int
    profiles: list[str]
    raw: dict = field(repr=False, default_factory=dict)


def load_raw(path: str | Path | None = None) -> dict:
    import yaml

    p = Path(path) if path else default_compose_file()
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ComposeError(f"{p} not found") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ComposeError(f"{p}: no services")
    return doc


def _env(raw) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        out = {}
        for item in raw:
            k, sep, v = str(item).partition("=")
            if sep:
                out[k] = v
        return out
    return {str(k): ("" if v is None else str(v)) for k, v in raw.items()}


def _deps(raw) -> dict[str, Dependency]:
    if not raw:
        return {}
    if isinstance(raw, list):
        return {str(n): Dependency() for n in raw}
    return {str(n): Dependency(d.get("condition", "service_started"), bool(d.get("required", True)))
            for n, d in raw.items()}


def services(path: str | Path | None = None, variables: Mapping[str, str] | None = None,
             profiles: tuple[str, ...] = ()) -> dict[str, ComposeService]:
    """The services of the compose file, interpolated with ``variables``, in file order. Services
    of profiles that are not in ``profiles`` are left out, as ``docker compose up`` does."""
    doc = load_raw(path)
    out: dict[str, ComposeService] = {}
    for name, raw in doc["services"].items():
        svc_profiles = list(raw.get("profiles") or [])
        if svc_profiles and not set(svc_profiles) & set(profiles):
            continue
        raw = _walk(raw, variables or {})
        local = raw.get("x-npcbus-local", "skip")
        if local not in LOCAL_KINDS:
            raise ComposeError(f"service {name}: x-npcbus-local must be one of {', '.join(LOCAL_KINDS)}")
        cmd = raw.get("command") or []
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        hc = raw.get("healthcheck") or {}
        test = hc.get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if hc.get("disable") or (test and test[0] == "NONE"):
            test = None
        replicas = (raw.get("deploy") or {}).get("replicas", raw.get("scale", 1))
        try:
            replicas = int(replicas)
        except (TypeError, ValueError):
            raise ComposeError(f"service {name}: replicas {replicas!r} is not a number") from None
        out[name] = ComposeService(
            name=name, local=local, command=[str(c) for c in cmd], environment=_env(raw.get("environment")),
            depends_on=_deps(raw.get("depends_on")), healthcheck=[str(t) for t in test] if test else None,
            restart=str(raw.get("restart", "no")), replicas=replicas, profiles=svc_profiles, raw=raw)
    return out


def start_order(svcs: Mapping[str, ComposeService]) -> list[str]:
    """Service names with every dependency before its dependents (ComposeError on a cycle)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ComposeError("dependency cycle: " + " -> ".join((*path, n)))
        state[n] = 1
        for d in svcs[n].depends_on:
            if d in svcs:
                visit(d, (*path, n))
        state[n] = 2
        order.append(n)

    for n in svcs:
        visit(n, ())
    return order


# ------------------------------------------------------------------------------------------------
# the local plan
# ------------------------------------------------------------------------------------------------


@dataclass
class LocalProcess:
    """One local process of a service (one per replica)."""

    name: str
    service: str
    kind: str                       # process, once, broker, broker-init
    argv: list[str]
    env: dict[str, str]
    health: str | None              # a shell command (with $VARS from env), or None
    restart: bool
    depends_on: dict[str, Dependency]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_argv(command: list[str]) -> list[str]:
    """A container command as a local one: ``npcbus ...`` through this interpreter's module, and
    ``python ...`` with this interpreter."""
    if not command:
        return []
    if command[0] == "npcbus":
        return [sys.executable, "-m", "npcbus.cli", *command[1:]]
    if command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return list(command)


def health_command(test: list[str] | None) -> str | None:
    if not test:
        return None
    if test[0] == "CMD-SHELL":
        return " ".join(test[1:])
    if test[0] == "CMD":
        return shlex.join(test[1:])
    return shlex.join(test)


def local_plan(svcs: Mapping[str, ComposeService], *, data_dir: str | Path, base_env: Mapping[str, str],
               gateway_port: int = 8080, replicas: Mapping[str, int] | None = None,
               overrides: Mapping[str, Mapping[str, str]] | None = None,
               exclude: tuple[str, ...] = ()) -> list[LocalProcess]:
    """Every local process of the services, in start order. ``overrides``: extra environment per
    service (applied last); ``replicas``: copies per service over the file's ``deploy.replicas``."""
    data_dir = Path(data_dir).resolve()
    replicas = dict(replicas or {})
    overrides = dict(overrides or {})
    out: list[LocalProcess] = []
    for name in start_order(svcs):
        svc = svcs[name]
        if svc.local == "skip" or name in exclude:
            continue
        n = replicas.get(name, svc.replicas) if svc.local == "process" else 1
        for i in range(n):
            env = dict(base_env)
            for k, v in svc.environment.items():
                if v.startswith(DATA_PREFIX):
                    v = str(data_dir / v[len(DATA_PREFIX):])
                env[k] = v
            if "METRICS_PORT" in svc.environment and svc.environment["METRICS_PORT"] not in ("", "0"):
                env["METRICS_PORT"] = str(free_port())
            if "GATEWAY_PORT" in svc.environment:
                env["GATEWAY_PORT"] = str(gateway_port)
            for k in ("GATEWAY_HOST", "METRICS_HOST"):
                if env.get(k) == "0.0.0.0":
                    env[k] = "127.0.0.1"
            env.update(overrides.get(name, {}))
            argv = [str(data_dir / a[len(DATA_PREFIX):]) if a.startswith(DATA_PREFIX) else a
                    for a in local_argv(svc.command)]
            out.append(LocalProcess(
                name=f"{name}-{i + 1}" if n > 1 else name, service=name, kind=svc.local,
                argv=argv, env=env, health=health_command(svc.healthcheck),
                restart=svc.restart in ("always", "unless-stopped", "on-failure") and svc.local == "process",
                depends_on={d: dep for d, dep in svc.depends_on.items()
                            if d in svcs and svcs[d].local != "skip" and d not in exclude}))
    return out
