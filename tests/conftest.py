"""Shared test set-up: the repository root on sys.path so tests can load the numbered builds."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import load_build  # noqa: E402  (needs the path above; sets TRITON_INTERPRET first)

__all__ = ["ROOT", "load_build"]
