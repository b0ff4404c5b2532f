"""The tree is lint-clean under the pinned ruff (pyproject.toml [tool.ruff]), so the test command fails on a finding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"ruff findings (fix them or run `ruff check --fix`):\n{r.stdout}{r.stderr}"
