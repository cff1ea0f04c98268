"""End-to-end checks of the system running in containers (``scripts/compose-test.sh`` starts it).

Every check talks to the containers only from outside, as a user would: the gateway's published
port (health, a WebSocket NPC turn, the OpenAI client, ``POST /generate``), Prometheus's published
port (its scrape targets), ``docker compose exec`` (``npcbus task publish`` in the aggregator's
container, each consumer's own /metrics) and ``docker compose`` itself (scale, restart).

    python scripts/compose_check.py --compose "docker compose -p npcbus-ci --env-file FILE" \\
        --gateway http://127.0.0.1:18080 --prometheus http://127.0.0.1:19090 --token TOKEN

Each check prints one line as it passes, a failed one stops the run with exit code 1 and says what
it saw; the figures (times, restart counts) end the run as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import subprocess
import sys
import time

import aiohttp

JOBS = ("rabbitmq", "gateway", "aggregator", "loop", "infer", "worker", "prometheus")
SCRAPE_TIMEOUT_S = 120.0


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stack:
    def __init__(self, compose: str, gateway: str, prometheus: str, token: str):
        self.compose_cmd = shlex.split(compose)
        self.gateway = gateway.rstrip("/")
        self.prometheus = prometheus.rstrip("/")
        self.token = token
        self.auth = {"Authorization": f"Bearer {token}"}
        self.figures: list[dict] = []

    # docker ---------------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        p = subprocess.run([*self.compose_cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise CheckFailed(f"`{' '.join(args)}` failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        return p.stdout

    def container_ids(self, service: str) -> list[str]:
        return [c for c in self.compose("ps", "-q", service).split() if c]

    def restart_counts(self) -> dict[str, int]:
        ids = [c for c in self.compose("ps", "-q").split() if c]
        if not ids:
            return {}
        out = subprocess.run(["docker", "inspect", "--format", "{{.Name}} {{.RestartCount}} {{.State.Status}}", *ids],
                             capture_output=True, text=True, check=True).stdout
        counts = {}
        for line in out.splitlines():
            name, count, status = line.split()
            counts[name.lstrip("/")] = int(count) if status == "running" else -1
        return counts

    def container_metric(self, cid: str, name: str, **labels: str) -> float:
        """The sum of one metric's samples (matching ``labels``) read from a container's own /metrics."""
        code = ("import os, urllib.request; print(urllib.request.urlopen("
                "'http://127.0.0.1:%s/metrics' % os.environ.get('METRICS_PORT', '9100'), timeout=10).read().decode())")
        p = subprocess.run(["docker", "exec", cid, "python", "-c", code], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise CheckFailed(f"metrics of container {cid[:12]} unreadable: {p.stderr[-500:]}")
        total = 0.0
        for line in p.stdout.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if not m:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def metric_by_container(self, cids: list[str], name: str) -> dict[str, float]:
        return {c: self.container_metric(c, name) for c in cids}

    def each_took_part(self, cids: list[str], name: str, before: dict[str, float], what: str) -> dict[str, int]:
        """How much ``name`` grew in each container since ``before``; fails unless it grew in every one."""
        grown = {c[:12]: int(v - before[c]) for c, v in self.metric_by_container(cids, name).items()}
        if not all(v > 0 for v in grown.values()):
            raise CheckFailed(f"not every container took part: {what} per container {grown}")
        return grown

    # HTTP -----------------------------------------------------------------------------------
    async def get_json(self, http: aiohttp.ClientSession, url: str, auth: bool = True) -> tuple[int, dict]:
        async with http.get(url, headers=self.auth if auth else {}) as r:
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, {}

    async def models(self, http) -> dict[str, dict]:
        _, body = await self.get_json(http, f"{self.gateway}/v1/models")
        return {m["id"]: m for m in body.get("data", [])}

    async def wait_ready(self, http, timeout: float) -> dict:
        """Until /health is ok; by then every shipped persona's adapter must be served (a version known):
        a game client that starts as soon as the system is healthy gets the persona adapters."""
        end = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                status, health = await self.get_json(http, f"{self.gateway}/health", auth=False)
                _, personas = await self.get_json(http, f"{self.gateway}/v1/personas")
                models = await self.models(http)
                want = [(p["id"], p.get("adapter")) for p in personas.get("data", [])]
                missing = [pid for pid, a in want if a is None or models.get(a, {}).get("version") is None]
                last = {"health": health.get("status"), "missing_adapters": missing}
                if status == 200 and health.get("status") == "ok":
                    if want and not missing:
                        return health
                    raise CheckFailed(f"/health is ok but personas lack a served adapter: {missing or 'no personas'}")
            except (TimeoutError, aiohttp.ClientError, KeyError) as e:
                last = repr(e)
            if time.monotonic() > end:
                raise CheckFailed(f"the gateway is not ready after {timeout:.0f} s: {last}")
            await asyncio.sleep(2)

    async def ws_turn(self, http, text: str, *, persona_id: str = "innkeeper", adapter: str | None = None,
                      timeout: float = 120) -> tuple[dict, dict]:
        """One WebSocket session with one turn: (session.started, terminal event of the turn)."""
        async with http.ws_connect(f"{self.gateway}/v1/ws", headers=self.auth, heartbeat=20) as ws:
            start = {"type": "session.start", "persona_id": persona_id, "player": {"id": "p-compose", "name": "Ayla"},
                     "audience": "general", "generation": {"max_new_tokens": 96}}
            if adapter:
                start["adapter"] = adapter
            await ws.send_json(start)
            started = await self._expect(ws, {"session.started"}, timeout=30)
            await ws.send_json({"type": "turn", "turn_id": "t-1", "text": text})
            final = await self._expect(ws, {"turn.final", "turn.error", "turn.cancelled"}, timeout=timeout)
            return started, final

    @staticmethod
    async def _expect(ws, types: set[str], timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"no {sorted(types)} within {timeout:.0f} s")
            msg = await ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise CheckFailed(f"the WebSocket closed: {msg.type} {msg.data} {msg.extra}")
            ev = json.loads(msg.data)
            if ev.get("type") in types:
                return ev
            if ev.get("type") == "error":
                raise CheckFailed(f"error event: {ev}")

    async def generate_batch(self, http, n: int) -> list[dict]:
        body = {"requests": [{"persona_id": "innkeeper", "player_input": f"Traveller {i} asks: is there a room free?"}
                             for i in range(n)]}
        async with http.post(f"{self.gateway}/generate", json=body, headers=self.auth) as r:
            out = await r.json(content_type=None)
            if r.status != 200:
                raise CheckFailed(f"POST /generate answered {r.status}: {out}")
        return out.get("responses", out.get("results", []))

    async def targets(self, http) -> dict[str, list[dict]]:
        _, body = await self.get_json(http, f"{self.prometheus}/api/v1/targets", auth=False)
        jobs: dict[str, list[dict]] = {}
        for t in body.get("data", {}).get("activeTargets", []):
            jobs.setdefault(t["labels"]["job"], []).append(t)
        return jobs

    async def wait_targets_up(self, http, want: dict[str, int], timeout: float = SCRAPE_TIMEOUT_S) -> dict:
        """Until Prometheus scrapes every job, each with at least ``want[job]`` targets, all up."""
        end = time.monotonic() + timeout
        while True:
            jobs = await self.targets(http)
            state = {j: [t["health"] for t in jobs.get(j, [])] for j in want}
            if all(len(s) >= want[j] and all(h == "up" for h in s) for j, s in state.items()):
                return state
            if time.monotonic() > end:
                errors = {j: [t.get("lastError") for t in jobs.get(j, []) if t["health"] != "up"] for j in want}
                raise CheckFailed(f"Prometheus targets not all up after {timeout:.0f} s: {state}; errors {errors}")
            await asyncio.sleep(3)

    async def publish_tasks(self, n: int, steps: int) -> list[str]:
        out = self.compose("exec", "-T", "aggregator", "npcbus", "task", "publish", "--adapter", "npc",
                           "--data", "npc_dialogue.jsonl", "--num-tasks", str(n), "--steps", str(steps),
                           "--hp", "batch_size=2", "--hp", "lr=5e-3")
        return [json.loads(line)["task_id"] for line in out.splitlines() if line.startswith("{")]

    async def wait_served_version(self, http, above: int, timeout: float) -> tuple[int, float]:
        """Until a turn on the `npc` adapter is answered by a version above ``above``."""
        t0 = time.monotonic()
        end = t0 + timeout
        while True:
            models = await self.models(http)
            announced = models.get("npc", {}).get("version")
            if announced is not None and announced > above:
                _, final = await self.ws_turn(http, "Good evening. Is there a room free tonight?", adapter="npc")
                if final["type"] == "turn.final" and (final.get("adapter_version") or 0) > above:
                    return final["adapter_version"], time.monotonic() - t0
            if time.monotonic() > end:
                raise CheckFailed(f"no version of `npc` above {above} served within {timeout:.0f} s "
                                  f"(gateway lists {announced})")
            await asyncio.sleep(3)

    def figure(self, name: str, value, **extra) -> None:
        self.figures.append({"bench": f"compose.{name}", "value": value, **extra})


# the checks -----------------------------------------------------------------------------------

async def check_basics(stack: Stack, http) -> None:
    t0 = time.monotonic()
    health = await stack.wait_ready(http, timeout=900)
    stack.figure("ready_s", round(time.monotonic() - t0, 1))
    log(f"ok: /health is ok, {health['consumers']['live']} inference consumer(s), every persona's adapter served")

    started, final = await stack.ws_turn(http, "Good evening! Do you have a room for the night?")
    if final["type"] != "turn.final":
        raise CheckFailed(f"the WebSocket turn ended in {final}")
    resp = final["response"]
    log(f"ok: WebSocket turn answered by {final['adapter']} v{final['adapter_version']} (session adapter "
        f"{started.get('adapter')}): {resp['dialogue']!r} [{resp.get('emotion')}, {resp.get('intent')}]")
    if not resp["dialogue"].strip():
        raise CheckFailed("the turn's dialogue is empty")

    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.token)
    done = await asyncio.to_thread(client.chat.completions.create, model="npc", max_tokens=40,
                                   messages=[{"role": "user", "content": "Hello there. Who are you?"}])
    text = done.choices[0].message.content or ""
    if not text.strip():
        raise CheckFailed(f"the chat completion is empty: {done}")
    log(f"ok: OpenAI client chat completion ({done.usage.completion_tokens} tokens): {text!r}")

    jobs = await stack.wait_targets_up(http, {j: 1 for j in JOBS})
    log(f"ok: Prometheus scrapes every service, all up: {jobs}")


async def check_training(stack: Stack, http, figure: str = "task_to_served_version_s") -> int:
    before = (await stack.models(http))["npc"]["version"]
    t0 = time.monotonic()
    tasks = await stack.publish_tasks(4, steps=4)
    log(f"published {len(tasks)} training tasks for `npc` (version {before}) with `npcbus task publish`")
    version, _ = await stack.wait_served_version(http, before, timeout=600)
    took = round(time.monotonic() - t0, 1)
    stack.figure(figure, took)
    log(f"ok: the tasks became version {version} of `npc`, which the inference container serves ({took} s)")
    return version


async def check_scaled(stack: Stack, http) -> None:
    stack.compose("up", "-d", "--no-build", "--scale", "infer=2", "--scale", "worker=2", "infer", "worker")
    infer, workers = stack.container_ids("infer"), stack.container_ids("worker")
    if len(infer) != 2 or len(workers) != 2:
        raise CheckFailed(f"after scaling: {len(infer)} inference and {len(workers)} training containers")
    await stack.wait_targets_up(http, {"infer": 2, "worker": 2}, timeout=600)
    end = time.monotonic() + 300
    while (await stack.get_json(http, f"{stack.gateway}/health", auth=False))[1]["consumers"]["live"] < 2:
        if time.monotonic() > end:
            raise CheckFailed("the gateway does not hear two inference consumers")
        await asyncio.sleep(2)
    log("scaled to 2 inference consumers and 2 training workers; Prometheus scrapes all four")

    before = stack.metric_by_container(infer, "npcbus_infer_requests_total")
    results = []
    for _ in range(3):
        results += await stack.generate_batch(http, 12)
    took = stack.each_took_part(infer, "npcbus_infer_requests_total", before, "generation requests")
    log(f"ok: both inference consumers took work: {took} of {len(results)} generations")
    stack.figure("infer_requests_per_consumer", took)

    wbefore = stack.metric_by_container(workers, "npcbus_worker_tasks_total")
    t0 = time.monotonic()
    version = (await stack.models(http))["npc"]["version"]
    await stack.publish_tasks(4, steps=8)
    await stack.wait_served_version(http, version, timeout=600)
    stack.figure("scaled_tasks_to_served_version_s", round(time.monotonic() - t0, 1))
    trained = stack.each_took_part(workers, "npcbus_worker_tasks_total", wbefore, "training tasks")
    log(f"ok: both training workers took tasks: {trained}")
    stack.figure("worker_tasks_per_worker", trained)


async def check_broker_restart(stack: Stack, http) -> None:
    counts_before = stack.restart_counts()
    t0 = time.monotonic()
    stack.compose("restart", "rabbitmq")
    log(f"`docker compose restart rabbitmq` took {time.monotonic() - t0:.1f} s")
    # the first turn that completes after the restart
    end = time.monotonic() + 600
    while True:
        try:
            _, final = await stack.ws_turn(http, "Are you still there, friend?", timeout=60)
            if final["type"] == "turn.final":
                break
        except (TimeoutError, aiohttp.ClientError, CheckFailed):
            pass
        if time.monotonic() > end:
            raise CheckFailed("no turn completes after the broker restart")
        await asyncio.sleep(2)
    first_turn = round(time.monotonic() - t0, 1)
    log(f"ok: a WebSocket turn completes {first_turn} s after the restart began")
    infer = stack.container_ids("infer")
    while (await stack.get_json(http, f"{stack.gateway}/health", auth=False))[1]["consumers"]["live"] < len(infer):
        if time.monotonic() > end:
            raise CheckFailed("the gateway does not hear every inference consumer after the broker restart")
        await asyncio.sleep(2)
    consumers_back = round(time.monotonic() - t0, 1)
    before = stack.metric_by_container(infer, "npcbus_infer_requests_total")
    await stack.generate_batch(http, 12)
    await stack.generate_batch(http, 12)
    took = stack.each_took_part(infer, "npcbus_infer_requests_total", before, "generation requests after the restart")
    log(f"ok: after the restart every inference consumer takes work again: {took}")
    version = await check_training(stack, http, figure="broker_restart_task_to_served_version_s")
    log(f"ok: training works after the restart (version {version})")
    await stack.wait_targets_up(http, {j: 1 for j in JOBS}, timeout=300)
    counts_after = stack.restart_counts()
    restarted = {n: counts_after.get(n, -1) - c for n, c in counts_before.items()
                 if counts_after.get(n, -1) != c and not n.endswith(("-init-1",))}
    down = [n for n, c in counts_after.items() if c < 0 and not n.split("-")[-2].endswith("init")]
    if down:
        raise CheckFailed(f"containers not running after the broker restart: {down}")
    log(f"ok: every service recovered unaided; containers Docker restarted on the way: {restarted or 'none'}")
    stack.figure("broker_restart_first_turn_s", first_turn)
    stack.figure("broker_restart_all_consumers_s", consumers_back)
    stack.figure("broker_restart_all_recovered_s", round(time.monotonic() - t0, 1))
    stack.figure("broker_restart_container_restarts", restarted)


async def main_async(args) -> int:
    stack = Stack(args.compose, args.gateway, args.prometheus, args.token)
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for name in args.checks.split(","):
                log(f"--- {name}")
                await {"basics": check_basics, "training": check_training, "scale": check_scaled,
                       "broker-restart": check_broker_restart}[name](stack, http)
    except CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        for f in stack.figures:
            print(json.dumps(f), flush=True)
    log("all checks passed")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compose", required=True, help="The docker compose command line, with -p and --env-file.")
    ap.add_argument("--gateway", required=True, help="The gateway's published address.")
    ap.add_argument("--prometheus", required=True, help="Prometheus's published address.")
    ap.add_argument("--token", required=True, help="The gateway's API token.")
    ap.add_argument("--checks", default="basics,training,scale,broker-restart",
                    help="Comma-separated checks to run, in order.")
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
