"""Automatic replies: which message gets one, what it says, and why a reply loop cannot happen.

Pure decision logic for the monitor, which sends the replies, persists the ledger and marks
messages read. Contract: PROTOCOL.md ("A message": ``auto``, ``in_reply_to``, ``acknowledged_by``;
"A message is addressed to server S"; "each addressed server ... never more than one from any
server").

No loop, by construction -- :func:`should_reply` never answers:

- a message marked ``auto`` (every automatic reply this module builds is marked ``auto``);
- a ``heartbeat``, ``response`` or ``ack`` (the types of automatic mail);
- its own server's mail, mail not addressed to it, or mail from a sender that is not a valid
  server id (a reply to it would reach no one);
- a legacy automatic reply (older monitors wrote no ``auto`` field, but their bodies say
  "responding automatically" or "Auto-response from monitor", or their subject starts with
  "Auto-response" / "[auto]");
- a reply (``in_reply_to`` set, or a ``Re:`` subject), unless it requires an acknowledgement:
  then only an ``acknowledge`` rule may answer it, and an acknowledgement is never answered;
- mail already acknowledged by this server, or older than the cut-off (default 24 h; a missing
  or unparseable timestamp counts as old, a future one as fresh).

Beyond that, :class:`ReplyLedger` (``<repo>/<server>/state/auto_reply.json``, never committed)
keeps at most one automatic reply per original message (key: id and sender), ever, and at most
``per_sender_limit`` replies per sender per ``per_sender_window`` seconds. Format::

    {"version": 1,
     "replied": {"<sender>\\u001f<id>": {"at": 1762254639.5, "reply_id": "msg_..." | null}},
     "recent": {"<sender>": [1762254639.5, ...]}}

``replied`` entries are pruned after 30 days, ``recent`` ones after a day. The monitor decides a
whole cycle in memory (:meth:`AutoResponder.hold`), writes the ledger once
(:meth:`AutoResponder.commit_held`, which also refuses what another process recorded meanwhile),
and only then queues the replies it returned: a crash between recording and sending loses a reply
but never sends a second one, and a cycle costs one ledger write however many messages it
answers (PROTOCOL.md, "Trust between servers": no per-message work grows with the mailbox).

Rules (:func:`load_rules`): ``{"version": 1, "rules": [ {"name", "kind", "match",
"send_ack_message", "enabled"} ... ]}``, first matching enabled rule wins. A local ``--rules``
file overrides the fleet-wide ``coordination/auto_reply_rules.json`` (:class:`RuleSource`). The
default rules answer status and presence requests; they acknowledge nothing (an ``acknowledge``
rule in a rules file does, for fleets that want it).

Any member can commit the shared rules, so a rule's cost is bounded whatever its text
(PROTOCOL.md, "Trust between servers"): rules match whole words and phrases only, all found in
one pass over the tokens of the first :data:`MAX_MATCHED_CHARS` characters of the subject and of
the body (:class:`PhraseIndex`) -- never by a regular expression from a rules file (a ``regex``
key is refused, in a local file too: Python's ``re`` cannot be stopped once it backtracks). The
file is bounded in size and depth (:func:`fleet_common.load_json_bounded`), and in rules,
phrases and list lengths; a file that breaks a bound is invalid like any other.

As a script: ``python3 python/auto_reply.py --check FILE`` validates a rules file;
``--print-defaults`` prints the default rules. Exit codes: 0 valid, 2 invalid or bad usage,
1 any other failure.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet_common import (
    EXIT_OK,
    LEDGER_FILE_NAME,
    STATE_SUBDIR,
    BadInput,
    RuntimePaths,
    SuiteError,
    UsageError,
    atomic_write_json,
    dump_json_text,
    file_lock,
    format_duration,
    is_valid_server_id,
    json_depth_exceeds,
    load_json_bounded,
    load_state_file,
    move_aside,
    normalize_server_id,
    one_line,
    runtime_dir,
    write_line,
    write_text,
)
from fleet_mailbox import (
    entry_problem,
    flag,
    is_addressed_to,
    is_reply_subject,
    key_from_str,
    key_str,
    message_key,
    message_time,
    reply_subject,
    strip_reply_prefixes,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import os
    from typing import Any, Callable, Dict, Final, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple, Union

    from fleet_mailbox import (
        MessageKey,
    )

    Phrase = Tuple[str, ...]

    _Fail = Callable[[str], "RuleError"]

log = logging.getLogger(__name__)

RULES_VERSION: Final = 1
LEDGER_VERSION: Final = 1
LEDGER_NAME: Final = LEDGER_FILE_NAME  # the name lives in fleet_common.RuntimePaths
SHARED_RULES_PATH: Final = "coordination/auto_reply_rules.json"

KINDS: Final = ("status", "presence", "acknowledge")
MATCH_KEYS: Final = ("words", "from", "type", "priority", "ack_required")
_RULE_KEYS: Final = ("name", "kind", "match", "send_ack_message", "enabled", "description", "comment")
_TOP_KEYS: Final = ("version", "rules", "description", "comment")

# Types of mail that programs write on their own; answering them is how loops start.
NO_REPLY_TYPES: Final = frozenset({"heartbeat", "response", "ack"})
LEGACY_BODY_MARKERS: Final = ("responding automatically", "auto-response from monitor")
LEGACY_SUBJECT_PREFIXES: Final = ("auto-response", "[auto]")

DEFAULT_MAX_AGE_HOURS: Final = 24.0
DEFAULT_PER_SENDER_LIMIT: Final = 3
DEFAULT_PER_SENDER_WINDOW: Final = 600.0
# Replies to all senders together in one window: any member can write mail "from" a thousand
# made-up ids, and each would get its own three replies otherwise.
DEFAULT_OVERALL_LIMIT: Final = 20
STATUS_REUSE_S: Final = 5.0  # one status snapshot answers every request of a cycle
MAX_FUTURE_S: Final = 3600.0  # a timestamp further ahead is no sender's clock skew: never fresh
LEDGER_RETENTION_S: Final = 30 * 86400.0
RECENT_RETENTION_S: Final = 86400.0
LEDGER_MAX_ENTRIES: Final = 50000
LEDGER_LOCK_TIMEOUT: Final = 10.0
LIMIT_WARNED_SENDERS: Final = 1024
MAX_STATUS_CHECK_LINES: Final = 6
MAX_LINE: Final = 160

# Bounds on a rules file (PROTOCOL.md, "Trust between servers"). Matching one message is one
# pass over at most about 4 * MAX_MATCHED_CHARS tokens, whatever the rules; the bounds on the
# file keep building the rules and their index (once per file) and the error lines small.
MAX_RULES_BYTES: Final = 64 * 1024
MAX_RULES_DEPTH: Final = 8  # a rules file needs 5: object, rules list, rule, match, words list
MAX_RULES: Final = 64
MAX_PHRASES: Final = 256  # words and phrases in the whole file
MAX_PHRASE_CHARS: Final = 64
MAX_LIST_ITEMS: Final = 64  # match.from, match.type, match.priority
MAX_ITEM_CHARS: Final = 64  # a sender, type or priority; a rule's name
# Only the start of a subject and of a body is matched: a request says what it wants early.
MAX_MATCHED_CHARS: Final = 2048
# Subjects and timestamps are parsed by fleet_mailbox / fleet_common regexes whose cost grows
# with the square of a crafted value's length; no real prefix or timestamp is this long.
MAX_SUBJECT_PREFIX_CHARS: Final = 256
MAX_TIMESTAMP_CHARS: Final = 64

# Reason codes returned by should_reply (the text after the colon is detail for logs).
OK: Final = "ok"
ACK_ONLY: Final = "ack-only"

# No acknowledge rule: an acknowledgement says that someone took note, which a program cannot
# say for a person. A fleet that wants them adds one to its rules file, for example
# {"name": "ack-required", "kind": "acknowledge", "match": {"ack_required": true},
#  "send_ack_message": true}.
DEFAULT_RULES_DOCUMENT: Final = {
    "version": RULES_VERSION,
    "rules": [
        {"name": "presence", "kind": "presence",
         "match": {"words": ["are you there", "ping", "are you online", "are you alive", "are you",
                             "ready?"]}},
        {"name": "status", "kind": "status",
         "match": {"words": ["reply", "respond", "status", "report", "ack", "acknowledge",
                             "confirm"]}},
    ],
}


class RuleError(UsageError):
    """An auto-reply rules file that cannot be used (exit 2); ``str()`` names file and problem."""


# --------------------------------------------------------------------------- small helpers


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _epoch(now: Union[float, _dt.datetime]) -> float:
    return now.timestamp() if isinstance(now, _dt.datetime) else float(now)


# Text as tokens: each maximal run of word characters, each other character, and a gap mark
# between two non-word characters and at an end beside one. A phrase occurs in a text as whole
# words -- what ``(?<!\w)phrase(?!\w)`` finds, so ``ready?`` needs a non-word character or the
# end after it -- exactly when its tokens occur in a row among the text's. Both patterns here
# are fixed and linear; no pattern ever comes from a rules file.
_TOKEN: Final = re.compile(r"\w+|\W")
_WORD_PREFIX: Final = re.compile(r"\w*")
_WORD_CHAR: Final = re.compile(r"\w")
_NON_WORD_GAP: Final = re.compile(r"(?<!\w)(?!\w)")
_GAP: Final = "\x00"
_FIELD_SEPARATOR: Final = "\x03"  # between subject and body: no phrase spans both
_UNFORGEABLE: Final = {ord(_GAP): 0xFFFD, ord(_FIELD_SEPARATOR): 0xFFFD}


def word_tokens(text: str) -> List[str]:
    """``text`` lower-cased as tokens (see above); linear in its length."""
    return _TOKEN.findall(_NON_WORD_GAP.sub(_GAP, text.lower().translate(_UNFORGEABLE)))


def _clip(text: str, limit: int = MAX_MATCHED_CHARS) -> str:
    """The first ``limit`` characters, without the part of a word that the cut went through
    (``reporter`` cut to ``report`` must not match ``report``)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    if _WORD_CHAR.match(text, limit):  # the cut fell inside a word (or just before one)
        head = head[: limit - _WORD_PREFIX.match(head[::-1]).end()]
    return head


def message_tokens(msg: Mapping[str, Any]) -> List[str]:
    """The tokens of the start of the subject and of the body, as phrases are looked for."""
    return (word_tokens(_clip(_text(msg.get("subject")))) + [_FIELD_SEPARATOR]
            + word_tokens(_clip(_text(msg.get("body")))))




class PhraseIndex:
    """Which of many phrases occur in a text, in one pass over its tokens (Aho-Corasick).

    The pass costs a few dictionary look-ups per token, amortised, whatever the number, length
    or shape of the phrases; building the index costs their total length, once per rules file.
    """

    def __init__(self, phrases: Sequence[Phrase]) -> None:
        goto: List[Dict[str, int]] = [{}]
        ends: List[Optional[Phrase]] = [None]  # the phrase that ends in a state
        for phrase in phrases:
            state = 0
            for token in phrase:
                following = goto[state].get(token)
                if following is None:
                    following = goto[state][token] = len(goto)
                    goto.append({})
                    ends.append(None)
                state = following
            ends[state] = phrase
        fail = [0] * len(goto)  # the longest proper suffix of a state that is also a state
        link = [0] * len(goto)  # the nearest such suffix where a phrase ends (0: none)
        queue = collections.deque(goto[0].values())
        while queue:
            state = queue.popleft()
            for token, child in goto[state].items():
                suffix = fail[state]
                while suffix and token not in goto[suffix]:
                    suffix = fail[suffix]
                fail[child] = goto[suffix].get(token, 0) if state else 0
                link[child] = fail[child] if ends[fail[child]] is not None else link[fail[child]]
                queue.append(child)
        # The first state whose phrase ends when the search is in a state (0: none).
        self._hit = [state if ends[state] is not None else link[state] for state in range(len(goto))]
        self._goto, self._fail, self._link, self._ends = goto, fail, link, ends

    def found(self, tokens: Sequence[str]) -> Set[Phrase]:
        goto, fail, link, ends, first_hit = self._goto, self._fail, self._link, self._ends, self._hit
        found: Set[Phrase] = set()
        reported: Set[int] = set()  # each state's phrases are collected once: bounded work
        state = 0
        for token in tokens:
            following = goto[state].get(token)
            while following is None and state:  # amortised: never more steps back than forward
                state = fail[state]
                following = goto[state].get(token)
            state = following or 0
            hit = first_hit[state]
            while hit and hit not in reported:
                reported.add(hit)
                found.add(ends[hit])  # type: ignore[arg-type]
                hit = link[hit]
        return found


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Match:
    """The conditions of a rule; every condition given must hold."""

    words: Tuple[str, ...] = ()
    senders: Optional[FrozenSet[str]] = None
    types: Optional[FrozenSet[str]] = None
    priorities: Optional[FrozenSet[str]] = None
    ack_required: Optional[bool] = None
    # ``words`` as tokens (see word_tokens), without repeats.
    phrases: Tuple[Phrase, ...] = field(default=(), compare=False, repr=False)

    @property
    def selective(self) -> bool:
        """False for a match that names no condition: it matches nothing (not everything)."""
        return bool(self.words or self.senders is not None or self.types is not None
                    or self.priorities is not None or self.ack_required is True)

    def holds(self, msg: Mapping[str, Any], found: Optional[Set[Phrase]] = None) -> bool:
        """Whether every condition holds. ``found``: the phrases of ``msg`` that a rule set's
        :class:`PhraseIndex` found (it looks once per message for the phrases of all rules)."""
        if not self.selective:
            return False
        if self.ack_required is not None and flag(msg.get("ack_required")) != self.ack_required:
            return False
        if self.senders is not None and _text(msg.get("from")).strip().lower() not in self.senders:
            return False
        # A message without type or priority is what every sender writes by default.
        if self.types is not None and (_text(msg.get("type")).strip().lower() or "info") not in self.types:
            return False
        if self.priorities is not None and (
                _text(msg.get("priority")).strip().lower() or "normal") not in self.priorities:
            return False
        if self.phrases:
            if found is None:
                found = PhraseIndex(self.phrases).found(message_tokens(msg))
            if not any(phrase in found for phrase in self.phrases):
                return False
        return True

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.words:
            out["words"] = list(self.words)
        for key, values in (("from", self.senders), ("type", self.types), ("priority", self.priorities)):
            if values is not None:
                out[key] = sorted(values)
        if self.ack_required is not None:
            out["ack_required"] = self.ack_required
        return out


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    match: Match
    send_ack_message: bool = False
    enabled: bool = True

    def matches(self, msg: Mapping[str, Any], found: Optional[Set[Phrase]] = None) -> bool:
        return self.enabled and self.match.holds(msg, found)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "kind": self.kind, "match": self.match.to_json()}
        if self.kind == "acknowledge":
            out["send_ack_message"] = self.send_ack_message
        if not self.enabled:
            out["enabled"] = False
        return out


@dataclass(frozen=True)
class RuleSet:
    rules: Tuple[Rule, ...]
    source: str = "defaults"
    index: PhraseIndex = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        phrases = [phrase for rule in self.rules if rule.enabled for phrase in rule.match.phrases]
        object.__setattr__(self, "index", PhraseIndex(phrases))  # frozen: set once, here

    @classmethod
    def default(cls) -> "RuleSet":
        return parse_rules(DEFAULT_RULES_DOCUMENT, "defaults")

    def match(self, msg: Mapping[str, Any], kinds: Optional[Sequence[str]] = None) -> Optional[Rule]:
        """The first enabled rule (of one of ``kinds``, when given) whose match holds."""
        found: Optional[Set[Phrase]] = None  # looked for once per message, when a rule needs it
        for rule in self.rules:
            if kinds is not None and rule.kind not in kinds:
                continue
            if found is None and rule.enabled and rule.match.phrases:
                found = self.index.found(message_tokens(msg))
            if rule.matches(msg, found):
                return rule
        return None

    def to_json(self) -> Dict[str, Any]:
        return {"version": RULES_VERSION, "rules": [rule.to_json() for rule in self.rules]}


def _shown(value: Any, limit: int = 60) -> str:
    """A value from a rules file as an error message shows it: quoted, escaped, one short line."""
    return one_line(repr(value), limit)


def _string_list(value: Any, where: str, fail: Callable[[str], RuleError], *,
                 max_items: int = MAX_LIST_ITEMS, max_chars: int = MAX_ITEM_CHARS) -> List[str]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise fail(f"{where} must be a non-empty list of strings")
    if len(value) > max_items:
        raise fail(f"{where} holds {len(value)} items, more than the {max_items} allowed")
    items: List[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise fail(f"{where} must hold non-empty strings, found {_shown(item)}")
        item = item.strip()
        if len(item) > max_chars:
            raise fail(f"{where}: {_shown(item)} is longer than {max_chars} characters")
        if not item.isprintable():
            raise fail(f"{where}: {_shown(item)} holds a control character")
        items.append(item)
    return items


def _parse_match(raw: Any, where: str, fail: Callable[[str], RuleError]) -> Match:
    if not isinstance(raw, dict):
        raise fail(f"{where}: 'match' must be an object")
    if "regex" in raw:
        # A backtracking pattern such as (a+)+$ stalls every monitor on one message, and Python's
        # re cannot be interrupted: rules match whole words and phrases only, in any file.
        raise fail(f"{where}: match.regex is not accepted (a regular expression can take hours "
                   "on one message); use match.words, whole words and phrases")
    unknown = sorted(set(raw) - set(MATCH_KEYS))
    if unknown:
        raise fail(f"{where}: unknown match key {_shown(unknown[0])} (known: {', '.join(MATCH_KEYS)})")
    words: Tuple[str, ...] = ()
    if "words" in raw:
        words = tuple(_string_list(raw["words"], f"{where}: match.words", fail,
                                   max_items=MAX_PHRASES, max_chars=MAX_PHRASE_CHARS))
    sets: Dict[str, Optional[FrozenSet[str]]] = {}
    for key in ("from", "type", "priority"):
        sets[key] = (frozenset(item.lower() for item in _string_list(raw[key], f"{where}: match.{key}", fail))
                     if key in raw else None)
    ack = raw.get("ack_required")
    if "ack_required" in raw and not isinstance(ack, bool):
        raise fail(f"{where}: match.ack_required must be true or false")
    return Match(words=words, senders=sets["from"], types=sets["type"], priorities=sets["priority"],
                 ack_required=ack, phrases=tuple(dict.fromkeys(tuple(word_tokens(w)) for w in words)))


def parse_rules(doc: Any, source: str) -> RuleSet:
    """A :class:`RuleSet` from a parsed rules document, or :class:`RuleError` naming ``source``."""

    def fail(problem: str) -> RuleError:
        return RuleError(f"auto-reply rules {source}: {problem}")

    raw_rules = _rule_list(doc, fail)
    rules: List[Rule] = []
    names: Set[str] = set()
    phrases = 0
    for index, raw in enumerate(raw_rules, 1):
        rule = _parse_rule(raw, index, names, phrases, fail)
        names.add(rule.name)
        phrases += len(rule.match.phrases)
        rules.append(rule)
    return RuleSet(rules=tuple(rules), source=source)




def _rule_list(doc: Any, fail: _Fail) -> List[Any]:
    """The document's ``rules`` list, once its top level, version and size are checked."""
    if not isinstance(doc, dict):
        raise fail("the top level must be a JSON object with 'version' and 'rules'")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise fail(f"unknown key {_shown(unknown[0])} (known: {', '.join(_TOP_KEYS)})")
    version = doc.get("version", RULES_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"'version' must be a positive integer, found {_shown(version)}")
    if version > RULES_VERSION:
        raise fail(f"format version {version} is newer than this program understands ({RULES_VERSION})")
    if "rules" not in doc:
        raise fail("missing 'rules' (a list of rules)")
    raw_rules = doc["rules"]
    if not isinstance(raw_rules, list):
        raise fail("'rules' must be a list")
    if len(raw_rules) > MAX_RULES:
        raise fail(f"{len(raw_rules)} rules, more than the {MAX_RULES} allowed")
    return raw_rules


def _rule_name(raw: Any, index: int, taken: Set[str], fail: _Fail) -> str:
    where = f"rule #{index}"
    if not isinstance(raw, dict):
        raise fail(f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail(f"{where}: missing 'name' (a non-empty string)")
    name = name.strip()
    if len(name) > MAX_ITEM_CHARS or not name.isprintable():
        raise fail(f"{where}: the name {_shown(name)} must be at most {MAX_ITEM_CHARS} "
                   "printable characters")
    if name in taken:
        raise fail(f"rule #{index} ({name!r}): the name is used twice")
    return name


def _parse_rule(raw: Any, index: int, taken: Set[str], phrases_before: int, fail: _Fail) -> Rule:
    """One rule of the list (``taken`` and ``phrases_before``: the names and the number of
    phrases of the rules before it)."""
    name = _rule_name(raw, index, taken, fail)
    where = f"rule #{index} ({name!r})"
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise fail(f"{where}: unknown key {_shown(unknown[0])} (known: {', '.join(_RULE_KEYS[:5])})")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise fail(f"{where}: unknown kind {_shown(kind)} (use status, presence or acknowledge)")
    if "match" not in raw:
        raise fail(f"{where}: missing 'match'")
    match = _parse_match(raw["match"], where, fail)
    if phrases_before + len(match.phrases) > MAX_PHRASES:
        raise fail(f"{where}: more than {MAX_PHRASES} words and phrases in the whole file")
    flags = {}
    for key, default in (("send_ack_message", False), ("enabled", True)):
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise fail(f"{where}: '{key}' must be true or false")
        flags[key] = value
    if flags["send_ack_message"] and kind != "acknowledge":
        raise fail(f"{where}: 'send_ack_message' applies to acknowledge rules only")
    return Rule(name=name, kind=kind, match=match, **flags)


def _looks_like_json(text: str) -> bool:
    return text.lstrip("\ufeff \t\r\n").startswith(("{", "["))


def _json_syntax_error(text: str, name: str) -> Optional[str]:
    """Where a rules text within the size and depth bounds breaks JSON (line and column), or
    ``None`` when its problem is another (a number too long, nesting too deep)."""
    if json_depth_exceeds(text.encode("utf-8"), MAX_RULES_DEPTH):
        return None
    try:
        json.loads(text, parse_int=len, parse_float=len)  # numbers only measured: no cost
    except json.JSONDecodeError as exc:
        return f"auto-reply rules {name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    except (ValueError, RecursionError):
        return None
    return None


def load_rules(path_or_text: Union[str, bytes, "os.PathLike[str]"], *,
               source: Optional[str] = None) -> RuleSet:
    """Load a rules file (a path) or rules text (a string or bytes starting with ``{``).

    Raises :class:`RuleError` with one line naming the file and the problem: unreadable file,
    more than :data:`MAX_RULES_BYTES`, nesting deeper than :data:`MAX_RULES_DEPTH`, a number
    too long, bad JSON (with line and column), unknown kind or key, wrong types, a ``regex``,
    too many rules or phrases, missing name, newer format version.
    """
    if isinstance(path_or_text, bytes):
        raw: bytes = path_or_text
        name = source or "text"
    elif isinstance(path_or_text, str) and _looks_like_json(path_or_text):
        raw = path_or_text.encode("utf-8")
        name = source or "text"
    else:
        path = Path(path_or_text)
        name = source or f"file {path}"
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_RULES_BYTES + 1)  # enough to tell that it is too big
        except OSError as exc:
            raise RuleError(f"auto-reply rules {name}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_RULES_BYTES:
        raise RuleError(f"auto-reply rules {name}: more than the {MAX_RULES_BYTES} bytes allowed")
    try:
        text = raw.decode("utf-8-sig")  # PowerShell 5 writes a BOM
    except UnicodeDecodeError as exc:
        raise RuleError(f"auto-reply rules {name}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise RuleError(f"auto-reply rules {name}: the file is empty")
    try:
        doc = load_json_bounded(raw, what=f"auto-reply rules {name}", max_bytes=MAX_RULES_BYTES,
                                max_depth=MAX_RULES_DEPTH)
    except BadInput as exc:
        raise RuleError(_json_syntax_error(text, name) or str(exc)) from None
    return parse_rules(doc, name)


class RuleSource:
    """Where the rules come from: a local file, else the fleet-wide file, else the defaults.

    A local file is loaded once, here; an invalid one raises :class:`RuleError` (an error at
    start). Without one, :meth:`update_from_shared` follows ``coordination/auto_reply_rules.json``
    on the fetched ref: parsed when its blob changes; an invalid version is logged as ERROR once
    per blob and the last good rules stay (the defaults when none was ever good); an absent file
    means the defaults.
    """

    def __init__(self, local_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        self.local_path = Path(local_path) if local_path is not None else None
        self._blob: Optional[str] = None
        self._seen = False
        self._reported: Dict[str, None] = {}  # insertion-ordered, bounded
        if self.local_path is not None:
            self._rules = load_rules(self.local_path)
            log.info("auto-reply rules loaded from %s (%d rules)", self.local_path,
                     len(self._rules.rules), extra={"metadata": {"source": str(self.local_path)}})
        else:
            self._rules = RuleSet.default()

    @property
    def overridden(self) -> bool:
        return self.local_path is not None

    def update_from_shared(self, blob_id: Optional[str], raw: Optional[bytes]) -> None:
        if self.local_path is not None:
            return  # the local file wins
        if raw is None:
            if self._seen and self._blob is None:
                return
            if self._seen:
                log.info("%s is gone; using the default auto-reply rules", SHARED_RULES_PATH)
            self._seen, self._blob = True, None
            self._rules = RuleSet.default()
            return
        blob = blob_id or hashlib.sha1(raw).hexdigest()
        if self._seen and blob == self._blob:
            return
        self._seen, self._blob = True, blob
        try:
            rules = load_rules(raw, source=f"{SHARED_RULES_PATH} (blob {blob[:12]})")
        except RuleError as exc:
            if blob not in self._reported:
                self._reported[blob] = None
                while len(self._reported) > 64:
                    del self._reported[next(iter(self._reported))]
                log.error("%s; keeping the %s", exc,
                          "defaults" if self._rules.source == "defaults" else
                          f"last good rules ({self._rules.source})",
                          extra={"metadata": {"blob": blob, "path": SHARED_RULES_PATH}})
            return
        self._rules = rules
        log.info("auto-reply rules loaded from %s (%d rules)", rules.source, len(rules.rules),
                 extra={"metadata": {"blob": blob, "path": SHARED_RULES_PATH}})

    def current(self) -> RuleSet:
        return self._rules


# --------------------------------------------------------------------------- the loop guard


def _subject_head(msg: Mapping[str, Any]) -> str:
    """The start of the subject, where reply prefixes are: fleet_mailbox's prefix patterns cost
    the square of what they are given ("re" and a megabyte of spaces)."""
    return _text(msg.get("subject"))[:MAX_SUBJECT_PREFIX_CHARS]


def _message_moment(msg: Mapping[str, Any]) -> Optional[_dt.datetime]:
    """The message's time, or ``None``; a timestamp no writer produces is not parsed at all
    (fleet_common's timestamp pattern, like the prefix one, grows with the square of padding)."""
    stamp = msg.get("timestamp")
    if isinstance(stamp, str) and len(stamp) > MAX_TIMESTAMP_CHARS:
        return None
    return message_time(msg)


def legacy_auto_marker(msg: Mapping[str, Any]) -> Optional[str]:
    """What marks ``msg`` as an automatic reply from an older monitor (no ``auto`` field)."""
    body = _text(msg.get("body")).lower()
    for marker in LEGACY_BODY_MARKERS:
        if marker in body:
            return f"body says {marker!r}"
    subject = _subject_head(msg).strip().lower()
    for candidate in (subject, strip_reply_prefixes(subject).lower()):
        for prefix in LEGACY_SUBJECT_PREFIXES:
            if candidate.startswith(prefix):
                return f"subject starts with {prefix!r}"
    return None


def _gate(msg: Mapping[str, Any], server: str, now: float, max_age_hours: float) -> Tuple[bool, str]:
    problem = entry_problem(msg)
    if problem is not None:
        return False, f"invalid: {problem}"
    if flag(msg.get("auto")):
        return False, "auto: the message is marked auto"
    kind = _text(msg.get("type")).strip().lower()
    if kind in NO_REPLY_TYPES:
        return False, f"type: {kind} messages are never answered automatically"
    sender = msg["from"].strip().lower()
    if sender == server:
        return False, "own: sent by this server"
    if not is_addressed_to(msg, server):
        return False, "not-addressed: not addressed to this server"
    if not is_valid_server_id(sender):
        return False, f"bad-sender: {one_line(msg['from'], 40)!r} is not a server id a reply could reach"
    marker = legacy_auto_marker(msg)
    if marker is not None:
        return False, f"legacy-auto: an older monitor's automatic reply ({marker})"
    acked = msg.get("acknowledged_by")
    if isinstance(acked, list) and server in [a.strip().lower() for a in acked if isinstance(a, str)]:
        return False, "acknowledged: already acknowledged by this server"
    moment = _message_moment(msg)
    if moment is None:
        return False, "too-old: no readable timestamp (counts as old)"
    age = now - moment.timestamp()
    if age > max_age_hours * 3600.0:
        return False, f"too-old: {age / 3600.0:.1f} h old (cut-off {max_age_hours:g} h)"
    # A timestamp a little in the future (a sender's clock ahead) counts as fresh; far ahead, it
    # would stay fresh for good and outlive the ledger's memory of the answer: never answered.
    if age < -MAX_FUTURE_S:
        return False, f"too-old: dated {-age / 3600.0:.1f} h in the future (counts as unreadable)"
    if not _printable(msg["id"]):
        return False, "invalid: its id holds control characters (an answer would repeat them)"
    in_reply_to = msg.get("in_reply_to")
    is_reply = bool(isinstance(in_reply_to, str) and in_reply_to.strip()) or is_reply_subject(_subject_head(msg))
    if is_reply:
        if flag(msg.get("ack_required")):
            return True, f"{ACK_ONLY}: a reply that requires an acknowledgement"
        return False, "reply: replies are never answered automatically"
    return True, OK


_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> bool:
    return _CONTROL.search(text) is None


def should_reply(msg: Mapping[str, Any], server: str, now: Union[float, _dt.datetime],
                 max_age_hours: float = DEFAULT_MAX_AGE_HOURS) -> Tuple[bool, str]:
    """Whether ``server`` may answer ``msg`` automatically at ``now`` (epoch seconds), and why not.

    The reason starts with a code: ``auto``, ``type``, ``own``, ``not-addressed``, ``bad-sender``,
    ``legacy-auto``, ``acknowledged``, ``too-old``, ``reply`` or ``invalid``. When the answer is
    yes it is ``ok``, or ``ack-only`` for a reply that requires an acknowledgement: only an
    acknowledge rule may answer that one.
    """
    return _gate(msg, normalize_server_id(server), _epoch(now), max_age_hours)


# --------------------------------------------------------------------------- the ledger


def ledger_path(repo: Union[str, "os.PathLike[str]"], server: str) -> Path:
    """``<repo>/<server>/state/auto_reply.json`` (created folder, kept out of git)."""
    runtime_dir(repo, server, STATE_SUBDIR)
    return RuntimePaths(repo, server).ledger


def _fresh_ledger() -> Dict[str, Any]:
    return {"version": LEDGER_VERSION, "replied": {}, "recent": {}}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ReplyLedger:
    """Which messages this server has answered automatically, and when it answered whom.

    One monitor owns the file. Decisions are staged in memory (:meth:`stage`) and written
    together (:meth:`flush`: one read and one write however many there are); the write re-reads
    the file under a lock (``auto_reply.json.lock``) and refuses a key that is already there, so
    two processes for the same server cannot both send. :meth:`record` does both for one key.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._data = self._load()
        # name -> (key, entry, sender, sent): decisions made in memory, not yet written (flush).
        self._staged: Dict[str, Tuple[MessageKey, Dict[str, Any], str, bool]] = {}

    def _load(self) -> Dict[str, Any]:
        data = load_state_file(self.path, version=LEDGER_VERSION, fresh=_fresh_ledger)
        replied, recent = data.get("replied", {}), data.get("recent", {})
        if not isinstance(replied, dict) or not isinstance(recent, dict):
            move_aside(self.path, "'replied' or 'recent' is not an object")
            return _fresh_ledger()
        clean_replied: Dict[str, Dict[str, Any]] = {}
        for key, entry in replied.items():
            if isinstance(entry, dict) and _is_number(entry.get("at")) and "\x1f" in key:
                reply_id = entry.get("reply_id")
                clean_replied[key] = {"at": float(entry["at"]),
                                      "reply_id": reply_id if isinstance(reply_id, str) else None}
            else:
                log.warning("%s: dropped a malformed entry %r", self.path.name, key)
        clean_recent: Dict[str, List[float]] = {}
        for sender, times in recent.items():
            if isinstance(times, list):
                clean_recent[str(sender).lower()] = [float(t) for t in times if _is_number(t)]
        return {"version": LEDGER_VERSION, "replied": clean_replied, "recent": clean_recent}

    def already_replied(self, key: MessageKey) -> bool:
        return key_str(key) in self._data["replied"]

    def reply_for(self, key: MessageKey) -> Optional[Dict[str, Any]]:
        """``{"at": epoch, "reply_id": id or None}`` when the key was recorded."""
        entry = self._data["replied"].get(key_str(key))
        return dict(entry) if entry is not None else None

    def recent_count(self, sender: str, now: Optional[float] = None,
                     window: float = DEFAULT_PER_SENDER_WINDOW) -> int:
        """Automatic replies sent to ``sender`` in the last ``window`` seconds.

        A time after ``now`` (the clock went back) still counts: a limit must not reset itself.
        """
        when = self.clock() if now is None else now
        return sum(1 for t in self._data["recent"].get(sender.strip().lower(), []) if t > when - window)

    def recent_total(self, now: Optional[float] = None, window: float = DEFAULT_PER_SENDER_WINDOW,
                     which: Callable[[str], bool] = lambda sender: True) -> int:
        """Automatic replies sent in the last ``window`` seconds to the senders ``which`` keeps."""
        when = self.clock() if now is None else now
        return sum(1 for sender, times in self._data["recent"].items() if which(sender)
                   for t in times if t > when - window)

    def within_limit(self, sender: str, now: Optional[float] = None,
                     limit: int = DEFAULT_PER_SENDER_LIMIT,
                     window: float = DEFAULT_PER_SENDER_WINDOW) -> bool:
        return self.recent_count(sender, now, window) < limit

    def stage(self, key: MessageKey, sender: str, reply_id: Optional[str],
              now: Optional[float] = None, *, sent: bool = True) -> bool:
        """Remember the (coming) reply to ``key`` in memory, for :meth:`flush` to write.

        From now on :meth:`already_replied` and :meth:`recent_count` count it, so one cycle's
        later decisions see its earlier ones. ``sent`` False records a decision that sends no
        mail (an acknowledgement mark, a reply withheld by the limit): remembered, not counted
        against the sender's limit. Returns False when the key is already recorded.
        """
        when = self.clock() if now is None else now
        name = key_str(key)
        if name in self._data["replied"]:
            return False
        entry = {"at": when, "reply_id": reply_id}
        self._data["replied"][name] = entry
        who = sender.strip().lower()
        if sent:
            self._data["recent"].setdefault(who, []).append(when)
        self._staged[name] = (key, entry, who, sent)
        return True

    def flush(self) -> Set[MessageKey]:
        """Write what :meth:`stage` remembered, in one write; the keys that may be answered.

        Re-reads the file under the lock (``auto_reply.json.lock``): a key that another process
        recorded meanwhile is left out of the answer, so it is answered once. Writes nothing
        when nothing was staged. Raises :class:`SuiteError` when the file cannot be written:
        then nothing staged may be answered.
        """
        if not self._staged:
            return set()
        staged, self._staged = self._staged, {}
        lock_path = self.path.with_name(self.path.name + ".lock")
        accepted: Set[MessageKey] = set()
        try:
            with file_lock(lock_path, timeout=LEDGER_LOCK_TIMEOUT):
                self._data = self._load()  # another process may have recorded some of them
                replied, recent = self._data["replied"], self._data["recent"]
                latest = self.clock()
                for name, (key, entry, sender, sent) in staged.items():
                    latest = max(latest, entry["at"])
                    if name in replied:
                        continue
                    replied[name] = entry
                    if sent:
                        recent.setdefault(sender, []).append(entry["at"])
                    accepted.add(key)
                self._prune(latest)
                if accepted:
                    atomic_write_json(self.path, self._data)
        except SuiteError:
            raise
        except Exception as exc:  # noqa: BLE001 - filelock.Timeout and OSError: one typed error
            raise SuiteError(f"cannot record automatic replies in {self.path}: {exc}") from exc
        return accepted

    def record(self, key: MessageKey, sender: str, reply_id: Optional[str],
               now: Optional[float] = None, *, sent: bool = True) -> bool:
        """:meth:`stage` and :meth:`flush` one decision: written at once. False, writing
        nothing, when the key was already recorded (here or by another process): do not send."""
        if not self.stage(key, sender, reply_id, now, sent=sent):
            return False
        return key in self.flush()

    def _prune(self, now: float) -> None:
        """Keep the file bounded: 30 days of replies, a day of per-sender times."""
        replied = self._data["replied"]
        for name in [n for n, e in replied.items() if e["at"] < now - LEDGER_RETENTION_S]:
            del replied[name]
        if len(replied) > LEDGER_MAX_ENTRIES:
            keep = sorted(replied.items(), key=lambda item: item[1]["at"])[-LEDGER_MAX_ENTRIES:]
            self._data["replied"] = dict(keep)
        recent = self._data["recent"]
        for sender in list(recent):
            recent[sender] = [t for t in recent[sender] if t >= now - RECENT_RETENTION_S]
            if not recent[sender]:
                del recent[sender]

    def keys(self) -> List[MessageKey]:
        return [key_from_str(name) for name in self._data["replied"]]


# --------------------------------------------------------------------------- reply texts


def _number(value: Any, digits: int) -> Optional[str]:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not _is_number(value):
        return None
    return f"{value:.{digits}f}"


def _state_name(value: Any) -> str:
    value = getattr(value, "value", value)  # an enum such as CircuitState
    if value is None or (isinstance(value, str) and not value.strip()):
        return "unknown"
    return one_line(value, 40).upper()


def _check_lines(checks: Any, overall: str) -> List[str]:
    """Lines that explain a problem: checks whose status is not HEALTHY, and, when the overall
    state is not HEALTHY, plain check messages (one of them says why). A healthy server's reply
    stays at the standard lines."""
    lines: List[str] = []
    if isinstance(checks, dict):
        items = list(checks.items())
    elif isinstance(checks, list):
        items = [(None, item) for item in checks]
    else:
        return lines
    for name, value in items:
        if isinstance(value, dict):
            status = _text(value.get("status")).upper()
            message = value.get("message")
            if status == "HEALTHY" or (not status and overall == "HEALTHY"):
                continue
            text = f"{status.lower()}: {message}" if status and message else (message or status)
        else:
            if overall == "HEALTHY":
                continue
            text = value
        if text is None or not str(text).strip():
            continue
        label = f"Check {name}: " if name else "Check: "
        lines.append(one_line(label + str(text), MAX_LINE))
        if len(lines) >= MAX_STATUS_CHECK_LINES:
            break
    return lines


def render_status(server: str, status: Any, *, uptime_s: Optional[float], version: str) -> str:
    """The status reply: this server's real state, one fact a line (never the original body)."""
    if isinstance(status, BaseException):
        reason = one_line(str(status) or type(status).__name__, 200)
        return "\n".join([f"Status of {server}: health unavailable: {reason}",
                          f"Uptime: {format_duration(uptime_s)}", f"Version: {version}"])
    if not isinstance(status, dict):
        return "\n".join([f"Status of {server}: health unavailable: no status report",
                          f"Uptime: {format_duration(uptime_s)}", f"Version: {version}"])

    def value(key: str, digits: int) -> str:
        return _number(status.get(key), digits) or "unknown"

    overall = _state_name(status.get("overall"))
    disk = _number(status.get("disk_free_gb"), 1)
    memory = _number(status.get("memory_percent"), 0)
    cpu = _number(status.get("cpu_percent"), 0)
    lines = [
        f"Status of {server}: {overall}",
        f"Disk: {disk} GB free" if disk else "Disk: unknown",
        f"Memory: {memory} % used" if memory else "Memory: unknown",
        f"CPU: {cpu} %" if cpu else "CPU: unknown",
        f"Retry queue: {value('queue_pending', 0)} pending, {value('queue_dead', 0)} dead",
        f"Circuit breaker: {_state_name(status.get('breaker'))}",
    ]
    age = status.get("last_fetch_age_s")
    lines.append(f"Last fetch: {format_duration(age)} ago" if _is_number(age) else "Last fetch: unknown")
    lines.append(f"Uptime: {format_duration(uptime_s)}")
    lines.append(f"Version: {version}")
    lines.extend(_check_lines(status.get("checks"), overall))
    return "\n".join(lines)


def render_presence(server: str, *, uptime_s: Optional[float], version: str) -> str:
    return f"{server} is online (up {format_duration(uptime_s)}, monitor {version})."


def render_ack(server: str, subject: Any) -> str:
    shown = one_line(subject, MAX_LINE) if isinstance(subject, str) and subject.strip() else "(no subject)"
    return f"Acknowledged by {server}: {shown}"


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    """What to do with one message.

    ``acknowledge``: add this server to ``acknowledged_by`` and set ``ack_status`` in the
    transaction that marks the message read. ``reply``: the fields of the message to send (or
    ``None``). ``limited``: a reply was withheld by the per-sender limit.
    """

    rule: str
    kind: str
    acknowledge: bool
    reply: Optional[Dict[str, Any]]
    limited: bool = False


class AutoResponder:
    """Decides, for one server, whether and how to answer a message automatically.

    ``decide`` is pure apart from reading the ledger and calling ``status_provider``. The caller
    records a decision before it sends, and before deciding on the next message (the per-sender
    limit counts recorded replies): a monitor's cycle keeps each decision in memory with
    :meth:`hold`, then :meth:`commit_held` writes them all at once and returns the replies to
    queue; :meth:`commit` writes a single decision at once.
    """

    def __init__(self, server: str, rules_source_or_ruleset: Union[RuleSource, RuleSet],
                 ledger: ReplyLedger, *, status_provider: Callable[[], Dict[str, Any]],
                 started_at: float, version: str, clock: Callable[[], float] = time.time,
                 max_age_hours: float = DEFAULT_MAX_AGE_HOURS,
                 per_sender_limit: int = DEFAULT_PER_SENDER_LIMIT,
                 per_sender_window: float = DEFAULT_PER_SENDER_WINDOW,
                 overall_limit: int = DEFAULT_OVERALL_LIMIT) -> None:
        self.server = normalize_server_id(server)
        self.rules = rules_source_or_ruleset
        self.ledger = ledger
        self.status_provider = status_provider
        self.started_at = started_at
        self.version = version
        self.clock = clock
        if not 0 < max_age_hours * 3600.0 < LEDGER_RETENTION_S:
            # Past the ledger's retention an old message could be answered a second time.
            raise UsageError(f"max_age_hours must be between 0 and {LEDGER_RETENTION_S / 3600:g}")
        if per_sender_limit < 0:
            raise UsageError("per_sender_limit must not be negative")
        if not 0 < per_sender_window <= RECENT_RETENTION_S:
            raise UsageError(f"per_sender_window must be between 0 and {RECENT_RETENTION_S:g} s")
        if overall_limit < 0:
            raise UsageError("overall_limit must not be negative")
        self.max_age_hours = max_age_hours
        self.per_sender_limit = per_sender_limit
        self.per_sender_window = per_sender_window
        self.overall_limit = overall_limit
        # Messages this server has answered already, as the mailbox shows (its automatic replies'
        # in_reply_to), set by the monitor each cycle: what another clone of this server answered,
        # or this clone before its ledger was lost, is not answered again.
        self.answered: Set[MessageKey] = set()  # (the request's id, its sender)
        # The roster's servers (coordination/servers.json), set by the monitor each cycle: the
        # limit for all senders together never holds back their requests (made-up senders cannot
        # use up the budget of the fleet's own servers).
        self.roster: Set[str] = set()
        self._status: Optional[Tuple[float, Any]] = None
        self._held: List[Tuple[Mapping[str, Any], Decision, Dict[str, Any]]] = []
        # sender -> when a withheld reply was last logged as a warning: one warning per sender
        # and window, not one per message, when a sender floods this server with requests.
        self._limit_warned: Dict[str, float] = {}

    def ruleset(self) -> RuleSet:
        rules = self.rules
        return rules.current() if isinstance(rules, RuleSource) else rules

    def uptime(self, now: Optional[float] = None) -> float:
        return max(0.0, (self.clock() if now is None else now) - self.started_at)

    def decide(self, msg: Mapping[str, Any]) -> Optional[Decision]:
        now = self.clock()
        ok, reason = _gate(msg, self.server, now, self.max_age_hours)
        if not ok:
            log.debug("no automatic reply to %s: %s", msg.get("id") if isinstance(msg, dict) else "?",
                      reason, extra={"metadata": {"reason": reason.split(":")[0]}})
            return None
        key = message_key(msg)
        if self.ledger.already_replied(key) or (msg["id"], msg["from"].strip().lower()) in self.answered:
            return None
        kinds = ("acknowledge",) if reason.startswith(ACK_ONLY) else None
        rule = self.ruleset().match(msg, kinds)
        if rule is None:
            return None
        acknowledge = rule.kind == "acknowledge"
        if acknowledge and not rule.send_ack_message:
            return Decision(rule=rule.name, kind=rule.kind, acknowledge=True, reply=None)
        sender = msg["from"].strip().lower()
        if not self.ledger.within_limit(sender, now, self.per_sender_limit, self.per_sender_window):
            shown_id = one_line(msg["id"], 80)
            log.log(
                logging.WARNING if self._first_limited(sender, now) else logging.DEBUG,
                "automatic reply to %s withheld: %d automatic replies to %s in the last %s "
                "(limit %d)", shown_id, self.ledger.recent_count(sender, now, self.per_sender_window),
                sender, format_duration(self.per_sender_window), self.per_sender_limit,
                extra={"metadata": {"id": shown_id, "from": sender, "rule": rule.name,
                                    "limit": self.per_sender_limit}})
            return Decision(rule=rule.name, kind=rule.kind, acknowledge=acknowledge, reply=None,
                            limited=True)
        # Two budgets of the same size: the roster's servers and everyone else, so that a flood
        # from made-up ids cannot use up the fleet's own (nor the reverse), and the total stays
        # bounded whatever the roster names (any member can commit one of 300 names).
        listed = sender in self.roster
        if self.ledger.recent_total(now, self.per_sender_window,
                                    lambda who: (who in self.roster) == listed) >= self.overall_limit:
            shown_id = one_line(msg["id"], 80)
            log.log(logging.WARNING if self._first_limited("\0all", now) else logging.DEBUG,
                    "automatic reply to %s withheld: %d automatic replies in the last %s (limit %d for %s "
                    "together)", shown_id, self.overall_limit, format_duration(self.per_sender_window),
                    self.overall_limit, "the roster's servers" if listed else "all senders the roster does not name",
                    extra={"metadata": {"id": shown_id, "from": sender, "rule": rule.name,
                                        "limit": self.overall_limit}})
            return Decision(rule=rule.name, kind=rule.kind, acknowledge=acknowledge, reply=None,
                            limited=True)
        return Decision(rule=rule.name, kind=rule.kind, acknowledge=acknowledge,
                        reply=self._reply(msg, rule, sender, now))

    def _first_limited(self, sender: str, now: float) -> bool:
        """Whether this withheld reply is the first to ``sender`` in the current window."""
        last = self._limit_warned.get(sender)
        if last is not None and now - last < self.per_sender_window:
            return False
        self._limit_warned.pop(sender, None)
        self._limit_warned[sender] = now
        while len(self._limit_warned) > LIMIT_WARNED_SENDERS:
            del self._limit_warned[next(iter(self._limit_warned))]
        return True

    def _reply(self, msg: Mapping[str, Any], rule: Rule, sender: str, now: float) -> Dict[str, Any]:
        uptime = self.uptime(now)
        if rule.kind == "acknowledge":
            body, kind = render_ack(self.server, msg.get("subject")), "ack"
        elif rule.kind == "presence":
            body, kind = render_presence(self.server, uptime_s=uptime, version=self.version), "response"
        else:
            body = render_status(self.server, self._status_now(now), uptime_s=uptime, version=self.version)
            kind = "response"
        # Always to the sender alone, also for a broadcast: one answer, to who asked; its subject
        # on one line, without the request's control characters.
        subject = _CONTROL.sub(" ", reply_subject(_subject_head(msg)))
        return {"to": sender, "subject": subject, "body": body,
                "type": kind, "priority": "normal", "in_reply_to": msg["id"], "auto": True}

    def _status_now(self, now: float) -> Any:
        """The status an automatic reply reports: one snapshot for every request of a cycle."""
        if self._status is not None and 0 <= now - self._status[0] < STATUS_REUSE_S:
            return self._status[1]
        try:
            status: Any = self.status_provider()
        except Exception as exc:  # noqa: BLE001 - the reply says why health is unavailable
            log.warning("status for an automatic reply unavailable: %s", exc)
            status = exc
        self._status = (now, status)
        return status

    def commit(self, msg: Mapping[str, Any], decision: Decision, reply_id: Optional[str]) -> bool:
        """Record the decision in the ledger (before sending). False: already recorded, do not send."""
        return self.ledger.record(message_key(msg), _text(msg.get("from")).strip().lower(), reply_id,
                                  self.clock(), sent=decision.reply is not None)

    def hold(self, msg: Mapping[str, Any], decision: Decision,
             reply: Optional[Dict[str, Any]] = None) -> bool:
        """Record the decision in memory, for :meth:`commit_held` to write; the next
        :meth:`decide` already counts it. ``reply``: the complete message that answers ``msg``
        (its ``id`` included), or ``None``. False: already recorded, nothing to send."""
        reply_id = reply.get("id") if reply is not None else None
        if not self.ledger.stage(message_key(msg), _text(msg.get("from")).strip().lower(),
                                 reply_id if isinstance(reply_id, str) else None, self.clock(),
                                 sent=decision.reply is not None):
            return False
        if reply is not None:
            self._held.append((msg, decision, reply))
        return True

    def commit_held(self) -> List[Tuple[Mapping[str, Any], Decision, Dict[str, Any]]]:
        """Write every held decision to the ledger, in one write, and return the held
        ``(message, decision, reply)`` that may now be sent -- after this returns, so that the
        ledger is durable first. A message that another process recorded meanwhile is left out;
        when the write fails (:class:`SuiteError`), nothing held may be sent."""
        held, self._held = self._held, []
        accepted = self.ledger.flush()
        return [item for item in held if message_key(item[0]) in accepted]


# --------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fleet_cli import ArgumentParser

    parser = ArgumentParser(
        prog="auto_reply.py",
        description="Check an automatic-reply rules file before committing it as "
                    f"{SHARED_RULES_PATH} (exit 0 valid, 2 invalid).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", metavar="FILE", help="validate a rules file")
    group.add_argument("--print-defaults", action="store_true", help="print the default rules")
    args = parser.parse_args(argv)
    from fleet_cli import run_cli

    return run_cli("auto_reply", lambda: _check_or_print(args), catch_all=True)


def _check_or_print(args: argparse.Namespace) -> int:
    if args.print_defaults:
        write_text(dump_json_text(DEFAULT_RULES_DOCUMENT))
        return EXIT_OK
    rules = load_rules(Path(args.check))
    enabled = [rule for rule in rules.rules if rule.enabled]
    write_line(f"{args.check}: valid, {len(rules.rules)} rules ({len(enabled)} enabled): "
               f"{', '.join(f'{r.name} ({r.kind})' for r in enabled) or 'no automatic replies'}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
