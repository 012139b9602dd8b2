"""Tests for structured_log: JSON lines, redaction, inert console output, rotation, sharing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import PYTHON_DIR, QUIRKY, git

from structured_log import (
    ConsoleFormatter,
    JsonFormatter,
    StructuredFileHandler,
    StructuredLogger,
    console_safe,
    preview,
    redact,
    sanitize,
    setup_logging,
    teardown_logging,
)

TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
CONSOLE_RE = re.compile(r"^\d{2}:\d{2}:\d{2} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FIXTURE_SECRET = "Hunter2-secret"
FIXTURE_TOKEN = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"

# (text, the secret that must disappear)
SECRETS = [
    ("clone https://deploy:s3cretTok3n@github.com/org/build.git", "s3cretTok3n"),
    ("remote https://ghp_ABCDEFGHIJKLMNOP1234@github.com/x", "ghp_ABCDEFGHIJKLMNOP1234"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 used", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("oauth gho_abcdefghijklmnopqrstuvwxyz0123456789", "gho_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("user ghu_abcdefghijklmnopqrstuvwxyz0123456789", "ghu_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("server ghs_abcdefghijklmnopqrstuvwxyz0123456789", "ghs_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("refresh ghr_abcdefghijklmnopqrstuvwxyz0123456789", "ghr_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("fine-grained github_pat_11AAAAAAA0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGH",
     "github_pat_11AAAAAAA0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGH"),
    ("gitlab glpat-AbCdEfGhIjKlMnOpQrSt done", "glpat-AbCdEfGhIjKlMnOpQrSt"),
    ("password=hunter2x", "hunter2x"),
    ("PASSWORD: Zebra99", "Zebra99"),
    ("passwd = swordfish1", "swordfish1"),
    ("pwd=qwerty123", "qwerty123"),
    ("token: tkn-12345", "tkn-12345"),
    ("client_secret=cl13nt", "cl13nt"),
    ("Jira password: Hunter2-secret", "Hunter2-secret"),
    ('{"api_key": "key with spaces"}', "key with spaces"),
    ("apikey=ak-777", "ak-777"),
    ("AWS_ACCESS_KEY='AKIA0000'", "AKIA0000"),
    ("secret: 'quoted value'", "quoted value"),
    ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
    ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ('curl -H "Authorization: token tok42"', "tok42"),
    ("sent Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9.payload.sig"),
]

HOSTILE = ("red \x1b[31mALERT\x1b[0m title \x1b]0;pwned\x07 link \x1b]8;;http://x\x1b\\here\x1b]8;;\x1b\\ "
           "bare \x1b c1 \x9b2J bell \x07 bs \x08 del \x7f nul \x00 bidi \u202eevil\u202c iso \u2066x\u2069 "
           "cr \r lf \n tab \t end")
UNSAFE_CHARS = ["\x1b", "\x07", "\x08", "\x7f", "\x00", "\x9b", "\u202e", "\u202c", "\u2066", "\u2069",
                "\r", "\t"]


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clean_logging():
    yield
    teardown_logging()


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "Build"
    path.mkdir()
    return path


def read_lines(path: Path) -> List[Dict[str, object]]:
    lines = path.read_bytes().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines]


def assert_record_shape(entry: Dict[str, object]) -> None:
    assert set(entry) == {"timestamp", "level", "message", "server", "metadata"}
    assert TIMESTAMP_RE.match(str(entry["timestamp"])), entry["timestamp"]
    assert entry["level"] in LEVELS
    assert isinstance(entry["message"], str)
    assert isinstance(entry["metadata"], dict)
    assert "logger" in entry["metadata"]


def quirky_messages() -> List[dict]:
    data = json.loads(QUIRKY.read_text(encoding="utf-8"))
    return [m for m in data["messages"] if isinstance(m, dict)]


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PYTHON_DIR)
    return env


# --------------------------------------------------------------------------- the JSON file


def test_every_line_is_json_with_the_five_fields(repo):
    stream = io.StringIO()
    root = setup_logging(repo, "Code2", stream=stream)
    assert root is logging.getLogger()
    logging.getLogger("fleet_git").debug("fetched %s", "origin", extra={"metadata": {"ms": 12}})
    logging.getLogger("message_monitor").info("cycle done", extra={"metadata": {"new": 2, "ids": ["a"]}})
    logging.getLogger("x").warning("two\nlines")
    logging.getLogger("x").error("failed")
    logging.getLogger("x").critical("very bad")
    logging.getLogger("x").log(5, "below debug")  # a custom level still maps to a standard name
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("fleet_mailbox").exception("parse failed")

    path = repo / "code2" / "logs" / "structured.log"
    entries = read_lines(path)
    assert len(entries) == 6  # level 5 is below the file handler's DEBUG
    for entry in entries:
        assert_record_shape(entry)
        assert entry["server"] == "code2"
    assert [e["level"] for e in entries] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "ERROR"]
    assert entries[0]["message"] == "fetched origin"
    assert entries[0]["metadata"] == {"ms": 12, "logger": "fleet_git"}
    assert entries[1]["metadata"] == {"new": 2, "ids": ["a"], "logger": "message_monitor"}
    assert entries[2]["message"] == "two\\nlines"  # a newline is a visible escape, not a line break
    assert "ValueError: boom" in entries[5]["metadata"]["exception"]
    assert "Traceback" in entries[5]["metadata"]["exception"]
    # ASCII on disk, one physical line per record.
    raw = path.read_bytes()
    assert raw.count(b"\n") == 6
    raw.decode("ascii")


def test_custom_level_maps_to_standard_name():
    record = logging.LogRecord("x", 25, __file__, 1, "between", None, None)
    entry = json.loads(JsonFormatter("build1").format(record))
    assert entry["level"] == "INFO"
    assert entry["server"] == "build1"


def test_non_ascii_and_escapes_survive_json_round_trip(repo):
    setup_logging(repo, "code2", console=False)
    text = "Unicode \u2713 \u2192 \u00e9\u00e8 \u4f60\u597d \U0001f680 \x1b[31m \u2028"
    logging.getLogger("x").info(text)
    (entry,) = read_lines(repo / "code2" / "logs" / "structured.log")
    # Non-ASCII text survives; ESC and the line separator come back as visible escapes.
    assert entry["message"] == "Unicode \u2713 \u2192 \u00e9\u00e8 \u4f60\u597d \U0001f680 \\x1b[31m \\u2028"


def test_file_handler_only_when_repo_exists(tmp_path):
    missing = tmp_path / "nope"
    stream = io.StringIO()
    root = setup_logging(missing, "code2", stream=stream, console_level=logging.DEBUG)
    assert not missing.exists()
    assert not any(isinstance(h, StructuredFileHandler) for h in root.handlers)
    assert "does not exist" in stream.getvalue()

    root = setup_logging(None, "code2", stream=stream)
    assert not any(isinstance(h, StructuredFileHandler) for h in root.handlers)


def test_setup_is_idempotent_and_teardown_removes_handlers(repo):
    before = list(logging.getLogger().handlers)
    level_before = logging.getLogger().level
    stream = io.StringIO()
    setup_logging(repo, "code2", stream=stream)
    setup_logging(repo, "code2", stream=stream)
    root = logging.getLogger()
    ours = [h for h in root.handlers if h not in before]
    assert len(ours) == 2
    logging.getLogger("fleet_git").info("once")
    assert stream.getvalue().count("once") == 1
    assert len(read_lines(repo / "code2" / "logs" / "structured.log")) == 1
    teardown_logging()
    assert list(root.handlers) == before
    assert root.level == level_before


def test_log_folder_is_git_excluded(fleet):
    clone = fleet.clone("code2")
    setup_logging(clone, "code2", console=False)
    logging.getLogger("fleet_git").info("hello")
    teardown_logging()
    assert (clone / "code2" / "logs" / "structured.log").is_file()
    assert "/code2/logs/" in (clone / ".git" / "info" / "exclude").read_text()
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("text,secret", SECRETS, ids=[s[1][:12] for s in SECRETS])
def test_redact_masks_each_kind(text, secret):
    result = redact(text)
    assert secret not in result
    assert "***" in result
    assert redact(result) == result


@pytest.mark.parametrize("text,secret", SECRETS, ids=[s[1][:12] for s in SECRETS])
def test_secrets_redacted_in_file_and_console(repo, text, secret):
    stream = io.StringIO()
    setup_logging(repo, "code2", stream=stream)
    log = logging.getLogger("fleet_git")
    log.warning(text, extra={"metadata": {"detail": text, "nested": {"list": [text, 3]}}})
    try:
        raise RuntimeError(text)
    except RuntimeError:
        log.exception("failure")
    raw = (repo / "code2" / "logs" / "structured.log").read_text(encoding="utf-8")
    assert secret not in raw
    assert secret not in json.dumps(read_lines(repo / "code2" / "logs" / "structured.log"))
    assert "***" in raw
    assert secret not in stream.getvalue()
    assert "***" in stream.getvalue()


def test_metadata_values_under_secret_keys_are_masked():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.metadata = {"password": "plain", "github_token": "abc", "client_secret": 42,
                       "token_file": "/etc/t", "ok": True, "items": ({"apiKey": "z"},)}
    entry = json.loads(JsonFormatter("code2").format(record))
    meta = entry["metadata"]
    assert meta["password"] == "***"
    assert meta["github_token"] == "***"
    assert meta["client_secret"] == "***"
    assert meta["token_file"] == "/etc/t"
    assert meta["ok"] is True
    assert meta["items"] == [{"apiKey": "***"}]


def test_fixture_secret_body_is_redacted(repo):
    (message,) = [m for m in quirky_messages() if m.get("subject") == "Credentials rotated"]
    body = message["body"]
    assert FIXTURE_SECRET in body and FIXTURE_TOKEN in body
    for rendered in (redact(body), preview(body), preview(body, 40)):
        assert FIXTURE_SECRET not in rendered
        assert FIXTURE_TOKEN not in rendered
        assert "Hunter2" not in rendered

    stream = io.StringIO()
    setup_logging(repo, "code2", stream=stream)
    logging.getLogger("message_monitor").info("new message: %s", body,
                                              extra={"metadata": {"body": body, "id": message["id"]}})
    raw = (repo / "code2" / "logs" / "structured.log").read_text(encoding="utf-8")
    for output in (raw, stream.getvalue()):
        assert FIXTURE_SECRET not in output
        assert FIXTURE_TOKEN not in output
    assert "were rotated" in stream.getvalue()


def test_redaction_leaves_ordinary_text_alone():
    for text in ("Build 4411 is green on ExternalNew.", "Please confirm you are online.",
                 "git@github.com:org/repo.git", "Ids are compared case-insensitively"):
        assert redact(text) == text


# --------------------------------------------------------------------------- sanitizing


def test_sanitize_makes_escape_sequences_visible_and_inert():
    result = sanitize(HOSTILE)
    for char in UNSAFE_CHARS + ["\n"]:
        assert char not in result
    assert "\\x1b[31mALERT" in result
    assert "\\x1b]0;pwned\\x07" in result
    assert "\\x9b2J" in result
    assert "\\u202eevil" in result
    assert "lf \\n tab \\t end" in result
    assert sanitize("plain \u4f60\u597d \U0001f680") == "plain \u4f60\u597d \U0001f680"


def test_sanitize_max_len_and_preview_truncate():
    assert sanitize("abcdef", max_len=6) == "abcdef"
    assert sanitize("abcdefg", max_len=6) == "abcde\u2026"
    # An escape is never cut in half.
    assert sanitize("ab\x1bcdef", max_len=6) == "ab\u2026"
    long_body = "word " * 100
    shown = preview(long_body)
    assert len(shown) == 120
    assert shown.endswith("\u2026")
    assert preview("short") == "short"
    assert "\n" not in preview("a\nb")


def test_console_line_is_one_inert_line_without_colour():
    stream = io.StringIO()
    setup_logging(None, "code2", stream=stream, color=False)
    logging.getLogger("message_monitor").warning(HOSTILE)
    try:
        raise KeyError("multi\nline")
    except KeyError:
        logging.getLogger("x").exception("with traceback")
    output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert CONSOLE_RE.match(line), line
    for char in UNSAFE_CHARS:
        assert char not in output
    assert " | " in lines[0]  # the message's newline
    assert "Traceback" in lines[1]


def test_hostile_message_through_a_real_pipe(repo):
    """A real process whose stderr is a pipe (isatty false) writes no ESC at all."""
    code = textwrap.dedent(f"""
        import logging, sys
        from structured_log import setup_logging
        setup_logging({str(repo)!r}, "code2")
        logging.getLogger("message_monitor").error({HOSTILE!r})
        logging.getLogger("message_monitor").info("plain")
    """)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"\x1b" not in proc.stderr
    assert b"\x07" not in proc.stderr
    lines = proc.stderr.decode("utf-8").splitlines()
    assert len(lines) == 2
    assert CONSOLE_RE.match(lines[0]) and lines[0].split()[1] == "ERROR"
    entries = read_lines(repo / "code2" / "logs" / "structured.log")
    # The file keeps the text with its control characters neutralised, as on the console.
    assert entries[0]["message"] == sanitize(HOSTILE)


# --------------------------------------------------------------------------- colour


def test_no_colour_when_stream_is_not_a_tty():
    stream = io.StringIO()
    setup_logging(None, "code2", stream=stream)
    logging.getLogger("x").error("failure")
    assert "\x1b" not in stream.getvalue()
    assert "failure" in stream.getvalue()


def test_colour_when_stream_is_a_tty():
    stream = TtyStringIO()
    setup_logging(None, "code2", stream=stream)
    logging.getLogger("x").error("failure \x1b[2J")
    logging.getLogger("x").info("fine")
    first, second = stream.getvalue().splitlines()
    assert first.startswith("\x1b[")
    assert first.endswith("\x1b[0m")
    assert "\\x1b[2J" in first  # the message's own escape stays inert inside the colour codes
    assert first.count("\x1b") == 2
    assert second.startswith("\x1b[") and first[:5] != second[:5]


def test_no_color_env_disables_colour(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    stream = TtyStringIO()
    setup_logging(None, "code2", stream=stream)
    logging.getLogger("x").error("failure")
    assert "\x1b" not in stream.getvalue()


def test_empty_no_color_does_not_disable_colour(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "")
    stream = TtyStringIO()
    setup_logging(None, "code2", stream=stream)
    logging.getLogger("x").error("failure")
    assert "\x1b[" in stream.getvalue()


def test_console_formatter_format():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    line = ConsoleFormatter().format(record)
    assert CONSOLE_RE.match(line)
    assert line.endswith(" INFO hello world")


# --------------------------------------------------------------------------- encodings


def test_console_safe_with_cp1252_and_fixture_subjects():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    texts = [m.get("subject") for m in quirky_messages() if isinstance(m.get("subject"), str)]
    texts += [m.get("body") for m in quirky_messages() if isinstance(m.get("body"), str)]
    assert any("\U0001f680" in t for t in texts)
    for text in texts:
        stream.write(console_safe(text + "\n", stream))
    stream.write(console_safe("lone surrogate \udc80\n", stream))
    stream.flush()
    written = stream.buffer.getvalue().decode("cp1252")
    assert "\\U0001f680" in written
    assert "\\u4f60\\u597d" in written
    assert "\u2713" not in written
    assert "\u00e9\u00e8" in written  # what cp1252 can show stays as it is


def test_console_handler_on_cp1252_stream_never_fails(capsys):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict")
    setup_logging(None, "code2", stream=stream)
    for message in quirky_messages():
        logging.getLogger("message_monitor").info("%s: %s", message.get("subject"), message.get("body"))
    stream.flush()
    assert "Logging error" not in capsys.readouterr().err
    written = stream.buffer.getvalue().decode("cp1252")
    assert "\\U0001f680" in written


def test_console_safe_without_encoding_keeps_text():
    assert console_safe("\u2713 \U0001f680", io.StringIO()) == "\u2713 \U0001f680"


# --------------------------------------------------------------------------- rotation and sharing


def test_rotation_keeps_the_bound(repo):
    max_bytes, backups = 4000, 3
    setup_logging(repo, "code2", console=False, max_bytes=max_bytes, backup_count=backups)
    log = logging.getLogger("fleet_git")
    for i in range(400):
        log.info("record %d %s", i, "x" * (i % 50))
    logs = repo / "code2" / "logs"
    files = sorted(p for p in logs.iterdir() if re.match(r"^structured\.log(\.\d+)?$", p.name))
    assert logs / "structured.log" in files
    assert len(files) <= backups + 1
    assert len(files) == backups + 1  # it did rotate
    for path in files:
        assert path.stat().st_size <= max_bytes
        for entry in read_lines(path):
            assert_record_shape(entry)
    # The newest record is in the live file.
    assert read_lines(logs / "structured.log")[-1]["message"].startswith("record 399 ")


def test_rotation_skipped_while_another_holder_has_the_lock(repo):
    from fleet_common import file_lock

    logs = repo / "code2" / "logs"
    setup_logging(repo, "code2", console=False, max_bytes=500, backup_count=2)
    log = logging.getLogger("fleet_git")
    with file_lock(logs / "structured.log.lock", timeout=5):
        for i in range(30):
            log.info("record %d", i)
        assert not (logs / "structured.log.1").exists()
    assert len(read_lines(logs / "structured.log")) == 30
    log.info("after")
    assert (logs / "structured.log.1").exists()
    assert read_lines(logs / "structured.log")[-1]["message"] == "after"


WRITER = textwrap.dedent("""
    import logging, os, sys, time
    from structured_log import setup_logging
    repo, name, count, max_bytes, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    setup_logging(repo, "code2", console=False, max_bytes=max_bytes, backup_count=3)
    log = logging.getLogger(name)
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(count):
        # Lines from a few bytes to tens of kilobytes, beyond any stream buffer.
        log.info("%s %d %s", name, i, "y" * ((i * 7919) % 20000), extra={"metadata": {"i": i}})
""")


def run_writers(repo: Path, tmp_path: Path, count: int, max_bytes: int) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(repo), name, str(count), str(max_bytes), str(go)],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("cli", "monitor")
    ]
    go.write_text("go")
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode("utf-8", "replace")
        assert b"Logging error" not in err


def test_two_processes_append_complete_lines(repo, tmp_path):
    count = 300
    run_writers(repo, tmp_path, count, max_bytes=0)  # no rotation: every record must be there
    entries = read_lines(repo / "code2" / "logs" / "structured.log")
    assert len(entries) == 2 * count
    for entry in entries:
        assert_record_shape(entry)
    for name in ("cli", "monitor"):
        seen = sorted(e["metadata"]["i"] for e in entries if e["metadata"]["logger"] == name)
        assert seen == list(range(count))


def test_two_processes_rotating_keep_lines_whole_and_files_bounded(repo, tmp_path):
    max_bytes = 100_000
    run_writers(repo, tmp_path, 300, max_bytes=max_bytes)
    logs = repo / "code2" / "logs"
    files = [p for p in logs.iterdir() if re.match(r"^structured\.log(\.\d+)?$", p.name)]
    assert 1 < len(files) <= 4
    for path in files:
        # A writer that could not take the lock appends one more line before someone rotates.
        assert path.stat().st_size <= 2 * max_bytes + 50_000
        for entry in read_lines(path):
            assert_record_shape(entry)


# --------------------------------------------------------------------------- seed API


def test_structured_logger_seed_api_writes_json_lines(tmp_path):
    path = tmp_path / "logs" / "structured.log"
    stream = io.StringIO()
    logger = StructuredLogger(path, "build1", stream=stream)
    logger.debug("d")
    logger.info("started", {"pid": 1})
    logger.warning("w %s 100%")
    logger.error("e", metadata={"password": "pw1", "detail": "token=abc123"})
    logger.critical("c")
    logger.close()
    entries = read_lines(path)
    assert [e["level"] for e in entries] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    for entry in entries:
        assert_record_shape(entry)
        assert entry["server"] == "build1"
    assert entries[1]["metadata"]["pid"] == 1
    assert entries[2]["message"] == "w %s 100%"
    assert entries[3]["metadata"]["password"] == "***"
    assert "abc123" not in path.read_text()
    console = stream.getvalue().splitlines()
    assert len(console) == 4  # DEBUG stays out of the console
    assert all(CONSOLE_RE.match(line) for line in console)


def test_structured_logger_default_path_from_build_repo_path(repo, monkeypatch):
    monkeypatch.setenv("BUILD_REPO_PATH", str(repo))
    logger = StructuredLogger(server_id="code2", console=False)
    logger.info("hello")
    logger.close()
    assert logger.log_path == repo / "code2" / "logs" / "structured.log"
    assert read_lines(logger.log_path)[0]["message"] == "hello"


def test_structured_logger_never_creates_a_missing_repo(tmp_path, monkeypatch):
    missing = tmp_path / "K:" / "Projects" / "Build"
    monkeypatch.setenv("BUILD_REPO_PATH", str(missing))
    stream = io.StringIO()
    logger = StructuredLogger(server_id="code2", stream=stream)
    logger.info("console only")
    logger.close()
    assert logger.log_path is None
    assert not (tmp_path / "K:").exists()
    assert "console only" in stream.getvalue()


def test_structured_logger_does_not_touch_root_logger(tmp_path):
    before = list(logging.getLogger().handlers)
    logger = StructuredLogger(tmp_path / "s.log", "code2", console=False)
    logger.info("x")
    logger.close()
    assert logging.getLogger().handlers == before


# --------------------------------------------------------------------------- bounds and neutralising


def test_every_string_of_a_json_line_is_bounded(repo):
    from structured_log import MAX_FIELD_CHARS, MAX_LINE_CHARS

    setup_logging(repo, "code2", console=False)
    huge_id, huge_from, huge_subject = "i" * 1_000_000, "f" * 1_000_000, "s" * 2_000_000
    logging.getLogger("message_monitor").info(
        "new message %s from %s: %s", huge_id, huge_from, huge_subject,
        extra={"metadata": {"id": huge_id, "from": huge_from, "to": ["code2"] * 50_000,
                            "nested": {"deeper": {"keys": {str(n): n for n in range(1000)}}},
                            "deep": [[[[[[[["x"]]]]]]]], "big": 10 ** 5000, "nan": float("nan")}})
    raw = (repo / "code2" / "logs" / "structured.log").read_text(encoding="ascii")
    assert raw.count("\n") == 1 and len(raw) < 8 * 1024
    (entry,) = read_lines(repo / "code2" / "logs" / "structured.log")
    assert entry["message"].startswith("new message iii")
    assert "(1000000 characters)" in entry["message"]  # each argument says how long it was
    assert len(entry["message"]) <= MAX_FIELD_CHARS + 40
    meta = entry["metadata"]
    assert meta["id"].startswith("iii") and meta["id"].endswith("\u2026 (1000000 characters)")
    assert len(meta["to"]) == 21 and meta["to"][-1] == "\u2026 +49980 more"
    assert meta["nested"]["deeper"]["keys"]["\u2026"] == "+980 more"
    assert meta["big"].startswith("<integer of") and meta["nan"] == "nan"
    assert len(raw) < MAX_LINE_CHARS


def test_a_line_with_many_long_metadata_strings_stays_under_the_line_bound(repo):
    from structured_log import MAX_LINE_CHARS

    setup_logging(repo, "code2", console=False)
    metadata = {f"k{n}": ["\x1b" * 5000] * 20 for n in range(20)}
    logging.getLogger("x").info("many", extra={"metadata": metadata})
    raw = (repo / "code2" / "logs" / "structured.log").read_text(encoding="ascii")
    assert len(raw) <= MAX_LINE_CHARS + 1
    (entry,) = read_lines(repo / "code2" / "logs" / "structured.log")
    assert entry["message"] == "many" and entry["metadata"]["logger"] == "x"


def test_every_string_value_is_neutralised(repo):
    setup_logging(repo, "code2", console=False)
    try:
        raise ValueError("bad \x1b[2J\nline")
    except ValueError:
        logging.getLogger("x").exception("msg \x1b]0;t\x07 %s", "arg\r\nsplit",
                                          extra={"metadata": {"subject": "s\x1b[31m\u202e",
                                                              "list": ["a\nb"], "k\x1b": 1}})
    (entry,) = read_lines(repo / "code2" / "logs" / "structured.log")
    strings = [entry["message"], entry["metadata"]["subject"], entry["metadata"]["list"][0],
               entry["metadata"]["exception"], *entry["metadata"]]
    for text in strings:
        for char in UNSAFE_CHARS + ["\n", "\u202e"]:
            assert char not in text, (char, text)
    assert entry["message"] == "msg \\x1b]0;t\\x07 arg\\r\\nsplit"
    assert entry["metadata"]["subject"] == "s\\x1b[31m\\u202e"
    assert "ValueError: bad \\x1b[2J\\nline" in entry["metadata"]["exception"]
    assert "k\\x1b" in entry["metadata"]


def test_long_traceback_keeps_its_end():
    from structured_log import MAX_TRACEBACK_CHARS

    try:
        raise RuntimeError("x" * 50_000 + " the end")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(JsonFormatter("code2").format(record))
    exception = entry["metadata"]["exception"]
    assert exception.endswith(" the end") and "characters)" in exception
    assert len(exception) <= MAX_TRACEBACK_CHARS + 40


def test_console_line_is_bounded():
    stream = io.StringIO()
    setup_logging(None, "code2", stream=stream, color=False)
    logging.getLogger("message_monitor").info("new message %s: %s", "i" * 1_000_000, "s\n" * 1_000_000)
    (line,) = stream.getvalue().splitlines()
    assert CONSOLE_RE.match(line) and len(line) < 4 * 1024
    assert "(1000000 characters)" in line and "(2000000 characters)" in line


def test_preview_of_a_huge_text_reads_only_its_start():
    assert preview("password: hunter2 " + "x" * 5_000_000, 30) == "password: *** " + "x" * 15 + "\u2026"


def test_one_long_argument_keeps_the_whole_field_several_share_it():
    from structured_log import MAX_FIELD_CHARS, record_message

    def message(*args: object) -> str:
        return record_message(logging.LogRecord("x", logging.INFO, __file__, 1, " ".join(["%s"] * len(args)),
                                                args, None))

    details = "git stderr: " + "e" * 5000
    assert message(details).startswith(details[:MAX_FIELD_CHARS - 40])
    shared = message("a" * 5000, "b" * 5000, "c" * 5000, 42)
    assert shared.count("(5000 characters)") == 3 and shared.endswith(" 42")
    assert "b" * (MAX_FIELD_CHARS // 3 - 40) in shared
    assert message("short", {"k": "v"}) == "short {'k': 'v'}"


# --------------------------------------------------------------------------- failing writes


READONLY_WRITER = textwrap.dedent("""
    import logging, sys
    from structured_log import StructuredFileHandler
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(StructuredFileHandler(sys.argv[1], "code2"))
    for i in range(5):
        logging.getLogger("x").info("record %d", i)
    print("done")
""")


def run_readonly_writer(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", READONLY_WRITER, str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=child_env(), timeout=60, text=True)


def assert_one_warning(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot write" in lines[0] and str(path) in lines[0]


def test_unwritable_log_file_warns_once_and_goes_on(tmp_path):
    not_a_folder = tmp_path / "logs"
    not_a_folder.write_text("a file where the log folder should be")
    path = not_a_folder / "structured.log"
    assert_one_warning(run_readonly_writer(path), path)


@pytest.mark.skipif(os.name == "nt" or (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="needs POSIX permissions that bind the user (root writes anyway)")
def test_read_only_log_folder_warns_once_and_goes_on(repo):
    logs = repo / "code2" / "logs"
    logs.mkdir(parents=True)
    logs.chmod(0o555)
    try:
        assert_one_warning(run_readonly_writer(logs / "structured.log"), logs / "structured.log")
    finally:
        logs.chmod(0o755)


# --------------------------------------------------------------------------- runtime files


def symlink_or_skip(link: Path, target: Path) -> None:
    try:
        link.symlink_to(target)
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot create symlinks")


def test_symlinked_log_file_is_moved_aside_never_written_through(repo, tmp_path):
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("alias ls='ls --color'\n")
    logs = repo / "code2" / "logs"
    logs.mkdir(parents=True)
    symlink_or_skip(logs / "structured.log", bashrc)
    setup_logging(repo, "code2", console=False)
    logging.getLogger("x").info("one")
    logging.getLogger("x").info("two")
    assert bashrc.read_text() == "alias ls='ls --color'\n"
    path = logs / "structured.log"
    assert path.is_file() and not path.is_symlink()
    (aside,) = [p for p in logs.iterdir() if p.name.startswith("structured.log.unsafe-")]
    assert aside.is_symlink()
    entries = read_lines(path)
    warnings = [e for e in entries if e["level"] == "WARNING"]
    assert len(warnings) == 1 and "symlink" in warnings[0]["message"]
    assert [e["message"] for e in entries if e["level"] == "INFO"] == ["one", "two"]


def test_dangling_symlink_is_not_created_through(repo, tmp_path):
    target = tmp_path / "elsewhere" / "created.txt"
    target.parent.mkdir()
    logs = repo / "code2" / "logs"
    logs.mkdir(parents=True)
    symlink_or_skip(logs / "structured.log", target)
    setup_logging(repo, "code2", console=False)
    logging.getLogger("x").info("one")
    assert not target.exists()
    assert (logs / "structured.log").is_file()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_or_folder_at_the_log_path_is_moved_aside(repo):
    logs = repo / "code2" / "logs"
    logs.mkdir(parents=True)
    os.mkfifo(logs / "structured.log")  # a writer opening it would block forever without a reader
    setup_logging(repo, "code2", console=False)
    logging.getLogger("x").info("after the fifo")
    assert (logs / "structured.log").is_file()
    (logs / "structured.log").rename(logs / "old.log")
    (logs / "structured.log").mkdir()
    logging.getLogger("x").info("after the folder")
    assert read_lines(logs / "structured.log")[-1]["message"] == "after the folder"
    assert len([p for p in logs.iterdir() if ".unsafe-" in p.name]) == 2


def test_rotation_never_writes_through_a_symlinked_backup(repo, tmp_path):
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("keep me\n")
    logs = repo / "code2" / "logs"
    logs.mkdir(parents=True)
    symlink_or_skip(logs / "structured.log.1", bashrc)
    setup_logging(repo, "code2", console=False, max_bytes=2000, backup_count=2)
    for i in range(100):
        logging.getLogger("x").info("record %d %s", i, "x" * 50)
    assert bashrc.read_text() == "keep me\n"
    for path in logs.iterdir():
        if re.match(r"^structured\.log(\.\d+)?$", path.name):
            assert not path.is_symlink()
            for entry in read_lines(path):
                assert_record_shape(entry)

