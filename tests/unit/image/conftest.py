"""The image tools under hack/ are scripts, not a package: make them importable for their tests."""

from __future__ import annotations

import sys
from pathlib import Path

HACK = Path(__file__).resolve().parents[3] / "hack"
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))
