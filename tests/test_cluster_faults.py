"""The whole system on the three-node RabbitMQ cluster, under traffic, while broker nodes die.

Every service of compose.yaml runs as its own local process (as ``npcbus run`` runs them), each
with the AMQP_URL list of the three nodes, starting at a different node so that the services'
connections are spread over the cluster; the generation queue is a quorum queue. While WebSocket
sessions play turns (with a thumbs up now and then, which the feedback loop turns into training
tasks) and training tasks are published, one node is killed with ``kill -9``, started again,
then another one.

Reported (one JSON line per figure, and asserted where the issue sets a goal): turns completed,
turns that failed with a retryable error, turns lost (no answer or a non-retryable error; goal 0),
deltas acknowledged by the broker and lost (goal 0) or applied twice (goal 0), whether versions only
went up, and for each kill the time until every service that lost its connection was connected
and consuming again.

    pytest -s tests/test_cluster_faults.py           # the figures in docs/benchmarks.md

``CLUSTER_FAULTS_ROTATE=1`` (or 2) shifts which node each service starts at, so that other services
share the killed nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import pytest

from . import cluster_util
from .broker_roles import new_roles
from .stack_util import ADAPTER, TOKEN, Announcements, LocalStack, delta_accounts, publish_tasks, wait_tasks_applied

pytestmark = [pytest.mark.broker]


class ClusterStack(LocalStack):
    """The local stack with every service on the cluster: AMQP_URL lists the three nodes, starting
    at node 1, 2, 3, 1, ... process by process."""

    def __init__(self, model_dir: str, cluster: cluster_util.Cluster, **variables):
        roles = new_roles(port=cluster_util.port(1), more_ports=(cluster_util.port(2), cluster_util.port(3)))
        super().__init__(model_dir, roles=roles, GEN_QUEUE_TYPE="quorum", **variables)
        single = f"@127.0.0.1:{cluster_util.port(1)}/"
        i = 0
        for spec in self.plan:
            url = spec.env.get("AMQP_URL", "")
            if single in url and "," not in url:
                i += 1
                k = (i + int(os.environ.get("CLUSTER_FAULTS_ROTATE", "0"))) % 3
                urls = [url.replace(single, f"@127.0.0.1:{cluster_util.port(n)}/") for n in cluster_util.NODES]
                spec.env["AMQP_URL"] = ",".join(urls[k:] + urls[:k])

    def connections(self):
        raise NotImplementedError("ask the cluster's nodes instead")


@dataclass
class Turns:
    """WebSocket sessions playing turns; each turn's outcome is recorded."""

    stack: LocalStack
    sessions: int = 2
    outcomes: list[tuple[float, str, dict]] = field(default_factory=list)  # (time, outcome, terminal event)
    versions: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, answered, adapter version)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    turn_timeout_s: float = 60.0

    def count(self, outcome: str) -> int:
        return sum(1 for _t, o, _e in self.outcomes if o == outcome)

    def completed_since(self, t: float) -> int:
        return sum(1 for at, o, _e in self.outcomes if o == "completed" and at > t)

    async def run(self) -> None:
        await asyncio.gather(*(self.player(i) for i in range(self.sessions)))

    async def player(self, k: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                try:
                    ws = await http.ws_connect(f"{self.stack.base_url}/v1/ws",
                                               headers={"Authorization": f"Bearer {TOKEN}"}, heartbeat=10)
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await ws.send_json({"type": "session.start", "persona_id": "innkeeper",
                                        "player": {"id": f"p-{k}", "name": "Ayla"}, "audience": "general",
                                        "adapter": ADAPTER, "generation": {"max_new_tokens": 48, "temperature": 0.0}})
                    ev = await _next(ws, 30)
                    if ev.get("type") != "session.started":
                        self.outcomes.append((time.monotonic(), "retryable" if ev.get("retryable") else "failed", ev))
                        await asyncio.sleep(1)
                        continue
                    while not self.stop.is_set():
                        n += 1
                        tid = f"c{k}-{n}"
                        sent = time.monotonic()
                        await ws.send_json({"type": "turn", "turn_id": tid,
                                            "text": random.choice(["Any rooms free tonight?", "What is for supper?",
                                                                   "Heard any rumours?"])})
                        outcome, ev = await self._await_turn(ws, tid)
                        self.outcomes.append((time.monotonic(), outcome, ev))
                        if outcome == "completed":
                            if ev.get("adapter_version") is not None:
                                self.versions.append((sent, time.monotonic(), ev["adapter_version"]))
                            if n % 3 == 0:
                                await ws.send_json({"type": "turn.feedback", "turn_id": tid, "thumbs": "up"})
                        elif outcome == "retryable":
                            await asyncio.sleep(min(2.0, (ev.get("retry_after_ms") or 500) / 1000))
                        else:
                            break  # a lost or failed turn: start a new socket
                finally:
                    with contextlib.suppress(Exception):
                        await ws.close()

    async def _await_turn(self, ws, tid: str) -> tuple[str, dict]:
        end = time.monotonic() + self.turn_timeout_s
        while True:
            try:
                ev = await _next(ws, max(0.1, end - time.monotonic()))
            except (TimeoutError, ConnectionError) as e:
                return "lost", {"error": f"{type(e).__name__}: {e}"}
            if ev.get("turn_id") != tid and ev.get("type") != "error":
                continue
            if ev["type"] == "turn.final":
                return "completed", ev
            if ev["type"] in ("turn.error", "error"):
                return ("retryable" if ev.get("retryable") else "failed"), ev


async def _next(ws, timeout: float) -> dict:
    msg = await ws.receive(timeout=timeout)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise ConnectionError(f"socket closed ({msg.type!r}, code {ws.close_code})")
    return json.loads(msg.data)


def _ts(e: dict) -> float:
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


async def _wait_all_reconnected(stack: LocalStack, killed_at: float, timeout: float = 120.0) -> tuple[float, int]:
    """Until every (process, bus) that lost its connection after ``killed_at`` (unix time) has
    reconnected; returns (seconds from the kill to the last reconnection, buses that reconnected)."""
    end = time.monotonic() + timeout
    while True:
        lost, back = {}, {}
        for name in stack.sup.procs:
            for e in stack.events(name, "bus connection lost; reconnecting"):
                if _ts(e) >= killed_at - 0.5:
                    lost.setdefault((name, e.get("client")), _ts(e))
            for e in stack.events(name, "bus reconnected"):
                if _ts(e) >= killed_at - 0.5:
                    back[(name, e.get("client"))] = _ts(e)
        missing = set(lost) - set(back)
        if lost and not missing:
            return max(back[k] for k in lost) - killed_at, len(lost)
        if time.monotonic() > end:
            raise AssertionError(f"not reconnected after {timeout:.0f} s: {sorted(missing)} (lost: {sorted(lost)})\n"
                                 + stack.sup.tails(n=15))
        await asyncio.sleep(0.5)


def _answered_in_order(versions: list[tuple[float, float, int]]) -> list[tuple]:
    """Turns answered by an older adapter version than a turn that had finished before they were
    sent (turns that overlap in time may finish in either order, and are not compared)."""
    out = []
    done = sorted(versions, key=lambda x: x[1])
    for sent, _end, v in versions:
        before = [w for _s, end, w in done if end < sent]
        if before and v < max(before):
            out.append((sent, v, max(before)))
    return out


def _node_of(stack: LocalStack, service: str) -> int:
    """The cluster node a service's (first) process is connected to now, from its logs."""
    proc = stack.sup.of(service)[0]
    events = [e for ev in ("bus connected", "bus reconnected") for e in stack.events(proc.name, ev)]
    latest = max(events, key=_ts)
    return cluster_util.node_of_url(latest["broker"])


def _emit(name: str, value, goal: str, met: bool | None) -> None:
    print(json.dumps({"bench": f"cluster_faults.{name}", "value": value, "baseline": None, "ratio": None,
                      "goal": goal, "met": met}))


@pytest.mark.timeout(1200)
async def test_kill9_of_broker_nodes_under_traffic_loses_nothing(cluster, model_dir, monkeypatch):
    # rabbitmqctl (definitions import, users removal) talks to the cluster's first node
    monkeypatch.setenv("RABBITMQ_NODENAME", cluster_util.node_name(1))
    stack = ClusterStack(model_dir, cluster, AMQP_HEARTBEAT_S="10")
    turns = Turns(stack, sessions=3)
    heard = Announcements(stack, rotate=1)
    runner = None
    try:
        await asyncio.to_thread(stack.start)
        await stack.wait_gateway_ready(timeout=180)
        await heard.start()
        runner = asyncio.create_task(turns.run())
        end = time.monotonic() + 120
        while turns.count("completed") < 2:
            assert time.monotonic() < end, "no turn answered on the cluster\n" + stack.sup.tails(n=15)
            await asyncio.sleep(0.3)
        versions_before = stack.version()
        task_ids = await publish_tasks(stack, 3, 2, rotate=2)
        recoveries = []
        first = None
        for _ in range(2):
            await asyncio.sleep(4)  # traffic and training in flight
            # the node of the gateway first, then (after it is back) that of the inference consumer,
            # or of another service where they share it: the kills hit the turns' path both times
            victim = next(n for n in (_node_of(stack, "gateway"), _node_of(stack, "infer"),
                                      _node_of(stack, "aggregator"), 1, 2) if n != first)
            first = victim
            killed_at = time.time()
            await asyncio.to_thread(cluster.kill, victim)
            seconds, buses = await _wait_all_reconnected(stack, killed_at)
            t = time.monotonic()
            end = t + 120
            while turns.completed_since(t) < 1:
                assert time.monotonic() < end, f"no turn answered after node {victim} died\n" + stack.sup.tails(n=15)
                await asyncio.sleep(0.2)
            recoveries.append({"node": victim, "buses_reconnected": buses, "all_back_s": round(seconds, 2),
                               "first_turn_after_kill_s": round(time.time() - killed_at, 2)})
            await asyncio.to_thread(cluster.restart, victim)
            task_ids += await publish_tasks(stack, 2, 2, rotate=2)
        # traffic on the healed cluster, then stop it
        t = time.monotonic()
        end = t + 60
        while turns.completed_since(t) < 2:
            assert time.monotonic() < end, "the chat did not carry on after the nodes came back\n" + stack.sup.tails(n=15)
            await asyncio.sleep(0.3)
        turns.stop.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(runner, 90)

        # every confirmed task (ours and the feedback loop's) is applied, exactly once
        await wait_tasks_applied(stack, task_ids)
        await asyncio.sleep(2.0)  # a second application would show up now
        acc = delta_accounts(stack)
        ms, applied_deltas, applied_tasks = acc["manifests"], acc["applied_deltas"], acc["applied_tasks"]
        published, rejected = acc["published"], acc["rejected"]
        lost_deltas = published - set(applied_deltas) - set(rejected)
        twice = len(applied_deltas) - len(set(applied_deltas)) + len(applied_tasks) - len(set(applied_tasks))
        contiguous = [m["version"] for m in ms] == list(range(len(ms)))
        older = _answered_in_order(turns.versions)
        monotonic = contiguous and heard.heard == sorted(heard.heard) and not older

        completed, retryable = turns.count("completed"), turns.count("retryable")
        lost_turns = turns.count("lost") + turns.count("failed")
        _emit("turns_completed", completed, "report", None)
        _emit("turns_failed_retryable", retryable, "report", None)
        _emit("turns_lost", lost_turns, "0", lost_turns == 0)
        _emit("deltas_acknowledged", len(published), "report", None)
        _emit("deltas_lost", len(lost_deltas), "0", not lost_deltas)
        _emit("deltas_applied_twice", twice, "0", twice == 0)
        _emit("versions_monotonic", monotonic, "true", monotonic)
        _emit("versions_made", ms[-1]["version"] - max(versions_before, 0), "report", None)
        for r in recoveries:
            _emit(f"node{r['node']}_all_consumers_back_s", r["all_back_s"], "report", None)
            _emit(f"node{r['node']}_first_turn_after_kill_s", r["first_turn_after_kill_s"], "report", None)
        print("recoveries:", recoveries)
        print("errors:", [e for _t, o, e in turns.outcomes if o != "completed"][:10])

        assert lost_turns == 0, [e for _t, o, e in turns.outcomes if o in ("lost", "failed")]
        assert not lost_deltas, f"deltas acknowledged but neither applied nor rejected: {lost_deltas}"
        assert set(rejected.values()) <= {"duplicate", "stale"}, rejected
        assert twice == 0
        assert contiguous, [m["version"] for m in ms]
        assert heard.heard == sorted(heard.heard), heard.heard
        assert not older, f"turns answered by an older version than an earlier turn's: {older}"
        assert turns.versions and max(v for *_x, v in turns.versions) > 0, "no turn was answered by a new version"
        assert ms[-1]["version"] > versions_before
        assert all(r["buses_reconnected"] >= 1 for r in recoveries)
    finally:
        turns.stop.set()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
        await heard.close()
        stack.stop()
        for n in cluster_util.NODES:  # leave the cluster whole for whoever comes next
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.restart, n)
