"""Structured logging (structlog) shared by every service: JSON or console output by setting."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def setup_logging(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog and the standard library's logging once per process."""
    global _configured
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _configured = True


def get_logger(name: str = "npcbus", **bind):
    if not _configured:
        import os

        setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "info"))
    return structlog.get_logger(name).bind(**bind)
