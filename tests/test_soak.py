"""Soak runs of real monitor processes (marked slow; they run in CI too)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_two_monitors_produce_exactly_the_expected_automatic_messages():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reply_soak.py"), "--seconds", "12", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    kinds = sorted((m["from"], m["type"]) for m in result["automatic_messages"])
    assert kinds == [("build1", "ack"), ("build1", "response"), ("code2", "response")]
    assert "Status of build1" in result["status_reply"]["body"]
