"""The ``npcbus`` command line: the one front door to every service.

Each subcommand lives in its own module, which must expose ``add_arguments(parser)`` and
``run(args) -> int`` and keep its top-level imports light. The module is imported only when its
subcommand (or that subcommand's ``--help``) is asked for, so ``npcbus gateway`` never imports
torch and ``npcbus --help`` imports no service at all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("run",): ("npcbus.stack", "Run the services of compose.yaml as local processes (the whole system, no Docker needed)."),
    ("model", "init"): ("npcbus.model_cli", "Build the offline default model (tokenizer + small Llama) with no network."),
    ("train",): ("workers.train_cli", "Fine-tune a LoRA adapter locally on a data set."),
    ("task", "publish"): ("workers.task_cli", "Publish training tasks for an adapter."),
    ("worker", "train"): ("workers.train_worker", "Run a training worker: tasks in, LoRA deltas out."),
    ("worker", "infer"): ("workers.infer_worker", "Run an inference consumer: generation requests in, token streams out."),
    ("aggregator",): ("aggregator.service", "Run the aggregator: rounds over deltas, new adapter versions."),
    ("loop",): ("aggregator.loop", "Run the feedback loop: accepted experience in, training tasks out."),
    ("broker",): ("npcbus.broker_setup", "Broker definitions: a user per role, permissions, policies."),
    ("gateway",): ("gateway.app", "Run the gateway: WebSocket NPC chat, HTTP and OpenAI-compatible API."),
    ("data", "build"): ("npcbus.data.build", "Build a cleaned, deduplicated data set from a weighted mix of sources."),
    ("data", "npc"): ("npcbus.data.npc", "Validate, deduplicate and split NPC dialogue records."),
    ("data", "blocks"): ("npcbus.data.blocks", "Tokenize text into fixed-length blocks for training tasks."),
    ("eval",): ("npcbus.evaluate", "Evaluate a base model or adapter: perplexity, NPC score, multiple choice."),
    ("adapter", "list"): ("npcbus.adapters_cli", "List adapters in the manifest."),
    ("adapter", "register"): ("npcbus.adapters_cli", "Register an adapter in the manifest."),
    ("adapter", "show"): ("npcbus.adapters_cli", "Show one adapter's manifest entry."),
    ("adapter", "merge"): ("npcbus.adapters_cli", "Merge a LoRA adapter into its base model and save the full model."),
    ("adapter", "publish"): ("npcbus.adapters_cli", "Publish an adapter to the Hugging Face hub (or --dry-run)."),
    ("config",): ("npcbus.config_cli", "Print every configuration variable with its current value and help."),
}


def _groups() -> dict[str, list[tuple[tuple[str, ...], str]]]:
    groups: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for path, (_mod, help_) in COMMANDS.items():
        groups.setdefault(path[0], []).append((path, help_))
    return groups


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="npcbus",
        description="npcbus: LLM-driven game NPCs over RabbitMQ, with LoRA adapters that keep improving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from npcbus import __version__

    p.add_argument("--version", action="version", version=f"npcbus {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, items in _groups().items():
        if len(items) == 1 and len(items[0][0]) == 1:
            sub.add_parser(name, help=items[0][1], add_help=False)
        else:
            sub.add_parser(name, help="subcommands: " + ", ".join(path[1] for path, _h in items), add_help=False)
    return p


def _find(argv: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    if not argv:
        return None, argv
    if (argv[0],) in COMMANDS:
        return (argv[0],), argv[1:]
    if len(argv) >= 2 and (argv[0], argv[1]) in COMMANDS:
        return (argv[0], argv[1]), argv[2:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = _find(argv)
    if path is None:
        groups = _groups()
        if argv and argv[0] in groups and not argv[0].startswith("-"):
            # a group name alone, or with an unknown subcommand: show the group's help
            gp = argparse.ArgumentParser(prog=f"npcbus {argv[0]}")
            gsub = gp.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
            for p, h in groups[argv[0]]:
                gsub.add_parser(p[1], help=h)
            gp.parse_args(argv[1:])
            return 2
        _top_parser().parse_args(argv or ["--help"])
        return 2
    module, help_ = COMMANDS[path]
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="npcbus " + " ".join(path), description=help_)
    if len(path) > 1 and hasattr(mod, "add_subcommand_arguments"):
        mod.add_subcommand_arguments(path[-1], parser)
    else:
        mod.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command_path = path
    return int(mod.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
