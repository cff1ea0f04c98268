"""The local three-node RabbitMQ cluster of ``scripts/rabbitmq-cluster.sh``, driven from tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
PORT_BASE = int(os.environ.get("CLUSTER_PORT_BASE", "5680"))


def unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.environ.get("NPCBUS_TEST_CLUSTER", "1") == "0":
        return "NPCBUS_TEST_CLUSTER=0"
    if not shutil.which("rabbitmq-server") and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        return "rabbitmq-server is not installed (the cluster tests start three local nodes of it)"
    return None


def node_name(n: int) -> str:
    return f"npc{n}@localhost"


def port(n: int) -> int:
    return PORT_BASE + n


def node_of_url(url: str) -> int:
    """Which node (1-3) a masked or plain URL points at."""
    for n in NODES:
        if f":{port(n)}/" in url or url.endswith(f":{port(n)}"):
            return n
    raise ValueError(f"{url!r} is not a node of the local cluster")


def _run(*args: str, timeout: float = 300) -> str:
    out = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def ctl(*args: str, node: int = 1, timeout: float = 60) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "-n", node_name(node), *args], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {node_name(node)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


@dataclass
class Cluster:
    urls: list[str]

    @classmethod
    def start(cls) -> Cluster:
        _run("start")
        return cls([u for u in _run("urls").strip().split(",") if u])

    def stop(self) -> None:
        _run("stop")

    def kill(self, n: int) -> float:
        """kill -9 node ``n``; returns the time (monotonic) of the kill."""
        _run("kill", str(n))
        return time.monotonic()

    def restart(self, n: int) -> None:
        _run("restart", str(n))

    def running(self) -> list[str]:
        for n in NODES:
            try:
                out = json.loads(ctl("eval", "rabbit_nodes:all_running().", "--formatter", "json", node=n))
                return sorted(out["value"] if isinstance(out, dict) else out)
            except (RuntimeError, ValueError):
                continue
        return []

    def url_list(self, user: str = "guest", password: str = "guest", vhost: str = "", rotate: int = 0) -> str:
        """AMQP_URL for a cluster client: every node, starting at node ``rotate % 3 + 1``."""
        urls = [f"amqp://{user}:{password}@127.0.0.1:{port(n)}/{vhost}" for n in NODES]
        k = rotate % len(urls)
        return ",".join(urls[k:] + urls[:k])

    def queues(self, vhost: str = "/") -> dict[str, dict]:
        """name -> {type, members, leader} of every queue of ``vhost`` (asked of a running node)."""
        for n in NODES:
            try:
                rows = json.loads(ctl("list_queues", "-p", vhost, "name", "type", "members", "leader",
                                      "--formatter", "json", node=n))
            except (RuntimeError, ValueError):
                continue
            return {r["name"]: r for r in rows}
        raise RuntimeError("no node of the cluster answers")
