"""The code checks CI runs: ``ruff check`` and ``mypy`` (strict, configured in pyproject.toml).

Run from the project root as subprocesses of this interpreter, so they check what this
environment has installed. Skipped, with the reason, only when the tool is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["minismtp", "contrib"]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check_is_clean() -> None:
    result = run_tool("ruff", "check", "--no-cache", *CHECKED)
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"


def test_mypy_strict_is_clean() -> None:
    result = run_tool("mypy", *CHECKED)
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
    assert "Success" in result.stdout
