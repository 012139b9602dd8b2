"""fleet_cli.run_cli: the one exception-to-exit-code handler every command line uses."""

from __future__ import annotations

import logging

import pytest
from conftest import run_script

from circuit_breaker import CircuitOpenError
from fleet_cli import run_cli
from fleet_common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TEMPFAIL, EXIT_USAGE, UsageError, one_line
from fleet_git import GitError, run_git


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


def _git_failure(tmp_path) -> GitError:
    """A real git failure: rev-parse of a ref that does not exist, in a real repository."""
    run_git(tmp_path, "init", "-q", str(tmp_path))
    with pytest.raises(GitError) as info:
        run_git(tmp_path, "rev-parse", "--verify", "no-such-ref")
    return info.value


def test_the_body_s_code_is_returned(capsys):
    assert run_cli("prog", lambda: 7) == 7
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc, code", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    (UsageError("bad --to"), EXIT_USAGE),
    (CircuitOpenError("origin", {"failure_count": 3}), EXIT_TEMPFAIL),  # SuiteError: its exit_code
    (FileNotFoundError(2, "No such file or directory"), EXIT_FAILURE),
])
def test_each_exception_is_one_line_and_its_code(exc, code, capsys):
    assert run_cli("prog", _raise(exc)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: "), err
    assert err == ("prog: interrupted\n" if code == EXIT_INTERRUPTED else f"prog: error: {one_line(exc)}\n")


def test_a_git_failure_is_one_line_with_details_at_debug(tmp_path, capsys, caplog):
    exc = _git_failure(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="fleet_cli"):
        assert run_cli("prog", _raise(exc)) == EXIT_FAILURE
    assert capsys.readouterr().err == f"prog: error: {one_line(exc)}\n"
    assert any("returncode=" in record.getMessage() for record in caplog.records)


def test_a_multi_line_reason_stays_one_line(capsys):
    assert run_cli("prog", _raise(OSError("first line\nsecond line"))) == EXIT_FAILURE
    assert capsys.readouterr().err == "prog: error: first line\n"


def test_a_bug_is_not_hidden_unless_the_tool_says_so(capsys):
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", lambda: 1 // 0)
    assert run_cli("prog", lambda: 1 // 0, catch_all=True) == EXIT_FAILURE
    assert capsys.readouterr().err.startswith("prog: error: ")


def test_a_tool_words_its_own_failures_but_not_bad_usage(capsys):
    def unknown(exc: BaseException):
        return 3, f"UNKNOWN: {one_line(exc)}"

    assert run_cli("prog", _raise(OSError("disk on fire")), on_failure=unknown) == 3
    assert run_cli("prog", _raise(UsageError("no such option")), on_failure=unknown) == EXIT_USAGE
    assert capsys.readouterr().err == "UNKNOWN: disk on fire\nprog: error: no such option\n"


@pytest.mark.parametrize("script, args", [
    ("inbox.py", ["list"]),
    ("send_message.py", ["hello", "--to", "all"]),
    ("fleet_status.py", []),
    ("mcp_server.py", []),
])
def test_every_cli_says_a_missing_clone_in_one_line(script, args, tmp_path):
    missing = str(tmp_path / "nothing-here")
    proc = run_script(script, "--repo", missing, *args, env={"SERVER_ID": "code2"})
    assert proc.returncode in (EXIT_FAILURE, EXIT_USAGE), proc
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(script[:-3] + ": "), proc.stderr


def test_a_missing_dependency_is_one_line_that_says_what_to_install(tmp_path):
    """Run from a Python without requirements.txt installed (a bare venv), a command that needs
    a package says so in one line instead of a traceback; one that needs none still works."""
    import subprocess
    import sys

    from conftest import PYTHON_DIR

    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    repo = tmp_path / "Build"
    proc = subprocess.run([str(python), str(PYTHON_DIR / "message_monitor.py"), "--init", "--repo", str(repo)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(python), str(PYTHON_DIR / "message_monitor.py"), "--status", "--repo", str(repo),
                           "--server", "code2"], capture_output=True, text=True)
    assert proc.returncode == EXIT_FAILURE and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # (after the health checks' own warnings: no psutil either)
    assert last.startswith("message_monitor: error: the Python package ") and "pip install -r requirements.txt" in last
