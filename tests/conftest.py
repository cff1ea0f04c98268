"""Shared fixtures.

- ``namespace``: a fresh broker namespace per test; its queues and exchanges are deleted after.
- ``bus_settings`` / ``bus``: settings and a connected :class:`npcbus.bus.Bus` on that namespace.
- ``model_dir``: the offline default model, built once and cached under ``.npcbus/test-model``.

``--reverse-order`` runs the tests in reverse; pytest-random-order's ``--random-order-seed=N``
shuffles them (README, "Tests").
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def broker_up(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (to look for tests that depend on their order)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()
    if broker_up():
        return
    skip = pytest.mark.skip(reason="RabbitMQ is not reachable at 127.0.0.1:5672 (start it: rabbitmq-server -detached)")
    for item in items:
        if "broker" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus_settings(namespace):
    from npcbus.settings import BusSettings

    return BusSettings.from_env({"AMQP_URL": AMQP_URL, "NPCBUS_NAMESPACE": namespace})


async def read_queue(url: str, queue: str, n: int, timeout: float = 15.0) -> list:
    """Take up to ``n`` messages from ``queue`` (raw aio-pika messages), waiting up to ``timeout``."""
    import aio_pika

    conn = await aio_pika.connect(url)
    out = []
    try:
        q = await (await conn.channel()).get_queue(queue, ensure=False)
        end = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < end:
            m = await q.get(no_ack=True, fail=False)
            if m is None:
                await asyncio.sleep(0.05)
                continue
            out.append(m)
    finally:
        await conn.close()
    return out


async def delete_namespace(settings, extra_queues=()):
    """Delete every queue and exchange of a namespace (best effort)."""
    import aio_pika

    from npcbus.topology import Topology

    topo = Topology(settings.namespace)
    names = [q.name for q in topo.shared_queues()] + list(extra_queues)
    try:
        out = await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True, text=True, timeout=30)
        names += [n.strip() for n in out.stdout.splitlines() if n.strip().startswith(settings.namespace + ".")]
    except Exception:  # noqa: BLE001
        pass
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        for n in dict.fromkeys(names):
            ch = await conn.channel()
            try:
                await ch.queue_delete(n)
            except Exception:  # noqa: BLE001
                pass
            if not ch.is_closed:
                await ch.close()
        for ex in topo.exchanges():
            ch = await conn.channel()
            try:
                await ch.exchange_delete(ex.name)
            except Exception:  # noqa: BLE001
                pass
            if not ch.is_closed:
                await ch.close()
    finally:
        await conn.close()


@pytest.fixture
async def bus(bus_settings):
    from npcbus.bus import Bus

    b = Bus(bus_settings, name="test", chunk_timeout_s=120)
    await b.connect()
    await b.declare_topology()
    try:
        yield b
    finally:
        await b.close()
        await delete_namespace(bus_settings)


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The offline default model, built once (cached across runs under .npcbus/test-model, or
    ``$NPCBUS_TEST_MODEL_DIR``); ``scripts/test.sh`` builds it before the tests start."""
    from npcbus.model import ensure_test_model

    return str(ensure_test_model())


@pytest.fixture(scope="session")
def cluster():
    """The local three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh), started on first use and
    stopped at the end of the session (kept with NPCBUS_KEEP_CLUSTER=1)."""
    from . import cluster_util

    why = cluster_util.unavailable()
    if why:
        pytest.skip(why)
    c = cluster_util.Cluster.start()
    try:
        yield c
    finally:
        if os.environ.get("NPCBUS_KEEP_CLUSTER") != "1":
            c.stop()

