"""The whole system from ``compose.yaml`` as local processes (the same runner as ``npcbus run``),
against the local RabbitMQ with the compose file's broker definitions imported under a vhost and
user names of the test's own. One stack is shared by the tests that need it (compose parity, the
closed loop, the fault suite) and stopped, with its vhost and users deleted, at the end of the
session.

Only the compose file's own variables are set (the same ones a ``.env`` sets), plus what belongs to
a local run (ports, data folder) and the test's small model; see :func:`stack_variables`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from npcbus import compose
from npcbus.stack import StackSettings, Supervisor, build_plan
from npcbus.tasks import DATA_FILES, read_jsonl

from .broker_roles import BrokerRoles, new_roles
from .gateway_util import WS

TOKEN = "stack-test-token"
ADAPTER = "npc"
HYPER = {"lr": 5e-3, "batch_size": 1, "max_length": 384, "lr_schedule": "constant", "dropout": 0.0}

_STACK: LocalStack | None = None


def stack_variables(roles: BrokerRoles, **extra) -> dict[str, str]:
    """The compose variables of the test stack: broker roles, small and fast settings."""
    v = {
        **roles.env(),
        "API_TOKEN": TOKEN, "ADAPTERS": ADAPTER, "ENGINE": os.environ.get("STACK_ENGINE", "hf"),
        "MAX_CONCURRENCY": "2", "HEARTBEAT_INTERVAL_S": "1", "LOG_FORMAT": "json", "LOG_LEVEL": "info",
        "NUM_TASKS_PER_ROUND": "1", "MIN_UPDATES_PER_ROUND": "1", "ROUND_TIMEOUT_SEC": "30", "TICK_INTERVAL_SEC": "0.3",
        "MAX_STALENESS": "4", "LOOP_BATCH_SIZE": "1",
        # the small untrained test model often answers with a fallback line: rate those too
        "LOOP_REQUIRE_VALID": "false", "LOOP_MAX_WAIT_S": "30", "LOOP_STEPS": "2", "LOOP_LEASE_S": "20",
        "LOOP_HYPERPARAMS": json.dumps(HYPER), "VERSION_WAIT_S": "1", "FETCH_RETRY_S": "60", "OMP_NUM_THREADS": "1",
        "TRAIN_THREADS": "1", "RATE_LIMIT_RPS": "0", "REQUEST_TIMEOUT_S": "60", "INFER_REPLICAS": "1",
        "WORKER_REPLICAS": "1",
    }
    v.update({k: str(x) for k, x in extra.items()})
    return v


class LocalStack:
    def __init__(self, model_dir: str, *, replicas: dict[str, int] | None = None, roles: BrokerRoles | None = None,
                 **variables):
        self.roles = roles or new_roles()
        self.dir = Path(tempfile.mkdtemp(prefix="npcbus-stack-"))
        self.port = compose.free_port()
        self.variables = stack_variables(self.roles, **variables)
        base = dict(os.environ)
        base.update(self.variables)
        base.update({"ADAPTER_MANIFEST": str(self.dir / "adapters.json"), "HF_HUB_OFFLINE": "1",
                     "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                     "MKL_NUM_THREADS": "1"})
        settings = StackSettings.from_env({}, data_dir=str(self.dir / "data"))
        if replicas:
            settings.infer_workers = replicas.get("infer", -1)
            settings.train_workers = replicas.get("worker", -1)
        model_over = {"MODEL_DIR": model_dir}
        self.plan = build_plan(settings, self.variables, base_env=base, gateway_port=self.port,
                               overrides={s: model_over for s in compose.services(None, self.variables)})
        self.sup = Supervisor(self.plan, log_dir=self.dir / "logs", start_timeout_s=600)
        self.personas_at_health: dict[str, dict] | None = None

    # lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 420.0) -> LocalStack:
        self.sup.start()
        self.sup.wait_healthy([s for s in self.sup.services() if s != "gateway"], timeout=timeout)
        self.personas_at_health = self._personas_once_healthy(timeout)
        self.sup.wait_healthy(timeout=timeout)
        return self

    def _personas_once_healthy(self, timeout: float) -> dict[str, dict] | None:
        """``GET /v1/personas`` the moment the gateway's ``/health`` first says ok (what a game
        client that starts as soon as the system is healthy sees); None without a gateway."""
        import urllib.error
        import urllib.request

        if "gateway" not in self.sup.services():
            return None
        end = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() > end:
                raise TimeoutError("the gateway did not turn healthy\n" + self.sup.tails(n=15))
            time.sleep(0.1)
        req = urllib.request.Request(f"{self.base_url}/v1/personas", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return {p["id"]: p for p in json.loads(r.read())["data"]}

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.sup.stop()
        self.roles.remove()
        if os.environ.get("NPCBUS_KEEP_STACK_DIR") == "1":  # to read the services' logs after a failure
            print(f"stack folder kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # addresses -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "data" / "checkpoints"

    def manifests(self, adapter: str = ADAPTER) -> list[dict]:
        from aggregator.state import CheckpointStore

        if not (self.checkpoints / adapter).is_dir():
            return []
        return CheckpointStore(self.checkpoints).manifests(adapter)

    def version(self, adapter: str = ADAPTER) -> int:
        ms = self.manifests(adapter)
        return ms[-1]["version"] if ms else -1

    # logs ------------------------------------------------------------------------------------
    def events(self, name: str, event: str | None = None, **match) -> list[dict]:
        p = self.sup.procs[name]
        out = []
        if p.log_path is None or not p.log_path.exists():
            return out
        for line in p.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if (event is None or e.get("event") == event) and all(e.get(k) == v for k, v in match.items()):
                        out.append(e)
        return out

    def service_events(self, service: str, event: str, **match) -> list[dict]:
        return [e for p in self.sup.of(service) for e in self.events(p.name, event, **match)]

    # broker ----------------------------------------------------------------------------------
    def connections(self) -> list[tuple[str, str, str]]:
        """(pid, user, connection name) of every connection in the stack's vhost."""
        out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "vhost", "user",
                              "client_properties"], capture_output=True, text=True, timeout=60)
        rows = []
        for line in out.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) >= 4 and parts[1] == self.roles.vhost:
                name = ""
                props = parts[3]
                key = '{"connection_name",longstr,"'
                if key in props:
                    name = props.split(key, 1)[1].split('"', 1)[0]
                rows.append((parts[0], parts[2], name))
        return rows

    def cut_connections(self) -> int:
        """Close every broker connection of the stack's vhost (and no other) with rabbitmqctl."""
        rows = self.connections()
        for pid, _user, _name in rows:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "npcbus fault test: connection cut"],
                           capture_output=True, text=True, timeout=60)
        return len(rows)

    # chat ------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def chat(self, **start):
        async with aiohttp.ClientSession() as http:
            ws = WS(await http.ws_connect(f"{self.base_url}/v1/ws", headers={"Authorization": f"Bearer {TOKEN}"},
                                          heartbeat=10))
            try:
                msg = {"type": "session.start", "persona_id": "innkeeper", "player": {"id": "p-1", "name": "Ayla"},
                       "audience": "general", "adapter": ADAPTER,
                       "generation": {"max_new_tokens": 96, "temperature": 0.0}}
                msg.update(start)
                await ws.send({k: v for k, v in msg.items() if v is not None})  # adapter=None: the persona's
                await ws.expect("session.started", timeout=30)
                yield ws
            finally:
                with contextlib.suppress(Exception):
                    await ws.close()

    async def wait_gateway_ready(self, timeout: float = 120.0) -> None:
        """Until the gateway hears an inference consumer that holds the adapter."""
        end = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.base_url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                        models = await r.json() if r.status == 200 else {}
                    async with http.get(f"{self.base_url}/health") as r:
                        health = await r.json()
                    if health.get("status") == "ok" and any(m.get("id") == ADAPTER for m in models.get("data", [])):
                        return
                except (aiohttp.ClientError, ValueError):
                    pass
                if time.monotonic() > end:
                    raise TimeoutError("the gateway does not see an inference consumer holding the adapter\n"
                                       + self.sup.tails(n=15))
                await asyncio.sleep(0.5)


def shared_stack(request, model_dir: str) -> LocalStack:
    """The session's stack, started on first use and stopped at the end of the session."""
    global _STACK
    if _STACK is None:
        stack = LocalStack(model_dir)
        request.config.add_cleanup(stack.stop)
        try:
            stack.start()
        except BaseException:
            tails = stack.sup.tails(n=30)
            stack.stop()
            raise RuntimeError("the local stack did not come up:\n" + tails) from None
        _STACK = stack
    return _STACK


def release_shared_stack() -> None:
    """Stop the session's stack now (the last module that uses it calls this), so that the idle
    services do not hold CPU and memory through the rest of the suite."""
    global _STACK
    if _STACK is not None:
        stack, _STACK = _STACK, None
        stack.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_tasks_applied(stack: LocalStack, task_ids: list[str], timeout: float = 300.0) -> set[str]:
    """Until every task of ``task_ids`` and every task the feedback loop published for the test's
    adapter is applied in some version; returns the loop's task ids."""
    end = time.monotonic() + timeout
    while True:
        # the loop's tasks for this adapter (a shared stack's loop also trained persona adapters)
        loop_tasks = {e["task_id"] for e in stack.service_events("loop", "training task published from experience",
                                                                 adapter=ADAPTER)}
        applied = [t for m in stack.manifests() for t in m.get("task_ids", [])]
        missing = (set(task_ids) | loop_tasks) - set(applied)
        if not missing:
            return loop_tasks
        assert time.monotonic() < end, f"tasks never applied: {sorted(missing)}\n" + stack.sup.tails(n=20)
        await asyncio.sleep(1.0)


def delta_accounts(stack: LocalStack) -> dict:
    """What became of the deltas and tasks of the test's adapter, from the manifests and the logs:
    the versions, the delta and task ids applied (in order, repeats kept), the deltas the workers
    published (broker-confirmed) and those the aggregator rejected, with their reasons."""
    ms = stack.manifests()
    return {
        "manifests": ms,
        "applied_deltas": [d for m in ms for d in m["delta_ids"]],
        "applied_tasks": [t for m in ms for t in m.get("task_ids", [])],
        "published": {e["delta_id"] for e in stack.service_events("worker", "delta published", adapter=ADAPTER)},
        "rejected": {e.get("delta_id"): e.get("reason")
                     for e in stack.service_events("aggregator", "delta rejected", adapter=ADAPTER)},
    }


class Announcements:
    """Version announcements heard by one listener, in order (it rides out the cuts too)."""

    def __init__(self, stack: LocalStack, *, rotate: int = 0):
        self.stack = stack
        self.rotate = rotate
        self.heard: list[int] = []
        self.bus = None

    async def start(self) -> None:
        from npcbus.bus import Bus
        from npcbus.settings import BusSettings

        self.bus = Bus(BusSettings.from_env({"AMQP_URL": self.stack.roles.url("infer", rotate=self.rotate),
                                             "NPCBUS_NAMESPACE": "npcbus"}), name="fault-listener")
        await self.bus.connect()
        topo = self.bus.topology

        async def on(msg, _d):
            if getattr(msg, "adapter", None) == ADAPTER:
                self.heard.append(msg.version)

        await self.bus.consume(topo.listener_queue("versions", self.bus.client_id, topo.versions_exchange), on)

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()


async def publish_tasks(stack: LocalStack, n: int, steps: int, *, rotate: int = 0) -> list[str]:
    """``n`` training tasks of ``steps`` steps for the test's adapter, published as the aggregator's user."""
    from npcbus.bus import Bus
    from npcbus.settings import BusSettings
    from npcbus.tasks import publish_tasks as publish

    records = read_jsonl(DATA_FILES / "npc_dialogue.jsonl")[: 4 * n]
    bus = Bus(BusSettings.from_env({"AMQP_URL": stack.roles.url("aggregator", rotate=rotate),
                                    "NPCBUS_NAMESPACE": "npcbus"}), name="fault-tasks")
    await bus.connect()
    try:
        tasks = await publish(bus, ADAPTER, examples=records, num_tasks=n, steps=steps, hyperparams=HYPER,
                                    lease_s=20)
    finally:
        await bus.close()
    return [t.task_id for t in tasks]
