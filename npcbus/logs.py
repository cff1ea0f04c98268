"""Structured logging (structlog) shared by every service: JSON or console output by setting.

Log lines go to whatever ``sys.stderr`` is *when the line is written*, never to the file object that
was ``sys.stderr`` when logging was set up or a logger was created. A process may replace its
standard streams (a test's output capture does, and closes the old stream after the test; so may an
embedding application): loggers created before the replacement, including the module-level ones
bound at import, keep working and write to the new stream.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

_configured = False
_write_lock = threading.Lock()


def _current_stream(name: str):
    """``sys.stderr`` or ``sys.stdout`` as it is now; ``sys.__stderr__``/``__stdout__`` where the
    current one is gone or closed (a log line must never break the code that logs it)."""
    for stream in (getattr(sys, name, None), getattr(sys, f"__{name}__", None)):
        if stream is not None and not getattr(stream, "closed", False):
            return stream
    return None


class StdStreamLogger:
    """A structlog logger that prints each rendered line to the process's current standard stream
    (``stderr`` by default), looked up at write time."""

    def __init__(self, stream: str = "stderr"):
        if stream not in ("stderr", "stdout"):
            raise ValueError(f"stream must be 'stderr' or 'stdout', not {stream!r}")
        self._stream = stream

    def __repr__(self) -> str:
        return f"<StdStreamLogger(sys.{self._stream})>"

    def msg(self, message: str) -> None:
        with _write_lock:
            f = _current_stream(self._stream)
            if f is None:
                return
            try:
                print(message, file=f, flush=True)
            except ValueError:  # closed between the check and the write (another thread): drop the line
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class StdStreamLoggerFactory:
    """Logger factory for :func:`structlog.configure`: :class:`StdStreamLogger` on ``stream``."""

    def __init__(self, stream: str = "stderr"):
        self._stream = stream

    def __call__(self, *args: Any) -> StdStreamLogger:
        return StdStreamLogger(self._stream)


class StdStreamHandler(logging.StreamHandler):
    """A standard-library logging handler that, like :class:`StdStreamLogger`, writes to the
    current ``sys.stderr`` (``logging.StreamHandler(sys.stderr)`` keeps the stream it was given)."""

    def __init__(self, stream: str = "stderr"):
        self._stream_name = stream
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return _current_stream(self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current one is always used
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:
            super().emit(record)


def setup_logging(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog and the standard library's logging (again where a service asks)."""
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
        logger_factory=StdStreamLoggerFactory("stderr"),
        cache_logger_on_first_use=False,
    )
    # a no-op where the root logger already has handlers (an application's own, or pytest's)
    logging.basicConfig(level=max(lvl, logging.WARNING), handlers=[StdStreamHandler("stderr")],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _configured = True


def get_logger(name: str = "npcbus", **bind):
    if not _configured:
        import os

        setup_logging(os.environ.get("LOG_FORMAT", "console"), os.environ.get("LOG_LEVEL", "info"))
    return structlog.get_logger(name).bind(**bind)
