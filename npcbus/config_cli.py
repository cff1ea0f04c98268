"""`npcbus config`: every configuration variable, its current value and its meaning.

``npcbus config --markdown`` prints the README's configuration table.
"""

from __future__ import annotations

import importlib
import os

# Every settings dataclass of the project, as "module:Class". Services add theirs here.
SETTINGS_CLASSES = [
    "npcbus.settings:BusSettings",
    "npcbus.settings:ModelSettings",
    "npcbus.adapters:ManifestSettings",
    "workers.infer_worker:InferSettings",
    "workers.train_worker:TrainWorkerSettings",
    "aggregator.service:AggregatorSettings",
    "aggregator.loop:LoopSettings",
    "npcbus.adapters:AdapterToolSettings",
    "gateway.settings:GatewaySettings",
    "npcbus.stack:StackSettings",
    "npcbus.broker_setup:BrokerSetupSettings",
]


def settings_classes() -> list[type]:
    out = []
    for ref in SETTINGS_CLASSES:
        mod, _, name = ref.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print the README's configuration table")


def run(args) -> int:
    from npcbus.settings import docs_rows, docs_table

    classes = settings_classes()
    if args.markdown:
        print(docs_table(classes))
        return 0
    seen = set()
    for cls in classes:
        for env, default, _who, help_ in docs_rows(cls):
            if env in seen:
                continue
            seen.add(env)
            cur = os.environ.get(env)
            shown = "(set)" if cur is not None and "TOKEN" in env else cur
            print(f"{env}={shown if cur is not None else default!s:<30} # {help_}")
    return 0
