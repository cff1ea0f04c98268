"""The playground in a real browser: headless Chromium (Debian's ``chromium`` package) loads the page,
enters the API token, picks a persona, sends a message and sees the reply stream in.

The gateway runs in this process on the real broker, with a real inference consumer running the
benchmark's instant engine (the model is not what this test is about). Chromium is driven over
the Chrome DevTools protocol with aiohttp's WebSocket client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp
import pytest

from npcbus.bus import Bus
from npcbus.settings import BusSettings
from npcbus.topology import Topology

from .conftest import AMQP_URL, ROOT
from .gateway_util import TOKEN, cleanup_namespace, gateway_settings, running_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.broker,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium)"),
]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*"]


class Chromium:
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="npcbus-chromium-")
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if "DevTools listening on " in line:
                self.endpoint = line.split("DevTools listening on ", 1)[1].strip()
                return
        raise RuntimeError("chromium did not open its DevTools endpoint")

    @property
    def http_base(self) -> str:
        host = self.endpoint.split("//", 1)[1].split("/", 1)[0]
        return f"http://{host}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """Just enough of the DevTools protocol: send a command, evaluate JavaScript, wait for a condition."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)
        self.console: list[str] = []

    async def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        mid = next(self.ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))
        end = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.1, end - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection ended: {msg.type!r}")
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in data["params"]["args"]))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def js(self, expression: str):
        res = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"javascript failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression!r}; console: {self.console[-10:]}")


@pytest.fixture
async def instant_consumer(model_dir):
    """A namespace with one real inference consumer running the instant engine."""
    ns = f"test-browser-{uuid.uuid4().hex[:8]}"
    settings = BusSettings.from_env({"AMQP_URL": AMQP_URL, "NPCBUS_NAMESPACE": ns})
    env = dict(os.environ, AMQP_URL=AMQP_URL, NPCBUS_NAMESPACE=ns, ENGINE="bench.instant_engine:InstantEngine",
               MODEL_DIR=model_dir, BASE_MODEL="", HEARTBEAT_INTERVAL_S="1", LOG_LEVEL="warning", METRICS_PORT="0")
    proc = subprocess.Popen([sys.executable, "-m", "npcbus.cli", "worker", "infer"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield settings
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        await cleanup_namespace(settings, [Topology(ns).dead_queue.name])


async def test_playground_chat_streams_in_chromium(instant_consumer):
    bus = Bus(instant_consumer, name="browser-gateway")
    await bus.connect()
    browser = Chromium()
    try:
        async with running_gateway(bus, gateway_settings()) as client:
            for _ in range(150):  # the consumer is up when it sends a heartbeat
                health = await (await client.get("/health")).json()
                if health["consumers"]["live"]:
                    break
                await asyncio.sleep(0.2)
            assert health["consumers"]["live"], health
            page_html = await (await client.get("/")).text()
            assert TOKEN not in page_html and "npcbus playground" in page_html
            url = str(client.make_url("/"))
            await asyncio.to_thread(browser.start)
            async with aiohttp.ClientSession() as http:
                targets = await (await http.get(f"{browser.http_base}/json/list")).json()
                page_target = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.send("Runtime.enable")
                    await page.send("Page.enable")
                    await page.send("Page.navigate", {"url": url})
                    await page.wait_for("document.readyState === 'complete' && !!document.getElementById('token')")
                    # the page asks for the token; it is never part of the page itself
                    assert await page.js("document.getElementById('token').value") == ""
                    await page.js(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                                  "document.getElementById('load').click(); true")
                    await page.wait_for("[...document.querySelectorAll('#persona option')]"
                                        ".some(o => o.value === 'innkeeper')")
                    assert await page.js("localStorage.getItem('npcbus.playground.token')") == TOKEN
                    await page.js("document.getElementById('persona').value = 'innkeeper';"
                                  "document.getElementById('player-name').value = 'Ayla';"
                                  "document.getElementById('connect').click(); true")
                    await page.wait_for("document.getElementById('status').dataset.state === 'connected'")
                    await page.js("document.getElementById('message').value = 'Good evening! A room, please?';"
                                  "document.getElementById('send').click(); true")
                    await page.wait_for("document.body.dataset.finals === '1'")
                    deltas = int(await page.js("document.body.dataset.deltas"))
                    assert deltas >= 1, "no token delta reached the page"
                    npc_line = await page.js("(() => { const b = document.querySelector('.line.npc');"
                                             " return {state: b.dataset.state, deltas: b.dataset.deltas,"
                                             " text: b.firstChild.textContent}; })()")
                    assert npc_line["state"] == "final" and int(npc_line["deltas"]) == deltas
                    assert npc_line["text"]
                    shown = json.loads(await page.js("document.getElementById('final-json').textContent"))
                    assert shown["dialogue"] == npc_line["text"] and "emotion" in shown
                    timings = json.loads(await page.js("document.getElementById('timings').textContent"))
                    assert timings["total_ms"] > 0 and "adapter" in timings
                    assert not [c for c in page.console if c.startswith("exception")], page.console
    finally:
        browser.stop()
        await bus.close()
