"""The command lines: every number is finite and in range, one-shot commands do not combine in
silence, and a bad ``--init`` target is one clear line (exit 2, never a traceback)."""

from __future__ import annotations

import pytest
from conftest import run_script

import message_monitor
import network_check
import system_health
from fleet_common import EXIT_USAGE, UsageError, check_number, default_interval

BAD_NUMBERS = ["nan", "inf", "-inf", "NaN", "1e400"]


@pytest.mark.parametrize("option", ["--interval", "--archive-days", "--auto-archive-days",
                                    "--heartbeat-minutes"])
@pytest.mark.parametrize("value", BAD_NUMBERS + ["-1"])
def test_monitor_numbers_must_be_finite_and_in_range(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        message_monitor.main(["--repo", "/nonexistent", f"{option}={value}"])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{option} must be a number from" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "0.01", "86401"])
def test_an_interval_out_of_range_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        message_monitor.main(["--interval", value, "--status"])
    assert exit_info.value.code == EXIT_USAGE


@pytest.mark.parametrize("value", ["nan", "inf", "0", "abc"])
def test_monitor_interval_from_the_environment(value, monkeypatch, capsys):
    monkeypatch.setenv("MONITOR_INTERVAL", value)
    assert message_monitor.main(["--repo", "/nonexistent", "--once"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MONITOR_INTERVAL must be a number" in err[0]


@pytest.mark.parametrize("value", ["nan", "-1", "abc", "1,,2", "99999"])
def test_monitor_backoff_from_the_environment_is_checked(value, monkeypatch, capsys):
    monkeypatch.setenv("MONITOR_BACKOFF", value)
    assert message_monitor.main(["--repo", "/nonexistent", "--once"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MONITOR_BACKOFF must be a number" in err[0]


def test_monitor_backoff_delays():
    assert message_monitor.backoff_delays(None) == message_monitor.BACKOFF_DELAYS
    assert message_monitor.backoff_delays(" ") == message_monitor.BACKOFF_DELAYS
    assert message_monitor.backoff_delays("0.5, 1") == (0.5, 1.0)
    assert message_monitor.backoff_delays("0") == ()  # no retry within a cycle
    with pytest.raises(UsageError):
        message_monitor.backoff_delays(",".join(["1"] * 11))


def test_check_number():
    assert check_number("2.5", "x", 0, 10) == 2.5
    assert check_number(0, "x", 0, 10) == 0.0
    for bad in ("nan", float("inf"), "11", None, "", True and "x"):
        with pytest.raises(UsageError):
            check_number(bad, "x", 0, 10)


def test_default_interval_is_checked(monkeypatch):
    monkeypatch.setenv("MONITOR_INTERVAL", "2")
    assert default_interval() == 2.0
    monkeypatch.setenv("MONITOR_INTERVAL", "nan")
    with pytest.raises(UsageError):
        default_interval()


@pytest.mark.parametrize("args", [["--disk-warning-gb", "nan"], ["--cpu-warning-percent", "inf"],
                                  ["--fetch-critical-seconds", "-5"], ["--memory-warning-percent", "101"]])
def test_system_health_thresholds_must_be_finite(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        system_health.main(["/nonexistent", *args])
    assert exit_info.value.code == EXIT_USAGE
    assert "must be a number from" in capsys.readouterr().err


def test_system_health_library_refuses_nan():
    with pytest.raises(UsageError):
        system_health.merge_thresholds({"disk_warning_gb": float("nan")})


@pytest.mark.parametrize("value", ["nan", "inf", "0", "601"])
def test_network_check_timeout_must_be_finite(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        network_check.main(["--timeout", value])
    assert exit_info.value.code == EXIT_USAGE
    with pytest.raises(UsageError):
        network_check.test_connectivity("/nonexistent", timeout=float(value))


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("args, named", [
    (["--retry-dead", "--archive-days", "1"], "--archive-days and --retry-dead cannot run together"),
    (["--status", "--repair"], "--status and --repair cannot run together"),
    (["--init", "--status"], "--init and --status cannot run together"),
    (["--print-systemd-unit", "--print-task-scheduler"], "cannot run together"),
    (["--json"], "--json goes with --status only"),
    (["--json", "--retry-dead"], "--json goes with --status only"),
    (["--service-user", "fleet"], "--service-user goes with --print-systemd-unit only"),
    (["--service-user", "fleet", "--print-task-scheduler"], "--service-user goes with"),
    (["--once", "--status"], "--once is an option of the monitoring loop"),
    (["--once", "--print-systemd-unit"], "--once is an option of the monitoring loop"),
    (["--heartbeat-minutes", "5", "--retry-dead"], "--heartbeat-minutes is an option"),
    (["--no-auto-reply", "--archive-days", "0"], "--no-auto-reply is an option"),
])
def test_one_shot_options_that_cannot_run_together_are_refused(args, named, capsys, tmp_path):
    assert message_monitor.main(["--repo", str(tmp_path), "--server", "code2", *args]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert list(tmp_path.iterdir()) == []  # refused before anything was touched


def test_service_definitions_carry_the_loop_options(tmp_path):
    signers = tmp_path / "allowed_signers"
    signers.write_text("")
    plain = run_script("message_monitor.py", "--repo", str(tmp_path), "--server", "code2",
                       "--print-systemd-unit")
    assert plain.returncode == 0, plain.stderr
    assert "--upgrade-signed-by" not in plain.stdout and "--heartbeat-minutes" not in plain.stdout
    unit = run_script("message_monitor.py", "--repo", str(tmp_path), "--server", "code2",
                      "--print-systemd-unit", "--upgrade-signed-by", str(signers),
                      "--heartbeat-minutes", "15", "--no-auto-reply", "--branch", "trunk")
    assert unit.returncode == 0, unit.stderr
    exec_start = next(line for line in unit.stdout.splitlines() if line.startswith("ExecStart="))
    for part in (f"--upgrade-signed-by {signers.resolve()}", "--heartbeat-minutes 15",
                 "--no-auto-reply", "--branch trunk"):
        assert part in exec_start, (part, exec_start)
    task = run_script("message_monitor.py", "--repo", "K:/Projects/Build", "--server", "code2",
                      "--print-task-scheduler", "--upgrade-signed-by", "C:/fleet/allowed_signers")
    assert task.returncode == 0, task.stderr
    assert "--upgrade-signed-by C:/fleet/allowed_signers" in task.stdout
    plain_task = run_script("message_monitor.py", "--repo", "K:/Projects/Build", "--server", "code2",
                            "--print-task-scheduler")
    assert "--upgrade-signed-by" not in plain_task.stdout


def test_upgrade_signed_by_needs_a_readable_file(fleet, capsys):
    c2 = fleet.clone("code2")
    missing = fleet.base / "no-such-file"
    assert message_monitor.main(["--repo", str(c2), "--server", "code2", "--once",
                                 "--upgrade-signed-by", str(missing)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--upgrade-signed-by" in err[0]


# --------------------------------------------------------------------------- --init


def test_init_on_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    assert message_monitor.main(["--init", "--repo", str(target)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert target.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    inside = target / "clone"
    assert message_monitor.main(["--init", "--repo", str(inside)]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err


def test_cli_processes_print_no_traceback_for_nan():
    proc = run_script("message_monitor.py", "--interval", "nan", "--once")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("must be a number from 0.1 to 86400, not 'nan'")


def test_a_repo_given_as_home_relative_is_found_where_the_shell_left_the_tilde(fleet):
    """PowerShell and cmd pass ``~/...`` to a program as typed: every command expands it."""
    clone = fleet.clone("code2")
    env = {"HOME": str(clone.parent), "USERPROFILE": str(clone.parent)}
    for script, args in (("inbox.py", ["--count"]), ("fleet_status.py", ["--json"]),
                         ("send_message.py", ["hello", "--to", "build1", "--from", "code2"])):
        proc = run_script(script, *args, "--repo", f"~/{clone.name}", env=env)
        assert proc.returncode in (0, 1), (script, proc.stderr)  # (fleet_status: 1, a warning)
