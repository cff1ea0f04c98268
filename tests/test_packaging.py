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


def test_readme_configuration_table_is_the_settings():
    """The README's table is `npcbus config --markdown`: every variable the code reads, and only those."""
    from npcbus.config_cli import settings_classes
    from npcbus.settings import docs_table

    text = (ROOT / "README.md").read_text()
    start, end = "<!-- config-table:start -->\n", "<!-- config-table:end -->"
    table = text[text.index(start) + len(start):text.index(end)].strip()
    assert table == docs_table(settings_classes()).strip(), "regenerate it: npcbus config --markdown"
