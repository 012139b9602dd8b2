"""fleet_status.py on real fleets: presence in state refs, unread and acknowledged mail, the roster,
the terminal table, JSON, Nagios exit codes, and the HTML page opened in headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from conftest import Fleet, crowd_state_refs, git, refuse_custom_refs, run_script

import fleet_report
import fleet_status
from fleet_common import iso_utc
from fleet_git import Clone, run_git
from fleet_mailbox import serialize
from fleet_state import StateChange, StateStore, presence_doc
from fleet_status import (
    CRITICAL,
    LIVE,
    NEVER_SEEN,
    OK,
    ROSTER_PATH,
    STALE,
    WARNING,
    parse_duration,
    parse_roster,
    render_html,
)

HOSTILE_SCRIPT = "<script>document.title='pwned'</script>"
HOSTILE_IMG = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_ANSI = "Nightly \x1b[2J\x1b]0;owned\x07 green"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --------------------------------------------------------------------------- building fleets


def _iso(age: float) -> str:
    return iso_utc(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age))


def _msg(mid: str, sender: str, to: Any, subject: str, age: float, **extra: Any) -> Dict[str, Any]:
    msg = {"id": mid, "from": sender, "to": to, "subject": subject, "body": "body", "type": "info",
           "priority": "normal", "timestamp": _iso(age), "read": False, "ack_required": False}
    msg.update(extra)
    return msg


def _fleet(tmp_path: Path, *messages: Dict[str, Any], roster: Optional[list] = None) -> Fleet:
    fleet = Fleet(tmp_path, mailbox=serialize({"messages": list(messages)}))
    if roster is not None:
        _commit(fleet, {ROSTER_PATH: json.dumps({"version": 1, "servers": roster}).encode()})
    return fleet


def _commit(fleet: Fleet, files: Dict[str, Optional[bytes]]) -> None:
    """Commit files to the shared branch by the suite's own transaction."""
    path = fleet.clones.get("admin") or fleet.clone("admin")
    Clone(path).transact(lambda tip: (files, "admin: files"), author="admin")


def _publish(fleet: Fleet, server: str, age: float = 5.0, *, read=(), acks=(), **presence: Any) -> None:
    """Write ``server``'s state ref from its own clone, its presence ``age`` seconds old."""
    path = fleet.clones.get(server) or fleet.clone(server)
    doc = presence_doc(started=time.time() - 3600, interval=presence.pop("interval", 10), healthy=True,
                       activity="idle", version="1.1.0",
                       extra={"queue": {"pending": 0, "dead": 0}, "breaker": "CLOSED"})
    doc["timestamp"] = _iso(age)
    doc.update(presence)
    assert StateStore(Clone(path)).update(server, StateChange(presence=doc, read=read, acks=acks))


def _viewer(fleet: Fleet) -> Path:
    return fleet.clones.get("viewer") or fleet.clone("viewer")


def _status(fleet: Fleet, capsys, *args: str):
    code = fleet_status.main(["--repo", str(_viewer(fleet)), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def _row(report: Dict[str, Any], server: str) -> Dict[str, Any]:
    return next(r for r in report["servers"] if r["id"] == server)


def _hostile_fleet(tmp_path: Path) -> Fleet:
    fleet = _fleet(
        tmp_path,
        _msg("m1", "code2", "build1", HOSTILE_SCRIPT, 60),
        _msg("m2", "code2", "build1", HOSTILE_IMG, 50),
        _msg("m3", "build1", "all", HOSTILE_ANSI, 40),
        roster=[{"id": "code2", "description": "<b onmouseover=\"document.title='pwned'\">x</b>"},
                {"id": "build1"}],
    )
    _publish(fleet, "code2", activity=HOSTILE_SCRIPT + "x" * 10000)
    _publish(fleet, "build1", suite_version=HOSTILE_IMG)
    return fleet


# --------------------------------------------------------------------------- the picture


def test_live_stale_never_seen_unread_and_acknowledged(tmp_path, capsys):
    fleet = _fleet(
        tmp_path,
        _msg("m1", "code2", "build1", "Deploy tonight?", 5 * 3600),
        _msg("m2", "build1", "code2", "Build 4411 green", 600),
        _msg("m3", "code2", "all", "Freeze at 18:00", 3600, ack_required=True),
        _msg("m4", "build1", "code2", "Re: Deploy tonight?", 300, in_reply_to="m1"),
        _msg("m5", "build1", "biuld2", "typo'd recipient", 60),
        roster=[{"id": "code2", "description": "the agent box"}, {"id": "build1"}, {"id": "build2"}],
    )
    _publish(fleet, "code2", 5, read=[("m2", "build1"), ("m4", "build1")], activity="replying")
    _publish(fleet, "build1", 30 * 60, acks=[{"id": "m3", "from": "code2", "note": "frozen"}])
    _publish(fleet, "win1", 20, healthy=False)

    code, report = _status(fleet, capsys)

    assert code == 2 and report["status"] == CRITICAL and report["exit_code"] == 2
    assert {r["id"] for r in report["servers"]} == {"code2", "build1", "build2", "win1", "biuld2"}
    code2, build1, build2, win1 = (_row(report, s) for s in ("code2", "build1", "build2", "win1"))
    # Presence: live, stale, never seen; what it was doing and how it is.
    assert code2["state"] == LIVE and code2["presence"]["activity"] == "replying"
    assert code2["presence"]["suite_version"] == "1.1.0" and code2["presence"]["queue"] == {"pending": 0, "dead": 0}
    assert code2["description"] == "the agent box" and code2["in_roster"]
    assert build1["state"] == STALE and build1["level"] == WARNING
    assert build2["state"] == NEVER_SEEN and build2["level"] == CRITICAL and build2["in_roster"]
    assert win1["state"] == LIVE and win1["level"] == WARNING and "unhealthy" in win1["reasons"][0]
    # Mail waiting: code2 read its two through its state ref; build1 acknowledged m3 (which reads
    # it) and has the old m1 unread; win1 has m3 unread.
    assert code2["unread"]["count"] == 0 and code2["level"] == OK
    assert build1["unread"]["count"] == 1 and build1["unread"]["overdue"]
    assert win1["unread"]["count"] == 1 and not win1["unread"]["overdue"]
    assert build1["unread"]["oldest"]["subject"] == "Deploy tonight?"
    assert build1["unread"]["oldest"]["age_seconds"] > 4 * 3600
    # Acknowledgements: build1 acked m3 (state ref); win1 and build2 owe it; code2 sent it.
    assert build1["acks_owed"]["count"] == 0 and code2["acks_owed"]["count"] == 0
    assert win1["acks_owed"]["count"] == 1 and build2["acks_owed"]["count"] == 1
    assert not win1["acks_owed"]["overdue"]  # an hour old, within --unread-after 4h
    assert code2["last_sent"] and build2["last_sent"] is None
    # The fleet: who is waited on, who is stale; the typo'd recipient is a server nobody runs.
    assert [w["server"] for w in report["waited_on"]] == ["build1"]
    assert [s["server"] for s in report["stale"]] == ["build1"]
    assert _row(report, "biuld2")["state"] == NEVER_SEEN and _row(report, "biuld2")["level"] == WARNING
    # Most urgent first.
    assert report["servers"][0]["id"] == "build2" and report["servers"][-1]["id"] == "code2"
    # Threads: the reply joins its original; who has not read it.
    deploy = next(t for t in report["threads"] if t["root"] == "m1")
    assert deploy["messages"] == 2 and deploy["subject"] == "Deploy tonight?"
    assert deploy["unread_by"] == ["build1"]
    assert report["chart"]["totals"][-1] + report["chart"]["totals"][-2] == 5
    assert report["summary"].startswith("FLEET CRITICAL - 5 servers: 2 live, 1 stale, 2 never seen")


@pytest.mark.parametrize("scenario, expected", [
    ("all live", 0), ("stale", 1), ("stale 4x", 2), ("unread too long", 1), ("roster never seen", 2),
])
def test_exit_codes_are_nagios(tmp_path, capsys, scenario, expected):
    msgs = [_msg("m1", "code2", "build1", "old news", 5 * 3600 if scenario == "unread too long" else 60)]
    roster = [{"id": "code2"}, {"id": "build1"}, {"id": "build3"}] if scenario == "roster never seen" else None
    fleet = _fleet(tmp_path, *msgs, roster=roster)
    _publish(fleet, "code2")
    age = {"stale": 20 * 60, "stale 4x": 5 * 15 * 60}.get(scenario, 30)
    _publish(fleet, "build1", age)
    code, report = _status(fleet, capsys)
    assert code == expected == report["exit_code"], report["summary"]


def test_thresholds_come_from_the_command_line(tmp_path, capsys):
    fleet = _fleet(tmp_path, _msg("m1", "code2", "build1", "old news", 5 * 3600))
    _publish(fleet, "code2")
    _publish(fleet, "build1", 20 * 60)
    assert _status(fleet, capsys)[0] == 1
    code, report = _status(fleet, capsys, "--stale-after", "30m", "--unread-after", "6h")
    assert code == 0 and report["thresholds"]["stale_after_seconds"] == 1800
    assert _status(fleet, capsys, "--stale-after", "30m", "--unread-after", "1h")[0] == 1


def test_a_servers_own_interval_widens_its_stale_limit(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    _publish(fleet, "slow", 25 * 60, interval=600)  # three missed 10-minute cycles: 30 minutes
    _publish(fleet, "liar", 20 * 3600, interval=1e9)  # an interval is believed up to 6 hours
    _publish(fleet, "fast", 20 * 60, interval=1)
    _publish(fleet, "hourly", 50 * 60, period=3600)  # --heartbeat-minutes 60: presence hourly
    code, report = _status(fleet, capsys)
    assert _row(report, "slow")["state"] == LIVE and _row(report, "slow")["stale_limit"] == 1800
    assert _row(report, "hourly")["state"] == LIVE and _row(report, "hourly")["stale_limit"] == 3 * 3600
    assert _row(report, "liar")["state"] == STALE and _row(report, "liar")["level"] == WARNING
    assert _row(report, "fast")["state"] == STALE and _row(report, "fast")["stale_limit"] == 900
    assert code == 1


def test_presence_on_the_fallback_branch_is_read(tmp_path, capsys):
    """A host that refuses refs/fleet/* gets the branch fleet-state/<server> (PROTOCOL.md)."""
    fleet = _fleet(tmp_path)
    git(fleet.clone("build1"), "config", "fleet.build1.stateref", "branch")
    _publish(fleet, "build1", 60, activity="on the fallback")
    assert git(fleet.origin, "for-each-ref", "--format=%(refname)").splitlines() == [
        "refs/heads/fleet-state/build1", "refs/heads/main"]
    code, report = _status(fleet, capsys)
    assert code == 0 and _row(report, "build1")["presence"]["activity"] == "on the fallback"


def test_remote_that_cannot_be_read_is_unknown(tmp_path):
    fleet = _fleet(tmp_path)
    viewer = _viewer(fleet)
    git(viewer, "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    proc = run_script("fleet_status.py", "--repo", str(viewer))
    assert proc.returncode == 3, proc.stderr
    # Nagios reads a plugin's first line on stdout: the status line goes there.
    assert proc.stdout.startswith("FLEET UNKNOWN - cannot read the fleet: ") and proc.stderr == ""
    assert len(proc.stdout.strip().splitlines()) == 1
    proc = run_script("fleet_status.py", "--repo", str(viewer), "--json")
    assert proc.returncode == 3 and json.loads(proc.stdout)["status"] == "unknown"
    assert json.loads(proc.stdout)["summary"].startswith("FLEET UNKNOWN - ")
    proc = run_script("fleet_status.py", "--repo", str(viewer), "--html", str(tmp_path / "page.html"), "-q")
    assert proc.returncode == 3 and proc.stdout == "" and proc.stderr.startswith("FLEET UNKNOWN - ")


def test_bad_usage_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fleet_status.main(["--stale-after", "soon"])
    assert exc.value.code == 2 and "invalid duration" in capsys.readouterr().err
    assert fleet_status.main(["--repo", str(tmp_path / "nowhere")]) == 2
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("4h") == 14400
    assert parse_duration("2d") == 172800 and parse_duration("1.5h") == 5400


# --------------------------------------------------------------------------- what it reads and costs


@pytest.mark.parametrize("reached", ["by a path", "over the network"])
def test_one_look_fetches_the_branch_and_the_state_refs_and_reads_only_the_hot_mailbox(tmp_path, reached, request):
    fleet = _fleet(tmp_path, _msg("m1", "code2", "build1", "hello", 60))
    # A broken archive file: status never reads the archive, so it cannot notice.
    _commit(fleet, {"coordination/archive/messages-2020-01.json": b"<<<<<<< not json"})
    _publish(fleet, "code2")
    _publish(fleet, "build1")
    viewer = _viewer(fleet)
    by_path = reached == "by a path"
    if not by_path:
        git(viewer, "remote", "set-url", "origin", request.getfixturevalue("git_daemon").url("origin.git"))

    def look(moved: bool) -> Dict[str, int]:
        trace = tmp_path / "trace.log"
        if trace.exists():
            trace.unlink()
        proc = run_script("fleet_status.py", "--repo", str(viewer), "--json", env={"GIT_TRACE": str(trace)})
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        counts: Dict[str, int] = {}
        for name in re.findall(r"trace: built-in: git (\S+)", trace.read_text(errors="replace")):
            counts[name] = counts.get(name, 0) + 1
        # By a path (StateStore._mirror_by_path): the remote's refs read from its files, and one
        # fetch when something moved. Over the network (StateStore.mirror_fleet): the branch's
        # fetch, and a listing of the remote followed, when state refs moved, by a fetch of those.
        expected = (int(moved), 0) if by_path else (1 + moved, 1)
        assert (counts.get("fetch", 0), counts.get("ls-remote", 0)) == expected, counts
        assert "maintenance" not in counts and "gc" not in counts  # nothing for git's gc to do yet
        counts["servers with state"] = sum(1 for row in json.loads(proc.stdout)["servers"] if row["presence"])
        return counts

    assert look(moved=True)["servers with state"] == 2
    idle = look(moved=False)  # no state ref moved: over the network, the branch's fetch only
    assert idle.get("cat-file", 0) <= 1 and idle["servers with state"] == 2
    _publish(fleet, "build1", 1)
    assert look(moved=True)["servers with state"] == 2
    # A state ref deleted on the remote is no longer read: the listing says so, its mirror goes.
    git(fleet.origin, "update-ref", "-d", "refs/fleet/build1")
    assert look(moved=False)["servers with state"] == 1
    assert run_git(viewer, "rev-parse", "-q", "--verify", "refs/fleet/build1", check=False).returncode != 0


def test_bad_state_ref_and_corrupt_mailbox_are_reported_not_fatal(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    _publish(fleet, "code2")
    # build1's state ref holds garbage: ignored with a warning, the rest of the fleet is shown.
    blob = run_git(fleet.origin, "hash-object", "-w", "--stdin", input=b"[" * 5000).stdout.decode().strip()
    tree = run_git(fleet.origin, "mktree", input=f"100644 blob {blob}\tstate.json\n".encode()).stdout.decode().strip()
    commit = run_git(fleet.origin, "commit-tree", tree, "-m", "garbage").stdout.decode().strip()
    git(fleet.origin, "update-ref", "refs/fleet/build1", commit)
    code, report = _status(fleet, capsys)
    assert code == 1 and _row(report, "code2")["state"] == LIVE
    assert _row(report, "build1")["state"] == NEVER_SEEN
    assert any("state ref of build1 ignored" in p["text"] for p in report["problems"])
    # A mailbox that does not parse stops every send: critical, and presence is still shown.
    _commit(fleet, {"coordination/messages.json": b'{"messages": [\n<<<<<<< HEAD\n'})
    code, report = _status(fleet, capsys)
    assert code == 2 and _row(report, "code2")["state"] == LIVE
    assert any("--repair" in p["text"] and p["level"] == CRITICAL for p in report["problems"])


# --------------------------------------------------------------------------- the roster


@pytest.mark.parametrize("raw, problem", [
    (b"not json", "does not parse"),
    (b"[" * 100 + b"]" * 100, "nests deeper"),
    (b'{"version": 1, "servers": 5}', "is not"),
    (b'{"servers": [{"id": "a b"}, {"id": "ok1"}, "x"]}', "2 entries skipped"),
    (b'{"servers": ["' + b"x" * 300000 + b'"]}', "bytes, more than"),
])
def test_a_bad_roster_is_a_warning_not_a_crash(raw, problem):
    roster = parse_roster(raw)
    assert roster.present and problem in (roster.problem or "")
    assert list(roster.servers) == (["ok1"] if b"ok1" in raw else [])


def test_bad_roster_end_to_end(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    _commit(fleet, {ROSTER_PATH: b"{oops"})
    _publish(fleet, "code2")
    code, report = _status(fleet, capsys)
    assert code == 1 and report["roster"]["problem"] and _row(report, "code2")["state"] == LIVE


def test_send_warns_about_a_recipient_the_roster_does_not_name(tmp_path):
    fleet = _fleet(tmp_path, roster=[{"id": "code2"}, {"id": "build1"}])
    sender = fleet.clone("code2")
    typo = run_script("send_message.py", "hello", "--to", "biuld1", "--repo", str(sender), "--from", "code2")
    assert typo.returncode == 0, typo.stderr
    assert typo.stderr.strip() == ("send_message: warning: --to biuld1: not in the roster "
                                   "coordination/servers.json; sending anyway")
    fine = run_script("send_message.py", "hello", "--to", "build1", "--repo", str(sender), "--from", "code2")
    everyone = run_script("send_message.py", "hello", "--repo", str(sender), "--from", "code2")
    assert fine.returncode == everyone.returncode == 0 and fine.stderr == everyone.stderr == ""
    assert [m["to"] for m in fleet.remote_messages()] == ["biuld1", "build1", "all"]


def test_send_without_roster_does_not_warn(fleet):
    sender = fleet.clone("code2")
    proc = run_script("send_message.py", "hello", "--to", "anyone", "--repo", str(sender), "--from", "code2")
    assert proc.returncode == 0 and proc.stderr == ""


# --------------------------------------------------------------------------- terminal


def test_terminal_table_is_aligned_urgent_first_and_plain_when_piped(tmp_path):
    fleet = _hostile_fleet(tmp_path)
    _publish(fleet, "win1", 40 * 60)
    viewer = _viewer(fleet)
    proc = run_script("fleet_status.py", "--repo", str(viewer))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("FLEET WARNING - 3 servers: 2 live, 1 stale")
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVER"))
    rows = lines[header + 1:header + 4]
    assert [r.split()[0] for r in rows] == ["win1", "build1", "code2"]  # stale, then oldest unread
    for column in ("STATE", "SEEN", "UNREAD", "ACKS"):
        at = lines[header].index(column)
        assert all(r[at - 1] == " " and r[at] != " " for r in rows), column
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout  # plain, and mail made inert
    assert "\\x1b[2J" in proc.stdout
    assert any(line.startswith("stale: win1") for line in lines)
    # Colour on request, never with NO_COLOR.
    coloured = run_script("fleet_status.py", "--repo", str(viewer), env={"FORCE_COLOR": "1"})
    assert "\x1b[" in coloured.stdout
    plain = run_script("fleet_status.py", "--repo", str(viewer), env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b" not in plain.stdout


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained_and_everything_from_mail_is_escaped(tmp_path, capsys):
    fleet = _hostile_fleet(tmp_path)
    page = tmp_path / "www" / "index.html"
    assert fleet_status.main(["--repo", str(_viewer(fleet)), "--html", str(page), "-q"]) == 0
    assert capsys.readouterr().out == ""
    text = page.read_text(encoding="utf-8")
    assert "default-src 'none'; style-src 'unsafe-inline'; img-src data:" in text
    assert "<script" not in text and "<img" not in text and "<b " not in text
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;" in text
    assert not re.search(r"<[^>]*\s(src|href)\s*=", text) and "http://" not in text and "https://" not in text
    assert text.count('<article class="c') == 2 and text.count("<svg") == 3  # 2 cards + the chart
    assert "Latest threads" in text and "unread by build1" in text
    assert "\x1b" not in text and "x" * 100 not in text  # inert, and bounded
    if os.name == "posix":
        assert page.stat().st_mode & 0o777 == 0o644
    assert len(text.encode()) < 30_000


def _chromium(page: Path, tmp_path: Path) -> "subprocess.CompletedProcess[str]":
    shot = tmp_path / "screenshot.png"
    argv = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,900",
            "--dump-dom", page.as_uri()]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True, encoding="utf-8", errors="replace", timeout=180)


def _console(stderr: str) -> list:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get "
                                               "install chromium; .ci/run installs it where apt exists)")
def test_page_renders_in_headless_chromium_and_no_script_from_mail_runs(tmp_path, capsys):
    fleet = _hostile_fleet(tmp_path)
    page = tmp_path / "index.html"
    fleet_status.main(["--repo", str(_viewer(fleet)), "--html", str(page), "-q"])
    proc = _chromium(page, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shot = tmp_path / "screenshot.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = proc.stdout
    assert "<title>Fleet status</title>" in dom and "pwned</title>" not in dom
    assert "<script" not in dom and "<img" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert _console(proc.stderr) == []  # nothing blocked, nothing failed
    # Defence in depth: even an unescaped script in this page would be refused by its CSP.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace("</main>", HOSTILE_SCRIPT + HOSTILE_IMG + "</main>"),
                      encoding="utf-8")
    proc = _chromium(broken, tmp_path)
    assert proc.returncode == 0 and "<title>Fleet status</title>" in proc.stdout
    assert any("Content Security Policy" in line for line in _console(proc.stderr))


def test_servers_named_only_in_mail_are_bounded():
    """A mailbox naming hundreds of made-up servers costs a bounded look and says so."""
    snap = fleet_status.Snapshot("main")
    many = [_msg(f"m{n}", "code2", f"ghost{n}", "to nobody", 60) for n in range(fleet_status.MAX_SERVERS + 50)]
    snap.mailbox = {"messages": many + [_msg("b1", "code2", "all", "to everyone", 60)]}
    report = fleet_status.build_report(snap)
    assert len(report["servers"]) == fleet_status.MAX_SERVERS
    assert any("more server ids" in p["text"] for p in report["problems"])
    # The broadcast waits for no server that only ever appears as a recipient.
    assert all(r["unread"]["count"] == 1 for r in report["servers"] if r["id"].startswith("ghost"))


def test_page_for_an_empty_fleet(tmp_path):
    report = fleet_status.build_report(fleet_status.Snapshot("main"))
    text = render_html(report)
    assert "No mail in the hot mailbox" in text and report["exit_code"] == 0
    assert fleet_status.render_terminal(report).startswith("FLEET OK - 0 servers")



def test_a_lost_mailbox_object_is_unknown_never_an_empty_mailbox(tmp_path):
    fleet = _fleet(tmp_path, _msg("m1", "build1", "code2", "waiting for you", 60))
    viewer = _viewer(fleet)
    blob = git(viewer, "rev-parse", "origin/main:coordination/messages.json")
    (viewer / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    proc = run_script("fleet_status.py", "--repo", str(viewer), "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["summary"].startswith("FLEET UNKNOWN - ") and proc.stderr == ""


def test_a_state_file_over_the_bound_is_left_out_unread(tmp_path, capsys):
    from fleet_state import MAX_STATE_BYTES, REF_PREFIX

    fleet = _fleet(tmp_path)
    _publish(fleet, "code2")
    _publish(fleet, "build1")
    # build1's state ref now holds a state file one byte over the bound: never read into memory.
    blob = run_git(fleet.origin, "hash-object", "-w", "--stdin",
                   input=b" " * (MAX_STATE_BYTES + 1)).stdout.decode().strip()
    tree = run_git(fleet.origin, "mktree", input=f"100644 blob {blob}\tstate.json\n".encode()).stdout.decode().strip()
    commit = run_git(fleet.origin, "commit-tree", tree, "-m", "huge").stdout.decode().strip()
    git(fleet.origin, "update-ref", REF_PREFIX + "build1", commit)
    code, report = _status(fleet, capsys)
    assert code == 1 and _row(report, "code2")["state"] == LIVE
    assert _row(report, "build1")["state"] == NEVER_SEEN
    assert any("state ref of build1 ignored" in p["text"] and f"more than the {MAX_STATE_BYTES:,}" in p["text"]
               for p in report["problems"])


def test_a_mailbox_over_the_bound_is_critical(tmp_path, capsys, monkeypatch):
    import fleet_git

    fleet = _fleet(tmp_path, _msg("m1", "build1", "code2", "waiting for you", 60))
    _publish(fleet, "code2")
    monkeypatch.setattr(fleet_git, "MAX_OBJECT_BYTES", 100)
    code, report = _status(fleet, capsys)
    assert code == 2 and _row(report, "code2")["state"] == LIVE
    assert any("--repair" in p["text"] and "more than the 100" in p["text"] and p["level"] == CRITICAL
               for p in report["problems"])


@pytest.mark.parametrize("case_blind", [False, True])
def test_a_fleet_crowded_with_state_refs_is_read_up_to_the_bound_named_servers_first(tmp_path, capsys,
                                                                                      monkeypatch, case_blind):
    """Ephemeral servers leave their state refs behind, and any member can push more: a look
    reads at most MAX_STATE_SERVERS servers' refs, the roster's and the mailbox's first, and
    says how many it left out. Where refs are fetched by name (case-blind), the bound applies
    to the fetch too, and the named servers' refs are fetched once the branch names them, even
    after an earlier look filled the clone with the crowd."""
    import fleet_state

    named = ("zz-code", "zz-build", "zz-roster", "zz-reader", "zz-mixed")
    fleet = _fleet(tmp_path, _msg("m1", "zz-build", "zz-code", "hello", 60, read_by=["zz-reader"]),
                   _msg("m2", "zz-build", ["all", "zz-mixed"], "to everyone", 60),
                   roster=[{"id": "zz-roster"}])
    _publish(fleet, "crowd")
    crowd_state_refs(fleet, "crowd", (f"ghost{n:02d}" for n in range(20)))
    if case_blind:
        git(_viewer(fleet), "config", "core.ignorecase", "true")
        StateStore(Clone(_viewer(fleet))).mirror_fleet()  # a look that mirrored the crowd alone
    for server in named:
        _publish(fleet, server)
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 12)
    monkeypatch.setattr(fleet_report, "MAX_SERVERS", 9)  # rows shown: a crowd must not fill them
    code, report = _status(fleet, capsys)
    for server in named:  # they sort after the crowd, and are read and shown
        assert _row(report, server)["state"] == LIVE
    read = {row["id"] for row in report["servers"] if row["state"] != NEVER_SEEN}
    assert read == {*named, "crowd", *(f"ghost{n:02d}" for n in range(3))}
    assert any("state refs of 26 servers; 14 of them are not read" in p["text"] for p in report["problems"])
    assert any("3 more server ids (from state refs and the mailbox) not shown" in p["text"]
               for p in report["problems"])
    assert code == 1


@pytest.mark.parametrize("case_blind", [False, True])
def test_mail_naming_a_crowd_cannot_hide_a_roster_servers_state(tmp_path, monkeypatch, case_blind):
    """Anyone can send mail naming many servers and push refs for them: the roster's servers are
    read before any server the mailbox names."""
    import fleet_state
    from fleet_report import take_snapshot

    fakes = [f"aa{n:02d}" for n in range(5)]
    fleet = _fleet(tmp_path, _msg("m1", "aa00", fakes, "hello", 60), roster=[{"id": "zz-victim"}])
    _publish(fleet, "zz-victim")
    crowd_state_refs(fleet, "zz-victim", fakes)
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 3)
    if case_blind:
        git(_viewer(fleet), "config", "core.ignorecase", "true")
    snap = take_snapshot(Clone(_viewer(fleet)))
    assert "zz-victim" in snap.state_servers and snap.states["zz-victim"].presence_time() is not None
    assert any("3 of them are not read (the roster's first" in text for _, text in snap.problems)


# --------------------------------------------------------------------------- retired servers


def test_a_retired_server_is_waited_on_by_nobody_until_it_comes_back(tmp_path, capsys):
    fleet = _fleet(
        tmp_path,
        _msg("m1", "code2", "all", "Freeze at 18:00", 5 * 3600),
        _msg("m2", "code2", "ci-7", "Rerun job 12", 5 * 3600, ack_required=True),
    )
    _publish(fleet, "code2", 5, read=[("m1", "code2")])
    _publish(fleet, "build1", 5, read=[("m1", "code2")])
    _publish(fleet, "ci-7", 2 * 86400)  # an ephemeral runner, gone two days ago

    code, report = _status(fleet, capsys)  # without a roster, a server that published presence is expected
    assert code == 2 and _row(report, "ci-7")["state"] == STALE and _row(report, "ci-7")["level"] == CRITICAL
    assert [t["unread_by"] for t in report["threads"] if t["root"] == "m1"] == [["ci-7"]]

    proc = run_script("message_monitor.py", "--repo", str(fleet.clone("ops")), "--server", "ci-7", "--retire")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ci-7 retired: nobody waits for it")
    retired = fleet.state("ci-7")["retired"]
    assert retired["presence"] == fleet.state("ci-7")["presence"]["timestamp"]  # its last presence stays

    code, report = _status(fleet, capsys)
    ci7 = _row(report, "ci-7")
    assert code == 0 and report["status"] == OK, report["summary"]
    assert ci7["state"] == "retired" and ci7["level"] == OK and ci7["retired"] and ci7["reasons"] == []
    # Its own mail is shown, never overdue; the broadcast no longer waits for it.
    assert ci7["unread"]["count"] == 1 and not ci7["unread"]["overdue"]
    assert ci7["acks_owed"]["count"] == 1 and not ci7["acks_owed"]["overdue"]
    assert [t["unread_by"] for t in report["threads"] if t["root"] == "m1"] == [[]]
    assert report["servers"][-1]["id"] == "ci-7" and report["counts"]["retired"] == 1
    assert "1 retired" in report["summary"] and report["stale"] == []
    page = render_html(report)
    assert '<p class="st retired">retired</p>' in page and ", 1 retired" in page

    # A roster that still names it: a warning, with the reason.
    _commit(fleet, {ROSTER_PATH: json.dumps({"version": 1, "servers": [
        {"id": "code2"}, {"id": "build1"}, {"id": "ci-7"}]}).encode()})
    code, report = _status(fleet, capsys)
    assert code == 1 and _row(report, "ci-7")["reasons"] == ["retired, still in the roster"]

    # A monitor that starts again under the id brings it back with its first presence.
    proc = run_script("message_monitor.py", "--repo", str(fleet.clones["ci-7"]), "--server", "ci-7",
                      "--once", "--no-auto-reply", "--mark-read", "never")
    assert proc.returncode == 0, proc.stderr
    code, report = _status(fleet, capsys)
    assert _row(report, "ci-7")["state"] == LIVE and report["counts"]["retired"] == 0
    assert "retired" not in fleet.state("ci-7")  # its own write dropped the record
    # A --once run's presence is as live as any (cron runs it every minute): refused until stale.
    proc = run_script("message_monitor.py", "--repo", str(fleet.clones["ops"]), "--server", "ci-7", "--retire")
    assert proc.returncode == 2 and "ci-7 looks live" in proc.stderr


def test_retire_writes_no_ref_for_an_id_nothing_names_and_says_when_the_server_looks_live(tmp_path, capsys):
    fleet = _fleet(tmp_path, _msg("m1", "code2", "build1", "hello", 60),
                   _msg("m2", "code2", "biuld2", "to a typo", 5 * 3600))
    _publish(fleet, "build1", 30)
    ops = fleet.clone("ops")
    before = git(fleet.origin, "for-each-ref", "refs/fleet/")

    proc = run_script("message_monitor.py", "--repo", str(ops), "--server", "nobody1", "--retire")
    assert proc.returncode == 0 and "nobody1 has no state ref and no mail names it" in proc.stdout
    assert git(fleet.origin, "for-each-ref", "refs/fleet/") == before  # no ref for a server that never was

    # An id only mail names (a typo'd recipient): retiring it lets its mail go.
    code, report = _status(fleet, capsys)
    assert _row(report, "biuld2")["state"] == NEVER_SEEN and _row(report, "biuld2")["level"] == WARNING
    assert run_script("message_monitor.py", "--repo", str(ops), "--server", "biuld2", "--retire").returncode == 0
    code, report = _status(fleet, capsys)
    assert _row(report, "biuld2")["state"] == "retired" and _row(report, "biuld2")["level"] == OK

    proc = run_script("message_monitor.py", "--repo", str(ops), "--server", "build1", "--retire", "--once")
    assert proc.returncode == 2 and "--once" in proc.stderr

    # A server that looks live is not retired: its mail would stop waiting while it still reads.
    before = git(fleet.origin, "for-each-ref", "refs/fleet/")
    proc = run_script("message_monitor.py", "--repo", str(ops), "--server", "build1", "--retire")
    assert proc.returncode == 2 and "build1 looks live (presence 3" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert git(fleet.origin, "for-each-ref", "refs/fleet/") == before
    # Once its monitor stopped cleanly (a CI job's teardown), it is.
    _publish(fleet, "build1", 2, activity="stopped")
    proc = run_script("message_monitor.py", "--repo", str(ops), "--server", "build1", "--retire")
    assert proc.returncode == 0, proc.stderr
    code, report = _status(fleet, capsys)
    assert _row(report, "build1")["state"] == "retired"


def test_retire_refuses_a_server_that_older_tools_show_alive(tmp_path):
    """No state ref, but a fresh <server>/heartbeat.json of the older tools and mail naming it:
    it is running; retiring it would let the archive move its mail."""
    fleet = _fleet(tmp_path, _msg("m1", "code2", "legacy1", "for the old box", 5 * 3600))
    _commit(fleet, {"legacy1/heartbeat.json": json.dumps({"server": "legacy1", "timestamp": _iso(60)}).encode()})
    proc = run_script("message_monitor.py", "--repo", str(fleet.clone("ops")), "--server", "legacy1", "--retire")
    assert proc.returncode == 2 and "legacy1 looks live (its legacy1/heartbeat.json is 6" in proc.stderr, proc.stderr
    assert git(fleet.origin, "for-each-ref", "refs/fleet/") == ""


def test_retire_on_a_host_that_refuses_custom_refs_writes_the_fallback_branch(tmp_path, capsys):
    fleet = _fleet(tmp_path, _msg("m1", "code2", "biuld2", "to a typo", 5 * 3600))
    refuse_custom_refs(fleet)
    proc = run_script("message_monitor.py", "--repo", str(fleet.clone("ops")), "--server", "biuld2", "--retire")
    assert proc.returncode == 0, proc.stderr
    assert git(fleet.origin, "for-each-ref", "--format=%(refname)", "refs/").split() == [
        "refs/heads/fleet-state/biuld2", "refs/heads/main"]
    assert _row(_status(fleet, capsys)[1], "biuld2")["state"] == "retired"


def test_retire_with_the_remote_down_writes_nothing(tmp_path):
    fleet = _fleet(tmp_path, _msg("m1", "code2", "build1", "hello", 60))
    _publish(fleet, "build1", 30 * 86400)
    ops = fleet.clone("ops")
    tip = git(fleet.origin, "rev-parse", "refs/fleet/build1")
    git(ops, "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    proc = run_script("message_monitor.py", "--repo", str(ops), "--server", "build1", "--retire")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert git(fleet.origin, "rev-parse", "refs/fleet/build1") == tip


def test_a_presence_stamped_far_ahead_is_a_warning_not_ok(tmp_path, capsys):
    fleet = Fleet(tmp_path)
    b1 = fleet.clone("build1")
    ahead = iso_utc(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    presence = presence_doc(started=time.time(), interval=10, healthy=True)
    presence["timestamp"] = ahead
    StateStore(Clone(b1)).update("build1", StateChange(presence=presence))
    code, report = _status(fleet, capsys)
    texts = [p["text"] for p in report["problems"]]
    assert code == 1 and any("build1's presence is stamped" in t and "ahead" in t for t in texts), texts


def test_a_receipt_list_of_any_length_is_read_whole_and_once():
    """One member's 100,000-name list made a look (every message by every server) take minutes;
    a fleet of many CI runners has lists past a thousand names, read whole."""
    from fleet_mailbox import is_handled_by, mark_handled

    crowd = [f"ci-{n}" for n in range(100_000)]
    msg = {"id": "m1", "from": "build1", "to": "all", "read_by": crowd + ["code2"]}
    assert is_handled_by(msg, "code2") and not is_handled_by(msg, "code3")
    doc = {"messages": [msg]}
    assert mark_handled(doc, "code2", [("m1", "build1")]) == 0  # already there: nothing written
    assert mark_handled(doc, "code3", [("m1", "build1")]) == 1 and is_handled_by(msg, "code3")
