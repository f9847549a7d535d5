"""Every build's __main__ runs end to end in --quick mode and exits 0: the path a reader takes first."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

BUILDS = sorted(p.name for p in ROOT.glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("build", BUILDS)
def test_quick_main(build, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / build), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path,  # a build must not depend on, or write into, the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{build} --quick exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "All results match." in proc.stdout
    # targets are judged on full runs only, and the output speaks of the collection, never of an issue
    assert "MISSED" not in proc.stdout and "the issue" not in proc.stdout.lower()
