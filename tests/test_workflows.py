"""Both GitHub workflow files validate against the GitHub workflow schema (offline, built in)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

WORKFLOWS = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_exist():
    names = {Path(w).name for w in WORKFLOWS}
    assert {"cpu.yml", "gpu.yml"} <= names


def test_workflows_match_schema():
    exe = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.github-workflows", *WORKFLOWS], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
