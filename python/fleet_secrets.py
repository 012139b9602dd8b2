"""Credentials in text: find them (the send check) and mask them (log redaction).

One detector serves both :func:`structured_log.redact`, which masks every credential in a log
record, and :func:`find_secret`, which a send asks before a body or subject enters the mailbox,
where every server reads it and git keeps it forever (PROTOCOL.md, "Trust between servers").

Kept apart from :mod:`structured_log` so that a send checks its text without importing
:mod:`logging`: this module imports only :mod:`re`, and compiles a pattern only for a text that
holds one of its words (:class:`LazyPattern`). ``structured_log`` re-exports :func:`redact` and :func:`find_secret`.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Final, Iterator, List, Optional, Tuple

REDACTED: Final = "***"

# --------------------------------------------------------------------------- patterns
#
# One detector serves both the log redaction (:func:`redact`) and the send check
# (:func:`find_secret`). Every pattern runs on text from other machines, so none nests one
# quantifier inside another: each repetition is bounded, or runs over characters that what follows
# cannot start with, and every search stays linear in the text's length.


class LazyPattern:
    """A regular expression compiled on first use, with the words any match must contain.

    Compiling these patterns costs more than the rest of a send's checks, and most text holds
    none of their words: :meth:`may_match` tells from ``hints`` (lower-case strings, one of which
    is in every match) whether a search could find anything, so a text without them never compiles
    or runs the pattern. ``hints=()`` means no such word: always search.
    """

    __slots__ = ("_args", "_compiled", "hints")

    def __init__(self, *args: Any, hints: Tuple[str, ...] = ()) -> None:
        self._args = args
        self._compiled: Optional["re.Pattern[str]"] = None
        self.hints = hints

    def may_match(self, folded: str) -> bool:
        """Whether a match is possible in the text whose :func:`fold` is ``folded``."""
        return not self.hints or any(hint in folded for hint in self.hints)

    def __getattr__(self, name: str) -> Any:
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return getattr(self._compiled, name)


# re's case-insensitive matching also takes "ı" and "İ" for "i" (casefold already turns "ſ" into
# "s" and the Kelvin sign into "k"): folded so, a text holds a hint whenever a pattern could match.
_FOLD: Final = {0x131: "i", 0x307: None}


def fold(text: str) -> str:
    """``text`` as :meth:`LazyPattern.may_match` reads it."""
    return text.casefold().translate(_FOLD)


_SECRET_HINTS: Final = ("pass", "pwd", "token", "secret", "api", "access", "private")

# scheme://user[:password]@host -> scheme://***@host
_URL_USERINFO_RE = LazyPattern(r"(?i)\b([a-z][a-z0-9+.\-]{0,30}://)(?P<userinfo>[^\s/?#@]+)@", hints=("://",))
_GITHUB_TOKEN_RE = LazyPattern(r"\b(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,})",
                               hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"))
# A GitLab token may carry dot-separated parts; the optional tail ends on a non-dot, so a full stop
# after the token stays in the sentence.
_GITLAB_TOKEN_RE = LazyPattern(
    r"\bgl(?:pat|ptt|dt|rt|cbt|soat)-[A-Za-z0-9_\-]{16,}(?:\.[A-Za-z0-9_\-.]*[A-Za-z0-9_\-])?",
    hints=("glpat-", "glptt-", "gldt-", "glrt-", "glcbt-", "glsoat-"),
)
_SLACK_TOKEN_RE = LazyPattern(r"\b(?:xox[abeoprs]-[A-Za-z0-9\-]{10,}|xapp-[0-9]-[A-Za-z0-9\-]{10,})",
                              hints=("xox", "xapp-"))
_AWS_KEY_ID_RE = LazyPattern(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", hints=("akia", "asia"))
_AUTH_HEADER_RE = LazyPattern(
    r"(?i)\b((?:proxy-)?authorization\\?[\"']?\s*[:=]\s*\\?[\"']?)"
    r"(?!\*\*\*|(?:bearer|basic|digest|token|negotiate|ntlm)\s+\*\*\*)"
    r"(?:(bearer|basic|digest|token|negotiate|ntlm)\s+)?"
    r"(?P<cred>[^\s\"',;\\]+)",
    hints=("authorization",),
)
_BEARER_RE = LazyPattern(r"(?i)\b(bearer)\s+(?!\*\*\*)(?P<cred>[A-Za-z0-9\-._~+/]+=*)", hints=("bearer",))
_SECRET_WORD = (
    r"(?:passw(?:or)?d|passphrase|pwd|token|secret|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key)"
)
# The key may carry any prefix ("Jira password", "client_secret"); only the value is masked.
# The suffix is bounded so a long run of key-like text cannot make the search quadratic.
_KEY_VALUE_RE = LazyPattern(
    r"(?i)(?P<key>" + _SECRET_WORD + r"[\w.\-]{0,40}?)"
    r"(?P<kq>\\?[\"']?)"
    r"(?P<sep>\s*[:=]\s*)"
    r"(?:\\\"(?P<edq>(?:(?!\\\").){0,4096}?)\\\""
    r"|\"(?P<dq>(?:[^\"\\]|\\.)*)\""
    r"|'(?P<sq>[^']*)'"
    r"|(?P<bare>[^\s\"',;&]+))",
    hints=_SECRET_HINTS,
)
# "password hunter3", "passwd<TAB>x", "my password is x": a value after a space, a tab or "is".
# Prose ("the password is stored in the vault", "reset your password for Jira") must pass, so
# the value is masked only when it looks like one: it holds a digit or a symbol, or it is a short
# word that is not an English function word.
_SPOKEN_KEY = r"(?:passw(?:or)?d|passphrase|secret[_\-]?access[_\-]?key)"
_VALUE_CHAR = r"[^\s\"'`,;&()<>\[\]{}]"
_FUNCTION_WORDS = (
    "a|all|am|an|and|any|are|as|at|be|but|by|can|did|do|for|get|got|had|has|he|her|him|his|how|i"
    "|if|in|is|it|its|let|may|me|my|new|no|nor|not|now|of|off|ok|old|on|one|or|our|out|per|put"
    "|see|set|she|so|the|to|too|two|up|us|use|via|was|we|who|why|yes|yet|you"
)
_SPOKEN_RE = LazyPattern(
    r"(?i)(?P<key>" + _SPOKEN_KEY + r")"
    r"(?P<sep>[ \t]{1,16}(?:(?:is|was)[ \t]{1,16})?)"
    r"(?!(?:" + _FUNCTION_WORDS + r")(?!" + _VALUE_CHAR + r"))"
    r"(?=" + _VALUE_CHAR + r"*[\d!#$%*+/=?@^|~\\]|" + _VALUE_CHAR + r"{1,3}(?!" + _VALUE_CHAR + r"))"
    r"(?P<value>[\w!#$%*+/?@^|~\\]" + _VALUE_CHAR + r"*)",
    hints=("pass", "secret"),
)
_SECRET_KEY_RE = LazyPattern(r"(?i)^[\w.\- ]*(?:" + _SECRET_WORD + r"|authorization)$")

# PEM private keys: from "-----BEGIN ... PRIVATE KEY-----" to the next "-----" (its END line, or
# whatever comes next when that line is missing), found with str.find so that a text of many
# BEGIN lines and no END stays linear.
_PEM_START: Final = "-----BEGIN "
_PEM_DASHES: Final = "-----"
_PEM_BEGIN_RE = LazyPattern(r"-----BEGIN (?P<label>[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?)-----")
_PEM_END_RE = LazyPattern(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")


def _pem_blocks(text: str) -> Iterator[Tuple[int, int, str, str]]:
    """``(start, end, label, body)`` of each private-key block in ``text``."""
    at = text.find(_PEM_START)
    while at >= 0:
        begin = _PEM_BEGIN_RE.match(text, at)
        if begin is None:
            at = text.find(_PEM_START, at + 1)
            continue
        stop = text.find(_PEM_DASHES, begin.end())
        if stop < 0:
            yield at, len(text), begin.group("label"), text[begin.end():]
            return
        body = text[begin.end():stop]
        end_line = _PEM_END_RE.match(text, stop)
        end = end_line.end() if end_line is not None else stop
        yield at, end, begin.group("label"), body
        at = text.find(_PEM_START, end)


def _redact_pem(text: str) -> str:
    if _PEM_START not in text:
        return text
    pieces: List[str] = []
    done = 0
    for start, end, label, _body in _pem_blocks(text):
        pieces.append(text[done:start])
        pieces.append(f"-----BEGIN {label}-----{REDACTED}-----END {label}-----")
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def _key_value_sub(match: "re.Match[str]") -> str:
    head = match.group("key") + match.group("kq") + match.group("sep")
    if match.group("edq") is not None:
        return head + '\\"' + REDACTED + '\\"'
    if match.group("dq") is not None:
        return head + '"' + REDACTED + '"'
    if match.group("sq") is not None:
        return head + "'" + REDACTED + "'"
    return head + REDACTED


def _auth_sub(match: "re.Match[str]") -> str:
    scheme = match.group(2)
    return match.group(1) + (scheme + " " if scheme else "") + REDACTED


def _spoken_sub(match: "re.Match[str]") -> str:
    return match.group("key") + match.group("sep") + REDACTED


# What redact replaces, in order: each pattern with its replacement.
_MASKS: Final = (
    (_URL_USERINFO_RE, r"\1" + REDACTED + "@"),
    (_GITHUB_TOKEN_RE, REDACTED),
    (_GITLAB_TOKEN_RE, REDACTED),
    (_SLACK_TOKEN_RE, REDACTED),
    (_AWS_KEY_ID_RE, REDACTED),
    (_AUTH_HEADER_RE, _auth_sub),
    (_BEARER_RE, r"\1 " + REDACTED),
    (_KEY_VALUE_RE, _key_value_sub),
    (_SPOKEN_RE, _spoken_sub),
)


def redact(text: object) -> str:
    """``text`` with credentials replaced by ``***``.

    Masks private-key blocks (``-----BEGIN ... PRIVATE KEY-----`` to its END line), the user
    information of URLs (``https://user:token@host`` -> ``https://***@host``), GitHub (``ghp_``
    ``gho_`` ``ghu_`` ``ghs_`` ``ghr_`` ``github_pat_``), GitLab (``glpat-`` ...) and Slack
    (``xoxb-`` ``xoxp-`` ... ``xapp-``) tokens, AWS access key ids (``AKIA...``, ``ASIA...``),
    ``Authorization:`` header values, ``Bearer <token>``, the value written after a credential-like
    key (``password``, ``passwd``, ``pwd``, ``token``, ``secret``, ``api_key``, ``apikey``,
    ``access_key``, with any prefix, any case) as ``key=value``, ``key: value`` or
    ``"key": "value"``, and a password-like value after ``password``, ``passwd``, ``passphrase`` or
    ``aws_secret_access_key`` and a space, a tab or ``is`` (``password hunter3``).
    """
    value = text if isinstance(text, str) else str(text)
    value = _redact_pem(value)
    folded = fold(value)  # masking only removes text: a hint absent now stays absent
    for pattern, replacement in _MASKS:
        if pattern.may_match(folded):
            value = pattern.sub(replacement, value)
    return value


def _placeholder(value: Optional[str]) -> bool:
    """Whether a matched value is no credential: masked, empty, ``xxxx``, ``$VAR``, ``<pw>``."""
    core = (value or "").strip().strip("\"'\\")
    return (not core or REDACTED in core or (len(core) > 2 and len(set(core)) == 1)
            or core[0] in "$<{%")


def _key_kind(key: str) -> str:
    lowered = key.lower()
    for word, kind in (("pass", "a password"), ("pwd", "a password"), ("token", "a token"),
                       ("private", "a private key"), ("secret", "a secret"), ("api", "an API key"),
                       ("access", "an access key")):
        if word in lowered:
            return kind
    return "a secret"


def _found_pem(text: str) -> Optional[str]:
    for _start, _end, _label, body in _pem_blocks(text):
        if not _placeholder(body):
            return "a private key"
    return None


def _found_url(text: str) -> Optional[str]:
    for match in _URL_USERINFO_RE.finditer(text):
        _user, colon, password = match.group("userinfo").partition(":")
        if colon and not _placeholder(password):
            return "a password in a URL"
    return None


def _found_auth(text: str) -> Optional[str]:
    for match in _AUTH_HEADER_RE.finditer(text):
        if not _placeholder(match.group("cred")):
            return "an Authorization header"
    return None


def _found_bearer(text: str) -> Optional[str]:
    # "the bearer of bad news" is prose: a token holds a digit or a symbol.
    for match in _BEARER_RE.finditer(text):
        cred = match.group("cred")
        if not _placeholder(cred) and not cred.isalpha():
            return "a bearer token"
    return None


def _found_key_value(text: str) -> Optional[str]:
    for match in _KEY_VALUE_RE.finditer(text):
        value = next((v for v in match.group("edq", "dq", "sq", "bare") if v is not None), "")
        if not _placeholder(value):
            return _key_kind(match.group("key"))
    return None


def _found_spoken(text: str) -> Optional[str]:
    for match in _SPOKEN_RE.finditer(text):
        if not _placeholder(match.group("value")):
            return "an AWS secret key" if "access" in match.group("key").lower() else "a password"
    return None


def _found_pattern(pattern: LazyPattern, kind: str) -> Callable[[str], Optional[str]]:
    def found(text: str) -> Optional[str]:
        return kind if pattern.search(text) is not None else None
    return found


_DETECTORS: Final = (
    (None, _found_pem),
    (_AWS_KEY_ID_RE, _found_pattern(_AWS_KEY_ID_RE, "an AWS access key")),
    (_GITHUB_TOKEN_RE, _found_pattern(_GITHUB_TOKEN_RE, "a GitHub token")),
    (_GITLAB_TOKEN_RE, _found_pattern(_GITLAB_TOKEN_RE, "a GitLab token")),
    (_SLACK_TOKEN_RE, _found_pattern(_SLACK_TOKEN_RE, "a Slack token")),
    (_URL_USERINFO_RE, _found_url),
    (_AUTH_HEADER_RE, _found_auth),
    (_BEARER_RE, _found_bearer),
    (_KEY_VALUE_RE, _found_key_value),
    (_SPOKEN_RE, _found_spoken),
)


def find_secret(text: object) -> Optional[str]:
    """The kind of the first credential in ``text`` (``"a password"``, ``"a GitHub token"`` ...),
    or ``None``.

    The same patterns as :func:`redact`; a value that is already masked (``***``) or a placeholder
    (``$PASSWORD``, ``<token>``, ``xxxx``) does not count, nor does ``Bearer`` before a plain word.
    The answer names the kind only, never the secret.
    """
    value = text if isinstance(text, str) else str(text)
    folded = fold(value)
    for pattern, detector in _DETECTORS:
        if pattern is not None and not pattern.may_match(folded):
            continue
        kind = detector(value)
        if kind is not None:
            return kind
    return None


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY_RE.match(key))
