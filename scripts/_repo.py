"""Imported first by the scripts of this folder: this checkout's root goes first on ``sys.path``, so ``bench`` and
``methods`` are this checkout's (a second clone or worktree sharing one environment would otherwise import the
editable install's copy, as ``run_bench.py`` and ``report.py`` at the root never do)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
