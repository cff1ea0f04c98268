"""A non-editable install carries the JSON schemas (npcbus/schemas links to the repository's schemas/)."""

from __future__ import annotations

import glob
import subprocess
import sys
import zipfile

from .conftest import ROOT


def test_wheel_contains_every_schema(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(glob.glob(str(tmp_path / "*.whl"))[0]).namelist()
    shipped = {p.name for p in (ROOT / "schemas").glob("*.json")}
    assert shipped and {n.rsplit("/", 1)[-1] for n in names if n.startswith("npcbus/schemas/")} == shipped
