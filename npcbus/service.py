"""What every long-running service (``npcbus gateway``, ``worker infer``, ``worker train``,
``aggregator``, ``loop``) does before it starts, in one place."""

from __future__ import annotations

import argparse
import json

from npcbus.settings import BusSettings, Settings


def add_print_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-settings", action="store_true",
                        help="Print the settings (secrets redacted) as JSON and exit.")


def prepare(args: argparse.Namespace, bus: BusSettings, **settings: Settings) -> bool:
    """With ``--print-settings``: print ``settings`` and ``bus`` (redacted) and return False (the
    caller exits). Otherwise set up structured logging from ``bus`` and uvloop's event loop where
    it is installed, and return True."""
    if getattr(args, "print_settings", False):
        doc = {name: s.redacted() for name, s in settings.items()}
        doc["bus"] = bus.redacted()
        print(json.dumps(doc, default=str, indent=2))
        return False
    from npcbus.bus import install_uvloop
    from npcbus.logs import setup_logging

    setup_logging(bus.log_format, bus.log_level)
    install_uvloop()
    return True
