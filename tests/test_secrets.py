"""One secret detector: log redaction and the send check agree, stay linear, and never show a secret."""

from __future__ import annotations

import json
from typing import List

import pytest
from conftest import QUIRKY, git, run_script

from fleet_common import UsageError
from send_message import find_secret_in, send_message
from structured_log import find_secret, redact

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PEM_BODY = "MIIEowIBAAKCAQEAv3ry8e1bWq0XkVn2ZrIh+5p2QxL0qgk7TqYz1AbCdEfGhIjKlMn"

# (text, the secret that must disappear, the kind find_secret names)
NEW_SECRETS = [
    ("aws key AKIAIOSFODNN7EXAMPLE in the config", "AKIAIOSFODNN7EXAMPLE", "an AWS access key"),
    ("session ASIAY34FZKBOKMUTVV7A expires", "ASIAY34FZKBOKMUTVV7A", "an AWS access key"),
    (f"aws_secret_access_key {AWS_SECRET}", AWS_SECRET, "an AWS secret key"),
    (f"aws configure set aws_secret_access_key\t{AWS_SECRET}", AWS_SECRET, "an AWS secret key"),
    (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET, "a secret"),
    (f"key:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\nbye",
     PEM_BODY, "a private key"),
    (f"-----BEGIN OPENSSH PRIVATE KEY-----\r\n{PEM_BODY}\r\n-----END OPENSSH PRIVATE KEY-----",
     PEM_BODY, "a private key"),
    (f"-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0A1B\n\n"
     f"{PEM_BODY}\n-----END ENCRYPTED PRIVATE KEY-----", PEM_BODY, "a private key"),
    (f"pasted half a key -----BEGIN PRIVATE KEY-----\n{PEM_BODY}", PEM_BODY, "a private key"),
    ("bot xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx ok",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "a Slack token"),
    ("user xoxp-1234567890-0987654321-abcdef1234", "xoxp-1234567890-0987654321-abcdef1234", "a Slack token"),
    ("app xapp-1-A0123456789-0123456789012-abcdef", "xapp-1-A0123456789-0123456789012-abcdef", "a Slack token"),
    ("the password hunter3 works", "hunter3", "a password"),
    ("passwd\tx", "\tx", "a password"),
    ("my password is x", "is x", "a password"),
    ("Jira password is Summer2024!", "Summer2024!", "a password"),
    ("PASSPHRASE  c0rrect-horse", "c0rrect-horse", "a password"),
]

PROSE = [
    "Build 4411 is green on ExternalNew.",
    "The password is stored in the vault.",
    "Please reset your password for Jira before Monday.",
    "Your password expires tomorrow; passwords are rotated monthly.",
    "password and username are in the wiki (see the password page)",
    "the bearer of bad news",
    "clone ssh://git@github.com/org/build.git or git@github.com:org/build.git",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----",
    "set password=$FLEET_PASSWORD or token: <your token> (xxxx in the example)",
    "Ids are compared case-insensitively",
]


@pytest.mark.parametrize("text,secret,kind", NEW_SECRETS, ids=[k + "-" + t[:12] for t, _, k in NEW_SECRETS])
def test_redact_masks_the_new_kinds(text, secret, kind):
    result = redact(text)
    assert secret not in result
    assert "***" in result
    assert redact(result) == result


@pytest.mark.parametrize("text,secret,kind", NEW_SECRETS, ids=[k + "-" + t[:12] for t, _, k in NEW_SECRETS])
def test_find_secret_names_the_kind_and_not_after_redaction(text, secret, kind):
    assert find_secret(text) == kind
    assert find_secret(redact(text)) is None  # what the log shows holds nothing any more


def test_private_key_block_keeps_its_frame_and_what_follows():
    text = f"before\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\nafter"
    assert redact(text) == ("before\n-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----"
                            "\nafter")


@pytest.mark.parametrize("text", PROSE)
def test_prose_is_no_secret(text):
    assert find_secret(text) is None


def test_prose_after_password_is_not_masked():
    for text in PROSE[1:5]:
        assert redact(text) == text


def test_the_older_kinds_are_found_too():
    from test_structured_log import SECRETS

    for text, secret in SECRETS:
        assert find_secret(text), text
        assert secret not in (find_secret(text) or "")
        assert find_secret(redact(text)) is None, text


def test_the_word_prefilter_never_hides_a_secret():
    """A pattern runs only on text that holds one of its words: the answer is the one every
    pattern would give, for every known secret, prose, and the letters re's case-blind matching
    also takes (dotless and dotted i, the long s, the Kelvin sign)."""
    from test_structured_log import SECRETS

    import fleet_secrets

    def unfiltered(text: str):
        for _pattern, detector in fleet_secrets._DETECTORS:
            kind = detector(text)
            if kind is not None:
                return kind
        return None

    def unmasked_everywhere(text: str) -> str:
        value = fleet_secrets._redact_pem(text)
        for pattern, replacement in fleet_secrets._MASKS:
            value = pattern.sub(replacement, value)
        return value

    samples = [text for text, _s, _k in NEW_SECRETS] + [text for text, _s in SECRETS] + PROSE + [
        "PA\u017f\u017fWORD=hunter22", "Author\u0131zation: Basic dXNlcjpwYXNz", "AUTHOR\u0130ZATION: token abc123",
        "to\u212aen: abc123def", "pr\u0131vate_key = 'k3y'", "plain words only", "", "\u2713 done \U0001f680"]
    for text in samples:
        assert find_secret(text) == unfiltered(text), text
        assert redact(text) == unmasked_everywhere(text), text
    assert find_secret("PA\u017f\u017fWORD=hunter22") is not None


def test_the_quirky_fixture_holds_a_secret():
    data = json.loads(QUIRKY.read_text(encoding="utf-8"))
    (rotated,) = [m for m in data["messages"] if isinstance(m, dict) and m.get("subject") == "Credentials rotated"]
    assert find_secret(rotated["body"]) == "a GitHub token"
    assert find_secret_in(rotated["body"], rotated["subject"]) == "body holds a GitHub token"
    assert find_secret_in("hello", "password: Zebra99") == "subject holds a password"
    assert find_secret_in("hello", None) == ""


# --------------------------------------------------------------------------- linear time

ADVERSARIAL_UNITS = [
    "password", "password ", "password=", 'password="', "password: '", 'password\\"', "passwd\t",
    "password is ", "my password is is ", "secret_access_key ", "token" * 3 + ":", "x" * 40 + "password",
    "password_", "-----BEGIN ", "-----BEGIN PRIVATE KEY-----", "-----BEGIN " + "A " * 25, "-----",
    "a://", "a://b:", "https://", "ghp_", "glpat-" + "a" * 16 + ".", "xoxb-", "AKIA",
    "Authorization: ", "authorization", "bearer ", " ", "\t", "\\", '"', "@",
]
ADVERSARIAL_CHARS = 200_000  # a quadratic pattern would take hours on this; a linear one, a fraction of a second


def adversarial_texts(unit: str) -> List[str]:
    return [unit * (ADVERSARIAL_CHARS // len(unit)), unit + "y" * ADVERSARIAL_CHARS,
            "y" * ADVERSARIAL_CHARS + unit]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_patterns_stay_linear_on_adversarial_input(unit):
    for text in adversarial_texts(unit):
        redacted = redact(text)
        assert isinstance(redacted, str)
        find_secret(text)


# --------------------------------------------------------------------------- the send check


def test_send_refuses_a_secret_before_anything(fleet):
    b1 = fleet.clone("build1")
    before = fleet.remote_commits()
    with pytest.raises(UsageError) as caught:
        send_message("the new Jira password: Hunter2-secret", "Jira", to="code2", from_sender="build1",
                     build_repo_path=str(b1))
    text = str(caught.value)
    assert "password" in text and "Hunter2" not in text and "--allow-secret" in text
    assert "\n" not in text
    with pytest.raises(UsageError):
        send_message("see the subject", "token ghp_abcdefghijklmnopqrstuvwxyz0123456789", to="code2",
                     from_sender="build1", build_repo_path=str(b1))
    assert fleet.remote_commits() == before
    assert not (b1 / "build1").exists()  # no queue, no state, no log


def test_send_with_allow_secret_goes_through(fleet):
    b1 = fleet.clone("build1")
    result = send_message("the new Jira password: Hunter2-secret", "Jira", to="code2", from_sender="build1",
                          build_repo_path=str(b1), allow_secret=True)
    assert result
    assert fleet.remote_messages()[-1]["body"] == "the new Jira password: Hunter2-secret"


def test_cli_refuses_with_exit_2_and_one_line(fleet):
    b1 = fleet.clone("build1")
    before = fleet.remote_commits()
    key = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
    proc = run_script("send_message.py", "-", "deploy key", "--to", "code2", "--from", "build1",
                      "--repo", str(b1), input=key + "\n")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "private key" in lines[0] and "--allow-secret" in lines[0]
    assert PEM_BODY not in proc.stderr + proc.stdout
    assert fleet.remote_commits() == before

    proc = run_script("send_message.py", "password hunter3", "--to", "code2", "--from", "build1",
                      "--repo", str(b1), "--allow-secret")
    assert proc.returncode == 0, proc.stderr
    assert "hunter3" not in proc.stderr and "allow-secret" in proc.stderr  # warned, secret not shown
    assert fleet.remote_messages()[-1]["body"] == "password hunter3"
    log = (b1 / "build1" / "logs" / "structured.log").read_text(encoding="utf-8")
    assert "hunter3" not in log and "holds a password" in log
    assert git(b1, "status", "--porcelain") == ""
