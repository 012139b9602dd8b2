"""What a successful command-line send imports: only what every send needs (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import PYTHON_DIR

# Deferred on the send path (send_message's docstring lists why); importing any of them on every
# send costs milliseconds each.
NOT_ON_THE_SEND_PATH = ("logging", "structured_log", "fleet_status", "message_queue", "inbox",
                        "shutil", "bz2", "lzma")

_PROBE = """
import json, sys
import send_message
code = send_message.main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_a_send_imports_neither_logging_nor_the_overview(fleet):
    clone = fleet.clone("code2")
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    proc = subprocess.run([sys.executable, "-c", _PROBE, "hello", "--to", "code1", "--repo", str(clone),
                           "--from", "code2", "--quiet"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    loaded = [name for name in NOT_ON_THE_SEND_PATH if name in report["modules"]]
    assert loaded == [], loaded
    assert "fleet_secrets" in report["modules"] and "fleet_roster" in report["modules"]
