"""`npcbus run`: the whole system as local processes, supervised: the services of ``compose.yaml``.

The process list comes from the compose file (:mod:`npcbus.compose`): the same services, commands,
environments, dependencies and healthchecks as ``docker compose up``, run as local processes
against a local RabbitMQ. In order: the broker definitions (a user per role, imported with
``rabbitmqctl``), the offline model build, the aggregator, the feedback loop, the training
workers, the inference consumers and the gateway; each service starts once its dependencies pass
their healthchecks, as Compose does. A process that exits is restarted with a backoff (the
services' ``restart: unless-stopped``). Ctrl-C (or SIGTERM) stops them all.

Secrets that are not set are generated for the run and the ones a person needs are printed:
``API_TOKEN`` (when ``REQUIRE_API_TOKEN`` is on) and the broker passwords ``AMQP_PASSWORD_<ROLE>``.
With ``RUN_BROKER_USERS=false`` every service logs in with ``AMQP_URL`` instead (for a broker where
``rabbitmqctl`` cannot be run), and the consumers' sender lists (``ALLOWED_SENDERS``,
``ALLOWED_TASK_SENDERS``) name that user instead of the role users.

:class:`Supervisor` is the same runner the compose parity, closed-loop and fault tests use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

from npcbus.settings import Settings, env_field

# consumers' lists of the broker users allowed to send to them (compose.yaml names the role users)
SENDER_LISTS = ("ALLOWED_SENDERS", "ALLOWED_TASK_SENDERS")


@dataclass
class StackSettings(Settings):
    title: ClassVar[str] = "run"

    infer_workers: int = env_field("RUN_INFER_WORKERS", -1, "`npcbus run`: inference consumers to start (-1: the compose "
                                   "file's replicas, INFER_REPLICAS or 1).",
                                   check=lambda n: n >= -1, check_msg="must be >= 0 (or -1)")
    train_workers: int = env_field("RUN_TRAIN_WORKERS", -1, "`npcbus run`: training workers to start (-1: the compose "
                                   "file's replicas, WORKER_REPLICAS or 1).",
                                   check=lambda n: n >= -1, check_msg="must be >= 0 (or -1)")
    with_aggregator: bool = env_field("RUN_AGGREGATOR", True, "`npcbus run`: start the aggregator.")
    with_gateway: bool = env_field("RUN_GATEWAY", True, "`npcbus run`: start the gateway.")
    with_loop: bool = env_field("RUN_LOOP", True, "`npcbus run`: start the feedback loop.")
    compose_file: str = env_field("RUN_COMPOSE_FILE", "", "`npcbus run`: the compose file to run (empty: the checkout's compose.yaml).")
    data_dir: str = env_field("RUN_DATA_DIR", ".npcbus", "`npcbus run`: where the compose file's /data/ volumes live locally.")
    broker_users: bool = env_field(
        "RUN_BROKER_USERS", True, "`npcbus run`: import the broker definitions (a user per role) with rabbitmqctl and run "
        "each service as its role's user; false: every service uses AMQP_URL.")
    start_timeout_s: float = env_field("RUN_START_TIMEOUT_S", 900.0, "`npcbus run`: how long a service may wait for its dependencies.",
                                       check=lambda x: x > 0, check_msg="must be > 0")


# ------------------------------------------------------------------------------------------------
# the supervisor
# ------------------------------------------------------------------------------------------------


def _tcp_ok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    """A supervised local process (restarted when it exits, unless it is a one-shot job)."""

    spec: object  # npcbus.compose.LocalProcess
    popen: subprocess.Popen | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)  # a job finished (see exit_codes)
    started: threading.Event = field(default_factory=threading.Event)
    log_path: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        p = self.popen
        return p.pid if p is not None and p.poll() is None else None


class Supervisor:
    """Runs a local plan (:func:`npcbus.compose.local_plan`): dependencies first, each service when
    its dependencies' conditions hold, restarts on exit. Thread-based, so any caller can use it."""

    def __init__(self, plan, *, log_dir: str | Path | None = None, echo: bool = False,
                 start_timeout_s: float = 900.0, on_line: Callable[[str, str], None] | None = None):
        self.plan = list(plan)
        self.procs = {p.name: Proc(p) for p in self.plan}
        self.log_dir = Path(log_dir) if log_dir else None
        self.echo = echo
        self.on_line = on_line
        self.start_timeout_s = start_timeout_s
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for p in self.procs.values():
                p.log_path = self.log_dir / f"{p.name}.log"

    # queries ---------------------------------------------------------------------------------
    def of(self, service: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.spec.service == service]

    def services(self) -> list[str]:
        return list(dict.fromkeys(p.service for p in self.plan))

    def healthy(self, name: str) -> tuple[bool, str]:
        """Runs the process's healthcheck now."""
        p = self.procs[name]
        spec = p.spec
        if spec.kind == "broker":
            if not p.started.is_set():
                return False, "waiting for its dependencies"
            host, port = spec.env.get("AMQP_HOST", "127.0.0.1"), int(spec.env.get("AMQP_PORT", "5672") or 5672)
            return (_tcp_ok(host, port), "broker reachable" if _tcp_ok(host, port) else "broker unreachable")
        if spec.kind in ("once", "broker-init"):
            if not p.done.is_set():
                return False, "not finished"
            return (p.exit_codes[-1:] == [0], f"exited with {p.exit_codes[-1:]}")
        if p.pid is None:
            return False, "not running"
        if not spec.health:
            return True, "running (no healthcheck)"
        env = dict(spec.env)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", os.defpath)
        try:
            out = subprocess.run(["sh", "-c", spec.health], env=env, capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return False, "healthcheck timed out"
        return out.returncode == 0, (out.stderr or out.stdout).strip() or f"exit {out.returncode}"

    def service_healthy(self, service: str) -> bool:
        return all(self.healthy(p.name)[0] for p in self.of(service))

    def wait_healthy(self, services: list[str] | None = None, timeout: float = 600.0) -> None:
        """Wait until every process of ``services`` (default: all) passes its healthcheck."""
        names = [p.name for p in self.procs.values() if services is None or p.spec.service in services]
        end = time.monotonic() + timeout
        while True:
            bad = {}
            for n in names:
                ok, why = self.healthy(n)
                if not ok:
                    bad[n] = why
            if not bad:
                return
            if self.errors:
                raise RuntimeError("; ".join(self.errors) + "\n" + self.tails(list(bad)))
            if time.monotonic() > end:
                raise TimeoutError(f"not healthy after {timeout:.0f} s: {bad}\n" + self.tails(list(bad)))
            time.sleep(0.5)

    def tails(self, names: list[str] | None = None, n: int = 25) -> str:
        out = []
        for p in self.procs.values():
            if names is not None and p.name not in names:
                continue
            if p.log_path and p.log_path.exists():
                lines = p.log_path.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # running ---------------------------------------------------------------------------------
    def start(self) -> Supervisor:
        for service in self.services():
            t = threading.Thread(target=self._up, args=(service,), name=f"up-{service}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _condition_met(self, service: str, dep) -> bool:
        procs = self.of(service)
        if not procs:
            return True
        if dep.condition == "service_completed_successfully":
            return all(p.done.is_set() and p.exit_codes[-1:] == [0] for p in procs)
        if dep.condition == "service_healthy":
            return all(self.healthy(p.name)[0] for p in procs)
        return all(p.started.is_set() for p in procs)

    def _up(self, service: str) -> None:
        procs = self.of(service)
        spec = procs[0].spec
        end = time.monotonic() + self.start_timeout_s
        for dep_name, dep in spec.depends_on.items():
            while not self._condition_met(dep_name, dep):
                if self.stopping.is_set():
                    return
                failed = [p for p in self.of(dep_name) if p.spec.kind in ("once", "broker-init") and p.done.is_set()
                          and p.exit_codes[-1:] != [0]]
                if failed or time.monotonic() > end:
                    msg = (f"{service}: dependency {dep_name} failed" if failed else
                           f"{service}: {dep_name} not {dep.condition} after {self.start_timeout_s:.0f} s")
                    self.errors.append(msg)
                    self._say(service, msg)
                    return
                time.sleep(0.5)
        for p in procs:
            if p.spec.kind == "broker":
                p.started.set()
                p.done.set()
                continue
            t = threading.Thread(target=self._keep, args=(p,), name=f"run-{p.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _say(self, name: str, text: str) -> None:
        line = f"[npcbus run] {text}"
        p = self.procs.get(name)
        if p is not None and p.log_path:
            with open(p.log_path, "a") as fh:
                fh.write(line + "\n")
        if self.echo:
            sys.stdout.write(f"{name:>12} | {line}\n")
            sys.stdout.flush()

    def _spawn(self, p: Proc) -> subprocess.Popen:
        spec = p.spec
        env = dict(spec.env)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", os.defpath)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if p.log_path and not self.echo and self.on_line is None:
            fh = open(p.log_path, "ab")
            try:
                return subprocess.Popen(spec.argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            finally:
                fh.close()
        popen = subprocess.Popen(spec.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._pump, args=(p, popen), daemon=True).start()
        return popen

    def _pump(self, p: Proc, popen: subprocess.Popen) -> None:
        fh = open(p.log_path, "a") if p.log_path else None
        try:
            for raw in popen.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if fh:
                    fh.write(line + "\n")
                    fh.flush()
                if self.on_line:
                    self.on_line(p.name, line)
                if self.echo:
                    sys.stdout.write(f"{p.name:>12} | {line}\n")
                    sys.stdout.flush()
        finally:
            if fh:
                fh.close()

    def _keep(self, p: Proc) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self.stopping.is_set():
                    return
                self._say(p.name, f"starting: {' '.join(p.spec.argv[-3:])}" + (f" (start {p.starts + 1})" if p.starts else ""))
                p.popen = self._spawn(p)
                p.starts += 1
            p.started.set()
            code = p.popen.wait()
            p.exit_codes.append(code)
            if p.spec.kind == "broker-init" and code == 0:
                try:
                    self._import_definitions(p)
                except Exception as e:  # noqa: BLE001 - reported as the job's failure
                    self._say(p.name, f"importing the definitions failed: {e}")
                    p.exit_codes[-1] = 1
            if p.spec.kind in ("once", "broker-init"):
                p.done.set()
                if p.exit_codes[-1] != 0 and not self.stopping.is_set():
                    self.errors.append(f"{p.name} failed with exit code {p.exit_codes[-1]}")
                self._say(p.name, f"finished with exit code {p.exit_codes[-1]}")
                return
            if self.stopping.is_set() or not p.spec.restart:
                self._say(p.name, f"exited with {code}")
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            self._say(p.name, f"exited with {code}; restarting in {backoff:.0f} s")
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)

    def _import_definitions(self, p: Proc) -> None:
        import json

        from npcbus import broker_setup

        argv = p.spec.argv
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        if out is None:
            raise RuntimeError("the broker-init command has no --out FILE")
        broker_setup.apply(json.loads(Path(out).read_text()))
        self._say(p.name, f"definitions imported into the broker from {out}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to a running process (the supervisor restarts it). Returns the pid."""
        p = self.procs[name]
        pid = p.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        with self._lock:
            running = [p for p in self.procs.values() if p.pid is not None]
        # dependents first: the reverse of the start order
        for p in reversed(running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in reversed(running):
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, signal.SIGKILL)
                p.popen.wait(10)
        for t in self._threads:
            t.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# building the plan
# ------------------------------------------------------------------------------------------------


def build_plan(settings: StackSettings, variables: Mapping[str, str], *, base_env: Mapping[str, str] | None = None,
               gateway_port: int = 8080, overrides: Mapping[str, Mapping[str, str]] | None = None,
               exclude: tuple[str, ...] = ()):
    """The local processes of the compose file for these settings and variables."""
    from npcbus import compose

    svcs = compose.services(settings.compose_file or None, variables)
    replicas = {}
    if settings.infer_workers >= 0:
        replicas["infer"] = settings.infer_workers
    if settings.train_workers >= 0:
        replicas["worker"] = settings.train_workers
    excluded = set(exclude)
    if not settings.with_aggregator:
        excluded.add("aggregator")
    if not settings.with_gateway:
        excluded.add("gateway")
    if not settings.with_loop:
        excluded.add("loop")
    for name, n in replicas.items():
        if n == 0:
            excluded.add(name)
    env = dict(os.environ if base_env is None else base_env)
    ov: dict[str, dict[str, str]] = {k: dict(v) for k, v in (overrides or {}).items()}
    if not settings.broker_users:
        excluded.add("broker-init")
        url = env.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
        user = unquote(urlparse(url).username or "guest")
        for name, svc in svcs.items():
            if "AMQP_URL" in svc.environment:
                ov.setdefault(name, {})["AMQP_URL"] = url
            # one user sends everything: the senders the consumers accept are that user
            for key in SENDER_LISTS:
                if key in svc.environment:
                    ov.setdefault(name, {})[key] = user
    return compose.local_plan(svcs, data_dir=settings.data_dir, base_env=env, gateway_port=gateway_port,
                              replicas=replicas, overrides=ov, exclude=tuple(sorted(excluded)))


def run_variables(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The compose variables of a local run: the environment, the local broker's address, and
    secrets generated for this run where unset. Returns (variables, lines to print)."""
    from npcbus import broker_setup

    v = dict(environ)
    notes = []
    url = urlparse(v.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    v.setdefault("AMQP_HOST", url.hostname or "127.0.0.1")
    v.setdefault("AMQP_PORT", str(url.port or 5672))
    for role in (*broker_setup.ROLES, broker_setup.ADMIN):
        key = f"AMQP_PASSWORD_{role.upper()}"
        if not v.get(key):
            v[key] = secrets.token_hex(16)
            if role == broker_setup.ADMIN:
                notes.append(f"broker admin user {v.get('AMQP_USER_PREFIX', 'npcbus-')}admin: password {v[key]} "
                             "(AMQP_PASSWORD_ADMIN was not set)")
    if v.get("REQUIRE_API_TOKEN", "true").lower() not in ("0", "false", "no", "off") and not v.get("API_TOKEN"):
        v["API_TOKEN"] = secrets.token_urlsafe(24)
        notes.append(f"API_TOKEN was not set: this run's token is {v['API_TOKEN']}")
    elif not v.get("API_TOKEN"):
        v["API_TOKEN"] = ""
    return v, notes


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--infer-workers", type=int, help="inference consumers (RUN_INFER_WORKERS)")
    parser.add_argument("--train-workers", type=int, help="training workers (RUN_TRAIN_WORKERS)")
    parser.add_argument("--no-gateway", action="store_true", help="do not start the gateway")
    parser.add_argument("--no-aggregator", action="store_true", help="do not start the aggregator")
    parser.add_argument("--no-loop", action="store_true", help="do not start the feedback loop")
    parser.add_argument("--dry-run", action="store_true", help="print the processes and exit")


def plan(settings: StackSettings, environ: Mapping[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The processes `npcbus run` starts: (name, argv)."""
    variables, _ = run_variables(os.environ if environ is None else environ)
    return [(p.name, p.argv) for p in build_plan(settings, variables, base_env=variables)]


def run(args) -> int:
    settings = StackSettings.from_env()
    if args.infer_workers is not None:
        settings.infer_workers = args.infer_workers
    if args.train_workers is not None:
        settings.train_workers = args.train_workers
    if args.no_gateway:
        settings.with_gateway = False
    if args.no_aggregator:
        settings.with_aggregator = False
    if args.no_loop:
        settings.with_loop = False
    settings.validate()
    variables, notes = run_variables(os.environ)
    variables.setdefault("HF_HUB_OFFLINE", "1")
    variables.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    port = int(os.environ.get("GATEWAY_PORT", "8080") or 8080)
    procs = build_plan(settings, variables, base_env=variables, gateway_port=port)
    if args.dry_run:
        for p in procs:
            print(f"{p.name}: {' '.join(p.argv)}" + (f"  [{p.kind}]" if p.kind != "process" else ""))
        return 0
    for line in notes:
        print(line, flush=True)
    sup = Supervisor(procs, log_dir=Path(settings.data_dir) / "run-logs", echo=True,
                     start_timeout_s=settings.start_timeout_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sup.start()
    if any(p.service == "gateway" for p in procs):
        print(f"gateway: http://127.0.0.1:{port}/ (once it is healthy)", flush=True)
    while not stop.wait(1.0):
        if sup.errors:
            print("; ".join(sup.errors), file=sys.stderr, flush=True)
            break
    print("stopping...", flush=True)
    sup.stop()
    return 1 if sup.errors else 0
