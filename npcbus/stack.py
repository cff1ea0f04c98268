"""`npcbus run`: the whole system as local processes, supervised.

Starts, in order: the offline default model build (when no BASE_MODEL is set), the aggregator,
the training workers, the inference consumers and the gateway, each as its own `npcbus ...`
process with the environment of this one. A process that exits is restarted with a backoff.
Ctrl-C (or SIGTERM) stops them all. This runs the same set of services as compose.yaml.

When REQUIRE_API_TOKEN is on (the default) and API_TOKEN is unset, a random token is generated
for this run and printed, so that the gateway never runs open by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

from npcbus.settings import Settings, env_field


@dataclass
class StackSettings(Settings):
    title: ClassVar[str] = "run"

    infer_workers: int = env_field("RUN_INFER_WORKERS", 1, "`npcbus run`: inference consumers to start.",
                                   check=lambda n: n >= 0, check_msg="must be >= 0")
    train_workers: int = env_field("RUN_TRAIN_WORKERS", 1, "`npcbus run`: training workers to start.",
                                   check=lambda n: n >= 0, check_msg="must be >= 0")
    with_aggregator: bool = env_field("RUN_AGGREGATOR", True, "`npcbus run`: start the aggregator.")
    with_gateway: bool = env_field("RUN_GATEWAY", True, "`npcbus run`: start the gateway.")


SERVICES = [
    # (name, argv after `npcbus`, wanted when)
    ("aggregator", ["aggregator"], lambda s: s.with_aggregator),
    ("train", ["worker", "train"], lambda s: s.train_workers > 0),
    ("infer", ["worker", "infer"], lambda s: s.infer_workers > 0),
    ("gateway", ["gateway"], lambda s: s.with_gateway),
]


def plan(settings: StackSettings) -> list[tuple[str, list[str]]]:
    """The processes `npcbus run` starts: (name, argv)."""
    out = []
    for name, argv, wanted in SERVICES:
        if not wanted(settings):
            continue
        count = {"train": settings.train_workers, "infer": settings.infer_workers}.get(name, 1)
        for i in range(count):
            out.append((f"{name}-{i}" if count > 1 else name, argv))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--infer-workers", type=int, help="inference consumers (RUN_INFER_WORKERS)")
    parser.add_argument("--train-workers", type=int, help="training workers (RUN_TRAIN_WORKERS)")
    parser.add_argument("--no-gateway", action="store_true", help="do not start the gateway")
    parser.add_argument("--no-aggregator", action="store_true", help="do not start the aggregator")
    parser.add_argument("--dry-run", action="store_true", help="print the processes and exit")


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"{name:>11} | {line.decode(errors='replace')}")
        sys.stdout.flush()


async def _supervise(name: str, argv: list[str], env: dict, stop: asyncio.Event) -> None:
    backoff = 1.0
    while not stop.is_set():
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "npcbus.cli", *argv, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        pump = asyncio.create_task(_pump(name, proc.stdout))
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(waiter, 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        stopper.cancel()
        await pump
        if stop.is_set():
            return
        print(f"{name:>11} | exited with {proc.returncode}; restarting in {backoff:.0f}s", flush=True)
        await asyncio.sleep(backoff)
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)


async def _main(procs: list[tuple[str, list[str]]], env: dict) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    for name, argv in procs:
        tasks.append(asyncio.create_task(_supervise(name, argv, env, stop)))
        await asyncio.sleep(0.5)
    await stop.wait()
    print("stopping...", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


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
    settings.validate()
    procs = plan(settings)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if env.get("REQUIRE_API_TOKEN", "true").lower() not in ("0", "false", "no", "off") and not env.get("API_TOKEN"):
        env["API_TOKEN"] = secrets.token_urlsafe(24)
        print(f"API_TOKEN was not set: this run's token is {env['API_TOKEN']}", flush=True)
    if args.dry_run:
        for name, argv in procs:
            print(f"{name}: npcbus {' '.join(argv)}")
        return 0
    from npcbus.model import resolve_base_model
    from npcbus.settings import ModelSettings

    ms = ModelSettings.from_env()
    print(f"base model: {resolve_base_model(ms)}", flush=True)  # builds the offline default when needed
    return asyncio.run(_main(procs, env))
