"""``npcbus task publish``: publish training tasks for an adapter.

Examples::

    # 6 tasks over shards of a JSON-lines file every worker can read (shipped data by default)
    npcbus task publish --adapter npc --data npc_dialogue.jsonl --num-tasks 6 --steps 20 \\
        --hp lr=5e-3 --hp batch_size=4 --deadline-s 3600

    # inline examples read here from a local file and carried in the messages
    npcbus task publish --adapter npc --examples my_turns.jsonl --num-tasks 2 --steps 10

Hyperparameters travel in the task as given (``--hp key=value``, values parsed as JSON when they
can be, else kept as strings; or ``--hyperparams '{"lr": 0.005}'``); the worker fills in its
defaults for the rest. Prints one JSON line per published task (task id, adapter, data).
"""

from __future__ import annotations

import argparse
import json
import sys


def _hp(value: str) -> tuple[str, object]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"expected key=value, got {value!r}")
    k, v = value.split("=", 1)
    try:
        parsed: object = json.loads(v)
    except ValueError:
        parsed = v
    return k.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="Adapter the tasks train.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="PATH",
                     help="A JSON-lines file each worker can read (relative: working directory, then the "
                          "package's data_files); each task gets one shard of it.")
    src.add_argument("--examples", metavar="PATH",
                     help="A local JSON-lines file whose records are sent inline, dealt round-robin over the tasks.")
    parser.add_argument("--num-tasks", type=int, default=1, help="How many tasks (default 1).")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per task (default 20).")
    parser.add_argument("--hp", type=_hp, action="append", default=[], metavar="KEY=VALUE",
                        help="A training hyperparameter (repeatable), e.g. lr=5e-3, batch_size=4.")
    parser.add_argument("--hyperparams", default="", help="Hyperparameters as a JSON object (merged under --hp).")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="Seconds from now after which the tasks are dropped, not trained or re-issued.")
    parser.add_argument("--lease-s", type=float, default=600.0,
                        help="Lease: seconds a worker may take before the task is re-issued (default 600).")
    parser.add_argument("--base-model", default="", help="Base model the tasks are for (empty: any worker).")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from npcbus.bus import Bus
    from npcbus.logs import get_logger, setup_logging
    from npcbus.settings import BusSettings
    from npcbus.tasks import build_tasks, publish_tasks, read_jsonl, resolve_data_path

    bus_settings = BusSettings.from_env()
    setup_logging(bus_settings.log_format, bus_settings.log_level)
    log = get_logger("workers.task_cli")
    hyper: dict = {}
    if args.hyperparams:
        try:
            hyper = json.loads(args.hyperparams)
        except ValueError as e:
            raise SystemExit(f"--hyperparams: not JSON: {e}") from None
        if not isinstance(hyper, dict):
            raise SystemExit("--hyperparams must be a JSON object")
    hyper.update(dict(args.hp))
    kw: dict = dict(num_tasks=args.num_tasks, steps=args.steps, hyperparams=hyper, deadline_s=args.deadline_s,
                    lease_s=args.lease_s, base_model=args.base_model)
    try:
        if args.examples:
            kw["examples"] = read_jsonl(args.examples)
        else:
            kw["path"] = args.data
            try:
                resolve_data_path(args.data)
            except ValueError as e:  # the workers may see files this machine does not: only warn
                print(f"warning: {e}; publishing anyway (workers dead-letter tasks whose data they cannot read)",
                      file=sys.stderr)
        build_tasks(args.adapter, **kw)  # validate before connecting
    except (OSError, ValueError) as e:
        raise SystemExit(f"npcbus task publish: {e}") from None

    async def main() -> int:
        bus = Bus(bus_settings, name="task-publisher")
        await bus.connect()
        try:
            await bus.declare_topology()
            tasks = await publish_tasks(bus, args.adapter, **kw)
        finally:
            await bus.close()
        for t in tasks:
            data = {k: v for k, v in t.data.items() if k != "examples"}
            if "examples" in t.data:
                data["examples"] = len(t.data["examples"])
            print(json.dumps({"task_id": t.task_id, "adapter": t.adapter, "steps": t.steps, "data": data}))
        log.info("tasks published", adapter=args.adapter, count=len(tasks))
        return 0

    return asyncio.run(main())
