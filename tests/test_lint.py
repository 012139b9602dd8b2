"""Static checks run with the suite: ruff, and vermin for the promised Python 3.8 floor."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import ROOT

TARGETS = [name for name in ("python", "tests", "bench") if (ROOT / name).is_dir()]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(__import__("pathlib").Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: pip install -r requirements-dev.txt"
    return found


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", *TARGETS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_runs_on_python_3_8():
    proc = subprocess.run(
        [_tool("vermin"), "--no-tips", "--violations", "-t=3.8-", "--eval-annotations",
         "--backport", "typing", "--no-parse-comments", *TARGETS],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
