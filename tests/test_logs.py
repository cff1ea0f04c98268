"""Logging survives its stream being replaced: a test's output capture (or an application) may swap
``sys.stderr`` and close the old one; loggers made before and after write to the new one."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog

from npcbus import logs


@pytest.fixture
def restore_logging(monkeypatch):
    """Put structlog's configuration, the root logger's handlers and level, and ``sys.stderr`` back
    after the test, so that the rest of the process logs as before."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_configured", logs._configured)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)


def _events(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def test_a_logger_made_after_stderr_is_replaced_and_the_old_one_closed_writes_to_the_new_one(restore_logging):
    first = io.StringIO()
    sys.stderr = first
    logs.setup_logging("json", "info")  # while the first stream is sys.stderr
    logs.get_logger("t").info("before", n=1)
    assert [e["event"] for e in _events(first)] == ["before"]

    second = io.StringIO()
    sys.stderr = second
    first.close()  # what a test's capture does to its stream after the test
    logs.get_logger("t", adapter="npc").info("after", n=2)
    (e,) = _events(second)
    assert e["event"] == "after" and e["n"] == 2 and e["adapter"] == "npc" and e["level"] == "info"


def test_a_logger_made_before_the_replacement_writes_to_the_new_stream(restore_logging):
    first = io.StringIO()
    sys.stderr = first
    logs.setup_logging("json", "info")
    early = logs.get_logger("t", worker="w1")  # as a module-level or service logger is bound once
    early.info("one")

    second = io.StringIO()
    sys.stderr = second
    first.close()
    early.info("two")
    early.bind(round=3).warning("three")
    assert [e["event"] for e in _events(second)] == ["two", "three"]
    assert all(e["worker"] == "w1" for e in _events(second)) and _events(second)[1]["round"] == 3


def test_a_closed_stderr_that_nobody_replaced_does_not_break_the_caller(restore_logging):
    s = io.StringIO()
    sys.stderr = s
    logs.setup_logging("json", "info")
    log = logs.get_logger("t")
    s.close()
    log.info("falls back to the original stderr or is dropped, never raises")


def test_the_standard_library_handler_follows_sys_stderr(restore_logging):
    root = logging.getLogger()
    root.handlers[:] = []  # as in a service process, where basicConfig installs the handler
    sys.stderr = io.StringIO()
    logs.setup_logging("console", "info")
    assert any(isinstance(h, logs.StdStreamHandler) for h in root.handlers)
    old = sys.stderr
    sys.stderr = new = io.StringIO()
    old.close()
    logging.getLogger("aio_pika.test").warning("connection lost")
    assert "WARNING aio_pika.test: connection lost" in new.getvalue()
