"""Faults under load, with every service of compose.yaml running as its own local process (the
supervisor restarts a killed one, as Compose's ``restart: unless-stopped`` does):

* ``kill -9`` of each kind of service in turn (inference consumer, training worker, aggregator,
  feedback loop, gateway) while chat turns and training tasks flow;
* every broker connection of the stack cut at once (``rabbitmqctl close_connection`` on each
  connection of the stack's own vhost, never anyone else's; the long form also cuts them again
  while the services are busy).

Then: every service is healthy again by itself, every confirmed task is applied exactly once, no
delta is applied twice and every published delta is applied or rejected with a reason, versions
only go up (manifests, announcements, the versions that answer chat turns), and every chat turn
in flight ended with its answer or a retryable error (or its socket dropped with its gateway).

The short form (unmarked) runs in CI on the shared stack; the long form (``pytest -m slow
tests/test_faults.py``: more replicas, rounds and cuts) runs by hand and is skipped unless ``-m``
selects ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from .conftest import broker_up
from .stack_util import (
    Announcements,
    LocalStack,
    delta_accounts,
    publish_tasks,
    release_shared_stack,
    shared_stack,
    wait_tasks_applied,
)

pytestmark = [pytest.mark.broker, pytest.mark.skipif(not broker_up(), reason="needs the local RabbitMQ")]


@pytest.fixture(scope="module", autouse=True)
def _release_stack_after_module():
    yield
    release_shared_stack()  # this module is the last (alphabetically) to use the shared stack

KINDS = ("infer", "worker", "aggregator", "loop", "gateway")


@dataclass
class Traffic:
    """Chat turns in a loop (a thumbs up on every third), recording how each one ended."""

    stack: LocalStack
    finals: list[tuple[float, int | None]] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    drops: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    turns: int = 0

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                async with self.stack.chat() as ws:
                    while not self.stop.is_set():
                        n += 1
                        tid = f"f-{n}"
                        self.turns += 1
                        _d, ev = await ws.turn(tid, random.choice(["Any rooms free tonight?", "What is for supper?",
                                                                   "Heard any rumours?"]), timeout_ms=45000)
                        if ev["type"] == "turn.final":
                            self.finals.append((time.monotonic(), ev.get("adapter_version")))
                            if n % 3 == 0:
                                await ws.send({"type": "turn.feedback", "turn_id": tid, "thumbs": "up"})
                        else:
                            self.errors.append(ev)
                            await asyncio.sleep(min(2.0, (ev.get("retry_after_ms") or 500) / 1000))
            except (TimeoutError, AssertionError, aiohttp.ClientError, ConnectionError, OSError):
                # the socket dropped with its gateway (or could not be opened while it restarts)
                self.drops += 1
                await asyncio.sleep(0.5)

    def finals_since(self, t: float) -> int:
        return sum(1 for at, _v in self.finals if at > t)


async def _recovered(stack: LocalStack, names: list[str], timeout: float = 180.0) -> None:
    await asyncio.to_thread(stack.sup.wait_healthy, None, timeout)


async def _kill(stack: LocalStack, service: str, traffic: Traffic, *, mid_task: bool = False, replica: int = 0) -> None:
    procs = stack.sup.of(service)
    proc = procs[replica % len(procs)]
    if mid_task:  # a worker while it trains, if one starts training soon
        seen = len(stack.events(proc.name, "task accepted; training"))
        end = time.monotonic() + 30
        while len(stack.events(proc.name, "task accepted; training")) <= seen and time.monotonic() < end:
            await asyncio.sleep(0.1)
    starts = proc.starts
    pid = stack.sup.kill(proc.name)
    assert pid is not None, f"{proc.name} was not running"
    end = time.monotonic() + 60
    while proc.starts <= starts:
        assert time.monotonic() < end, f"{proc.name} was not restarted"
        await asyncio.sleep(0.2)
    await _recovered(stack, [proc.name])
    t = time.monotonic()
    if service in ("infer", "gateway"):  # the chat comes back
        end = time.monotonic() + 120
        while traffic.finals_since(t) < 1:
            assert time.monotonic() < end, f"no chat turn answered after {service} came back\n" + stack.sup.tails(n=10)
            await asyncio.sleep(0.3)


async def _settle_and_check(stack: LocalStack, task_ids: list[str], traffic: Traffic, heard: Announcements,
                            versions_before: int) -> None:
    # every confirmed task is applied: ours and the loop's
    loop_tasks = await wait_tasks_applied(stack, task_ids)
    assert loop_tasks, "the feedback loop made no task from the thumbs up during the faults"
    await asyncio.sleep(2.0)  # a second application would show up now
    acc = delta_accounts(stack)
    ms, applied_deltas, applied_tasks = acc["manifests"], acc["applied_deltas"], acc["applied_tasks"]
    assert [m["version"] for m in ms] == list(range(len(ms))), "versions are contiguous"
    assert all(m["parent"] == m["version"] - 1 for m in ms[1:])
    assert len(applied_deltas) == len(set(applied_deltas)), "a delta was applied twice"
    assert len(applied_tasks) == len(set(applied_tasks)), "a task was applied twice"
    # every delta a worker published (confirmed) was applied or rejected with its reason
    lost = acc["published"] - set(applied_deltas) - set(acc["rejected"])
    assert not lost, f"deltas neither applied nor rejected: {lost}"
    assert set(acc["rejected"].values()) <= {"duplicate", "stale"}, acc["rejected"]
    # versions only go up
    assert heard.heard == sorted(heard.heard), heard.heard
    answered = [v for _t, v in traffic.finals if v is not None]
    assert answered == sorted(answered), "a chat turn was answered by an older version after a newer one"
    assert ms[-1]["version"] > versions_before
    # every turn that did not complete ended with a retryable error
    assert all(e.get("retryable") for e in traffic.errors), [e for e in traffic.errors if not e.get("retryable")]


async def _fault_run(stack: LocalStack, *, cycles: int, cuts: int, tasks: int, steps: int) -> None:
    await stack.wait_gateway_ready()
    heard = Announcements(stack)
    await heard.start()
    traffic = Traffic(stack)
    runner = asyncio.create_task(traffic.run())
    try:
        versions_before = stack.version()
        end = time.monotonic() + 120
        while not traffic.finals:
            assert time.monotonic() < end, "no chat turn answered\n" + stack.sup.tails(n=10)
            await asyncio.sleep(0.3)
        task_ids = await publish_tasks(stack, tasks, steps)
        for cycle in range(cycles):
            for kind in KINDS:
                await _kill(stack, kind, traffic, mid_task=(kind == "worker"), replica=cycle)
            for _ in range(cuts):
                t = time.monotonic()
                assert stack.cut_connections() >= 5
                await asyncio.sleep(1.0)
                await _recovered(stack, list(stack.sup.procs))
                end = time.monotonic() + 120
                while traffic.finals_since(t) < 1:
                    assert time.monotonic() < end, "no chat turn after the connection cut\n" + stack.sup.tails(n=10)
                    await asyncio.sleep(0.3)
            if cycle + 1 < cycles:
                task_ids += await publish_tasks(stack, tasks, steps)
        # the chat works at the end
        t = time.monotonic()
        end = time.monotonic() + 60
        while traffic.finals_since(t) < 2:
            assert time.monotonic() < end, "the chat did not recover\n" + stack.sup.tails(n=10)
            await asyncio.sleep(0.3)
        traffic.stop.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(runner, 60)
        await _settle_and_check(stack, task_ids, traffic, heard, versions_before)
        kills = {p.name: p.starts - 1 for p in stack.sup.procs.values() if p.spec.kind == "process"}
        print(f"turns {traffic.turns}, answered {len(traffic.finals)}, retryable errors {len(traffic.errors)}, "
              f"dropped sockets {traffic.drops}, restarts {kills}, versions {stack.version()}")
    finally:
        traffic.stop.set()
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
        await heard.close()


@pytest.mark.timeout(900)
async def test_every_service_recovers_from_kill9_and_connection_cuts(request, model_dir):
    stack = shared_stack(request, model_dir)
    await _fault_run(stack, cycles=1, cuts=1, tasks=2, steps=20)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_faults_long_form(request, model_dir):
    """By hand: ``pytest -m slow tests/test_faults.py`` (two of each scaled service, three cycles)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long fault suite runs by hand: pytest -m slow tests/test_faults.py")
    stack = LocalStack(model_dir, replicas={"infer": 2, "worker": 2}, INFER_REPLICAS=2, WORKER_REPLICAS=2)
    try:
        await asyncio.to_thread(stack.start)
        await _fault_run(stack, cycles=3, cuts=2, tasks=4, steps=30)
    finally:
        await asyncio.to_thread(stack.stop)
