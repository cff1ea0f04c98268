"""Every long-running service shares one start-up path (npcbus.service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize("command,section", [
    (["gateway"], "gateway"),
    (["worker", "infer"], "worker"),
    (["worker", "train"], "worker"),
    (["aggregator"], "aggregator"),
    (["loop"], "loop"),
])
def test_every_service_prints_its_settings_redacted(command, section):
    env = dict(os.environ, API_TOKEN="secret-token-value", AMQP_URL="amqp://someone:hunter2@127.0.0.1:5672/")
    out = subprocess.run([sys.executable, "-m", "npcbus.cli", *command, "--print-settings"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert set(doc) == {section, "bus"}
    assert "hunter2" not in out.stdout and "secret-token-value" not in out.stdout
