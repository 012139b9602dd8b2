"""What a short command does before its modules load: it starts the git call it is about to make.

``inbox.py list`` spends its time in two waits that need not follow each other: the remote's
answer to one ``git fetch`` (16 ms from a bare repository on the same disk, a round trip or more
over a network) and Python loading the suite (about 20 ms of imports). So its script calls
:func:`start_poll` first, with nothing but :mod:`os` and :mod:`sys` loaded. That reads the few
things the command's first fetch depends on from the command line, the environment and the files
git keeps (the clone's top folder, the branch ``origin/HEAD`` names, whether the clone mirrors the
server's own state ref), and starts that fetch; the imports then run while git works. The command
goes on as always and works out its fetch the usual way; :class:`fleet_git.Clone` takes the
started process instead of starting one when both argument lists and the folder are the same,
word for word (:func:`adopt`). A wrong guess therefore costs a call that was not needed, never a
wrong one. Whatever cannot be told without git or the suite's own checks (an abbreviated option,
``--help``, a linked worktree or a ``.git`` file, a reftable, an ``origin/HEAD`` that is not a
plain file, a server id or branch the suite would refuse) starts nothing. A started call the
command did not take is stopped when the command ends (:func:`stop_unused`: after a second's
grace, by SIGTERM to the process group git leads, on which git removes its lock files; on Windows
with its helpers).

A look at the fleet (:func:`start_look`) lists the remote before it can fetch the state refs
that moved; the listing is in well before the suite has loaded, so a thread of the script
(:func:`_look_ahead`) composes and starts that fetch meanwhile, and the command takes it as it
takes the others (:func:`mirrors_at_start` hands it the mirrors the thread compared with). From
a remote reached by a path (:func:`remote_folder`: a folder on this machine or a share, once git's
reading of the clone's settings agrees), the script reads the remote's refs from its files as
``ls-remote`` would there (:func:`remote_listing`) and starts the look's one fetch of the branch
and the state refs that moved itself (:func:`_look_by_path`); the command follows the way the
script chose (:func:`look_at_start`).

This module is the one owner of what those calls are, for the early start and the usual path
alike: the environment git runs in (:func:`git_env`), a fetch's fixed words (:func:`fetch_args`),
the monitor's and the inbox's poll (:func:`poll_fetch_args`, :func:`own_state_refspecs`), the
names of the state refs (PROTOCOL.md, "Per-server state refs") and the fetch of those that moved
(:func:`moved_state_refspecs`, :func:`state_fetch_command`), the default clone and server, how
refs and ``origin/HEAD`` are read from git's files backend (:func:`read_ref`, :func:`refs_in`,
:func:`origin_head`), and when and how a remote reached by a path is listed that way
(:func:`remote_folder`, :func:`remote_listing`).

:func:`leave` also ends the process without the interpreter's teardown: freeing, one by one, every
object and module a short command made costs 5 to 10 ms, a fifth of an ``inbox.py list``, to give
back memory the process returns whole a moment later. ``atexit`` handlers still run (logging's
flush is one) and both streams are flushed; where that cannot be sure to be all (a thread that is
not a daemon still running, a stream that cannot be flushed, a debugger, profiler or coverage
run that writes its results after the script, ``python -i``), the usual ``SystemExit``.

Imports: :mod:`os`, :mod:`sys` and :mod:`_thread` only, so that calling it first costs nothing the
command would not pay anyway (fleet_cli, "Start-up"). Where the C library can start a process itself
(``os.posix_spawnp``: Linux, macOS) the calls start without :mod:`subprocess`, whose import (it
brings :mod:`locale` and :mod:`re`) would delay them by 10 ms; :class:`SpawnedGit` gives them the
part of ``subprocess.Popen`` that :mod:`fleet_git` uses. Windows starts them with ``subprocess``.
"""

from __future__ import annotations

import _thread
import gc
import io  # (loaded with the interpreter: its open() is io's)
import os
import sys

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import subprocess
    from typing import Callable, Collection, Dict, Final, FrozenSet, List, Mapping, NoReturn, Optional, Sequence, Tuple

DEFAULT_REPO: Final = "K:/Projects/Build"
DEFAULT_SERVER: Final = "code2"

# PROTOCOL.md, "Per-server state refs": refs/fleet/<id> on the remote and, mirrored, in every clone;
# on a remote that refuses custom refs, the branch refs/heads/fleet-state/<id>, mirrored locally as
# refs/fleet-state/<id> (not a local branch).
REF_PREFIX: Final = "refs/fleet/"
FALLBACK_PREFIX: Final = "refs/heads/fleet-state/"
LOCAL_FALLBACK_PREFIX: Final = "refs/fleet-state/"
BROADCAST: Final = "all"  # the "to" of a message for everyone: no server's id
# Servers whose state refs one reader fetches and reads (a look at the fleet, the archive): any
# member can push refs, and ephemeral servers leave theirs behind. The others are counted.
MAX_STATE_SERVERS: Final = 1000
# More refspecs than this go to ``git fetch --stdin`` (Windows bounds a command line at 32,767
# characters, a few hundred refspecs).
REFSPECS_IN_ARGV: Final = 32
# Set in a clone's git configuration once a state ref that carries history was fetched there
# (fleet_state.StateStore._fetch_states): its state refs are then fetched with negotiation.
NEGOTIATE_KEY: Final = "fleet.negotiatestaterefs"

# A folder that cannot exist (below the null device): git finds no hook there.
NO_HOOKS: Final = os.path.join(os.devnull, "fleet-mailbox-runs-no-hooks")

# The poll's fetch (the monitor's every cycle, and every inbox command's first look) and the
# state refs' fetch: quiet, no tags nor submodules, and no FETCH_HEAD rewritten by an idle cycle.
POLL_OPTIONS: Final = ("--quiet", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head", "origin")

LOOSE_COMPRESSION: Final = 1  # zlib level for loose objects, ours and fetched: a multi-megabyte mailbox stays cheap

# The one reading of a clone's settings a command makes (fleet_git.Clone), in one process.
CONFIG_ARGS: Final = ("config", "-z", "--get-regexp",
                      r"^(remote\.origin\.(url|fetch|uploadpack)|(user|author|committer)\.(name|email)"
                      r"|extensions\.objectformat|gc\.(auto|autopacklimit)|maintenance\..*"
                      r"|fleet\.negotiatestaterefs|url\..*\.insteadof|(transfer|uploadpack)\.hiderefs"
                      r"|remote\.origin\.vcs|protocol\.(.*\.)?allow)$")

HEX_DIGITS: Final = frozenset("0123456789abcdef")
ANY_HEXLEN: Final = 0  # is_oid's "40 or 64": what a script may read before it knows the object format
MAX_LOOSE_REF_BYTES: Final = 256  # an object id and a newline; a longer file is no ref git wrote
EXIT_INTERRUPTED: Final = 130  # a Ctrl+C (PROTOCOL.md, "Command-line contract")
STOP_GRACE_SECONDS: Final = 1.0  # a started call nobody took may finish this long before it is stopped
LOOK_AHEAD_SWITCH_SECONDS: Final = 0.0002  # the interpreter's turns while the look-ahead runs (default 5 ms)
LOOK_AHEAD_STEP_SECONDS: Final = 0.05  # the look-ahead's waits, between which it sees the command take over


class _Unknown:
    """Only git can tell (another ref storage, a symbolic ref, a file git would not write)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


# --------------------------------------------------------------------------- git's environment


def git_env(extra: Optional[Mapping[str, str]] = None, *, hooks: bool = False) -> Dict[str, str]:
    """The environment for git: inherited, minus what hooks set, never prompting (STYLE.md 3),
    and running no hook unless ``hooks`` (a git server a test starts runs its remote's hooks)."""
    env = dict(os.environ)
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX",
                "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES"):
        env.pop(key, None)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GCM_INTERACTIVE"] = "never"
    env["LC_ALL"] = "C"
    env["LANGUAGE"] = "C"
    # No hook runs in the suite's own git calls: a clone whose core.hooksPath points into the
    # shared tree (.githooks, husky) would otherwise run what any member pushed, as this server,
    # on the monitor's next fast-forward, fetch or push. (git 2.31+ reads these variables.)
    # (A remote on a local path runs its own hooks all the same: git clears these variables for
    # the receive-pack it starts there.)
    try:
        count = max(0, int(env.get("GIT_CONFIG_COUNT") or 0))
    except ValueError:
        count = 0
    if not hooks:
        env[f"GIT_CONFIG_KEY_{count}"] = "core.hooksPath"
        env[f"GIT_CONFIG_VALUE_{count}"] = NO_HOOKS
        env["GIT_CONFIG_COUNT"] = str(count + 1)
    if extra:
        env.update(extra)
    return env


def own_group() -> Dict[str, object]:
    """``Popen``'s words for a git child in a process group of its own: a Ctrl+C meant for the
    monitor does not kill a push half-way (the monitor finishes the current step and stops), and
    :func:`fleet_git.stop_git` can stop git with its helpers."""
    if os.name == "nt":
        import subprocess

        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def popen_git(repo: str, args: Sequence[str], stdin: object = None) -> "subprocess.Popen[bytes]":
    """Start ``git <args>`` in ``repo`` (pipes for its output; ``stdin``, or none) in a process
    group of its own (:func:`own_group`). ``FileNotFoundError`` when there is no git."""
    import subprocess

    return subprocess.Popen(["git", *args], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if stdin is None else stdin, env=git_env(),
                            **own_group())  # type: ignore[call-overload]


# --------------------------------------------------------------------------- the calls


def fetch_args(args: Sequence[str], config: Sequence[str] = ()) -> List[str]:
    """git's arguments for a fetch of the suite: git's automatic maintenance is left to
    :meth:`fleet_git.Clone.maintain`."""
    return [*config, "-c", "maintenance.auto=false", "fetch", *args]


def tracking_ref(branch: str) -> str:
    """Where a clone keeps the remote's ``branch`` (``origin/<branch>``)."""
    return f"refs/remotes/origin/{branch}"


def branch_refspec(branch: str) -> str:
    return f"+refs/heads/{branch}:{tracking_ref(branch)}"


def own_state_refspecs(server: str, mirrored: Callable[[str], object]) -> List[str]:
    """The refspecs of ``server``'s own state ref, by its exact name under either name (PROTOCOL.md),
    for each that ``mirrored(local_ref)`` finds in this clone: no pattern, so no other server's ref
    (``code20`` for ``code2``) or ref nested below it is ever fetched."""
    specs = []
    for remote, local in ((REF_PREFIX + server, REF_PREFIX + server),
                          (FALLBACK_PREFIX + server, LOCAL_FALLBACK_PREFIX + server)):
        if mirrored(local):
            specs.append(f"+{remote}:{local}")
    return specs


def poll_fetch_args(specs: Sequence[str]) -> List[str]:
    """The poll's fetch of ``specs`` (the branch's refspec, then the own state ref's)."""
    return fetch_args([*POLL_OPTIONS, *specs])


def branch_fetch_args(branch: str, *, refetch: bool = False, keep_pack: bool = False) -> List[str]:
    """The fetch of the shared branch alone (:meth:`fleet_git.Clone.fetch`): ``refetch`` fetches
    every object again (``--refetch``) and keeps them as a pack, ``keep_pack`` keeps a pack."""
    # A refetch keeps what it gets as a pack: unpacking would skip every object that exists
    # loose, damaged ones included, while git reads a packed copy first.
    config = ["-c", f"core.looseCompression={LOOSE_COMPRESSION}"]
    if keep_pack:
        config += ["-c", "fetch.unpackLimit=1"]
    options = ["--refetch"] if refetch else []
    return fetch_args(["--quiet", "--no-tags", "--no-recurse-submodules", *options, "origin",
                       branch_refspec(branch)], config)


def listing_args(branch: str) -> List[str]:
    """The listing of the shared branch and every state ref on the remote (``ls-remote``)."""
    return ["ls-remote", "origin", f"refs/heads/{branch}", REF_PREFIX + "*", FALLBACK_PREFIX + "*"]


def listed_refs(out: bytes) -> Dict[str, str]:
    """The refs of a listing's output (``ls-remote``: ``<id> TAB <name>`` lines), name -> id."""
    refs = {}
    for line in out.decode("utf-8", "replace").splitlines():
        oid, _, ref = line.partition("\t")
        refs[ref] = oid
    return refs


def parse_state_ref(ref: str) -> Optional[Tuple[str, str]]:
    """(server, local mirror ref) for a remote state ref's name, or ``None`` for anything else
    (a name that is not a server id as written in its canonical lower case)."""
    for prefix, local in ((REF_PREFIX, REF_PREFIX), (FALLBACK_PREFIX, LOCAL_FALLBACK_PREFIX)):
        if ref.startswith(prefix):
            name = ref[len(prefix):]
            if server_id_shape(name) and name != BROADCAST:
                return name, local + name
    return None


def listed_state_refs(tips: Mapping[str, str]) -> Dict[str, List[Tuple[str, str, str]]]:
    """The state refs among a listing's refs (name -> id), by server: (remote ref, local mirror, id)."""
    found: Dict[str, List[Tuple[str, str, str]]] = {}
    for ref, oid in tips.items():
        parsed = parse_state_ref(ref)
        if parsed is not None:
            found.setdefault(parsed[0], []).append((ref, parsed[1], oid))
    return found


def moved_state_refspecs(found: Mapping[str, Sequence[Tuple[str, str, str]]], servers: Sequence[str],
                         mirrored: Callable[[str], Optional[str]], *, by_name: bool = False,
                         gone: Collection[str] = ()) -> List[str]:
    """Refspecs for the state refs of ``servers`` (listed in ``found``, :func:`listed_state_refs`)
    whose listed id is not what ``mirrored(local mirror)`` holds, those in ``gone`` left out: by
    the id listed (git then asks the remote for no ref list, one round trip less, and the mirror
    gets exactly what was listed), or ``by_name``."""
    specs = []
    for server in servers:
        for ref, local, oid in sorted(found[server]):
            if mirrored(local) != oid and ref not in gone:
                specs.append(f"+{ref if by_name or not is_oid(oid, ANY_HEXLEN) else oid}:{local}")
    return specs


def state_fetch_command(wanted: Sequence[str], *, negotiate: bool, branch: Optional[str] = None,
                        branch_from: Optional[str] = None) -> Tuple[Tuple[str, ...], List[str], Optional[bytes]]:
    """(git's ``-c`` options, ``fetch``'s arguments, its standard input) for a fetch of the state
    refs ``wanted``: beyond :data:`REFSPECS_IN_ARGV` of them, on standard input; without
    negotiation unless ``negotiate`` (fleet_state.StateStore._fetch_states says why).

    ``branch``: the shared branch's refspec too, first (a look at a remote reached by a path,
    :func:`remote_folder`). Its history is negotiated from ``branch_from`` alone, the tracking ref,
    not from the mirrors of the state refs (root commits: nothing in common with it), so the
    remote finds the common commit in the first round; a clone without a tracking ref (a clone of
    another branch only) negotiates from all it has, as git does by default."""
    specs = [branch, *wanted] if branch is not None else list(wanted)
    args = list(POLL_OPTIONS)
    if branch is None:
        config: Tuple[str, ...] = () if negotiate else ("-c", "fetch.negotiationAlgorithm=noop")
    else:
        config = ("-c", f"core.looseCompression={LOOSE_COMPRESSION}")
        if branch_from is not None and not negotiate:
            config += ("-c", "fetch.negotiationAlgorithm=skipping")
            args.insert(-1, f"--negotiation-tip={branch_from}")
    if len(specs) <= REFSPECS_IN_ARGV:
        return config, args + specs, None
    return config, args[:-1] + ["--stdin", "origin"], "".join(spec + "\n" for spec in specs).encode("ascii")


def branch_look_refspec(branch: str, listed: Optional[str], fetched: object) -> Optional[str]:
    """The shared branch's refspec in a look's one fetch (:func:`state_fetch_command`), ``None``
    when the remote has no such branch (``listed`` is ``None``) or the tracking ref holds
    ``fetched`` = ``listed`` already. By name, not by the commit listed: another process of the
    clone (the monitor's poll) may move the tracking ref on meanwhile, and a fetch by an older
    commit would move it back."""
    if listed is None or listed == fetched:
        return None
    return branch_refspec(branch)


# --------------------------------------------------------------------------- git's files


def is_true(value: Optional[str]) -> bool:
    """Whether a boolean setting's value is true, in any of the spellings git accepts."""
    return (value or "").strip().lower() in ("true", "yes", "on", "1")


def is_oid(text: str, hexlen: int) -> bool:
    """Whether ``text`` is an object id of ``hexlen`` hex digits (:data:`ANY_HEXLEN`: SHA-1's 40
    or SHA-256's 64)."""
    return (len(text) in (40, 64) if hexlen == ANY_HEXLEN else len(text) == hexlen) and HEX_DIGITS.issuperset(text)


def packed_refs(common_dir: str, hexlen: int, max_bytes: Optional[int] = None) -> Optional[Dict[str, str]]:
    """``packed-refs`` as name -> id (empty when there is none); ``None`` when unreadable or,
    with ``max_bytes``, longer."""
    try:
        with open(os.path.join(common_dir, "packed-refs"), encoding="utf-8", errors="replace") as handle:
            text = handle.read(-1 if max_bytes is None else max_bytes + 1)
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    if max_bytes is not None and len(text) > max_bytes:
        return None
    found = {}
    for line in text.splitlines():
        oid, _, name = line.partition(" ")
        if is_oid(oid, hexlen):  # not the header, not a peeled "^<oid>" line
            found[name] = oid
    return found


def read_ref(common_dir: str, refname: str, hexlen: int, max_packed_bytes: Optional[int] = None) -> object:
    """A ref's id read from git's files backend (its loose file, then ``packed-refs``): ``None``
    when absent, :data:`UNKNOWN` when only git can tell (a reftable, a symbolic ref) or
    ``packed-refs`` is longer than ``max_packed_bytes``."""
    if os.path.isdir(os.path.join(common_dir, "reftable")):
        return UNKNOWN
    found = _loose_ref(os.path.join(common_dir, refname), hexlen)
    if found is not None:
        return found
    packed = packed_refs(common_dir, hexlen, max_packed_bytes)
    return UNKNOWN if packed is None else packed.get(refname)


def _loose_ref(path: str, hexlen: int) -> object:
    """The id a loose ref's file holds: ``None`` when there is no such file, :data:`UNKNOWN` when
    it cannot be read or holds no id (a symbolic ref, a file git would not write). Read without a
    file object (a third of the cost: a look reads one per server)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            data = os.read(fd, MAX_LOOSE_REF_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError:
        return UNKNOWN
    text = data.decode("ascii", "replace").strip()
    return text if len(data) <= MAX_LOOSE_REF_BYTES and is_oid(text, hexlen) else UNKNOWN


def refs_in(common_dir: str, folders: Sequence[str], hexlen: int, max_entries: Optional[int] = None,
            max_packed_bytes: Optional[int] = None) -> Optional[Dict[str, str]]:
    """The refs directly in these ref folders (``refs/fleet/``, say; not in folders below them),
    name -> id, read from git's files backend; ``None`` when only git can tell (a reftable, a
    symbolic ref, a file that is no ref) or, past ``max_entries`` in a folder or
    ``max_packed_bytes`` of ``packed-refs``, leaves it to git."""
    if os.path.isdir(os.path.join(common_dir, "reftable")):
        return None
    # Loose refs first, then packed-refs, as git reads them: a pack-refs in between (a gc) moves
    # refs from the first place to the second, never the other way.
    loose: Dict[str, str] = {}
    for folder in folders:
        try:
            with os.scandir(os.path.join(common_dir, folder)) as listing:
                entries = list(listing)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if max_entries is not None and len(entries) > max_entries:
            return None
        for entry in entries:
            if entry.is_symlink():
                return None  # a symbolic ref of old
            if entry.name.endswith(".lock") or not entry.is_file(follow_symlinks=False):
                continue  # a ref being written (git renames it into place), or a folder
            found = _loose_ref(entry.path, hexlen)
            if found is None:
                continue  # deleted meanwhile
            if found is UNKNOWN:
                return None
            loose[folder + entry.name] = found  # type: ignore[assignment]
    packed = packed_refs(common_dir, hexlen, max_packed_bytes)
    if packed is None:
        return None
    refs = {name: oid for name, oid in packed.items() if name.rpartition("/")[0] + "/" in folders}
    refs.update(loose)
    return refs


def read_settings(out: bytes) -> Tuple[Dict[str, str], FrozenSet[str]]:
    """The settings :data:`CONFIG_ARGS` printed (``key LF value NUL`` items): key (lower case) ->
    value, the last one where a key is set more than once, as git takes it, and those keys."""
    values: Dict[str, str] = {}
    repeated = set()
    for item in out.decode("utf-8", "surrogateescape").split("\0"):
        if item:
            key, _, value = item.partition("\n")
            key = key.lower()
            if key in values:
                repeated.add(key)
            values[key] = value
    return values, frozenset(repeated)


MAX_REMOTE_PACKED_REFS_BYTES: Final = 4 << 20  # a remote with a larger packed-refs is listed by git
MAX_REMOTE_REF_ENTRIES: Final = 4 * MAX_STATE_SERVERS  # nor one with more files than this in a state refs' folder
_REMOTE_SETTINGS_BYTES: Final = 64 << 10
_ENTER_REPO_SUFFIXES: Final = ("/.git", "", ".git/.git", ".git")  # git's enter_repo(), in its order


def remote_folder(settings: Mapping[str, str], repeated: Collection[str], root: str) -> Optional[str]:
    """The git folder of ``origin`` when it is reached by a path (``remote.origin.url`` a folder on
    this machine or a share, or a ``file:///`` URL) and its refs can be listed by reading them as
    git's files backend keeps them, what ``ls-remote`` does there (:func:`remote_listing`); else
    ``None``, and git lists the remote. ``settings``: :func:`read_settings` of the clone at ``root``.

    Left to git, which may refuse the remote or reach it otherwise: more than one URL, a URL any
    ``url.*.insteadOf`` may rewrite, another ``uploadpack`` or a ``remote.origin.vcs`` helper,
    any ``protocol.*allow`` setting (or ``GIT_ALLOW_PROTOCOL``, ``GIT_PROTOCOL_FROM_USER``), refs
    hidden from fetches (``hideRefs``, here or in the remote's own settings), a
    ``GIT_NAMESPACE``, a remote folder this user does not own (git refuses it as of "dubious
    ownership" unless ``safe.directory`` says otherwise; on Windows, where owners cannot be told
    without git, always), a remote whose ``.git`` is a file, a linked worktree or refs in a
    reftable. The folder is found as git's local transport finds it (``enter_repo``: the path with
    ``/.git``, as is, with ``.git/.git``, then with ``.git``)."""
    path = _remote_path(settings, repeated, root)
    return _git_folder(path) if path is not None else None


def _remote_path(settings: Mapping[str, str], repeated: Collection[str], root: str) -> Optional[str]:
    """The path ``remote.origin.url`` names, by the settings alone (:func:`remote_folder`)."""
    url = settings.get("remote.origin.url")
    if (not url or os.name == "nt" or "remote.origin.url" in repeated or "::" in url
            or "remote.origin.uploadpack" in settings or "remote.origin.vcs" in settings
            or any(key.startswith("url.") and key.endswith(".insteadof") for key in settings)
            or any(key.endswith(".hiderefs") for key in settings)
            or any(key.startswith("protocol.") and key.endswith("allow") for key in settings)
            or any(os.environ.get(name) for name in ("GIT_NAMESPACE", "GIT_ALLOW_PROTOCOL",
                                                      "GIT_PROTOCOL_FROM_USER"))):
        return None
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/") or "%" in path:
            return None  # a host, or an escaped character git would decode
    elif "://" in url:
        return None
    else:
        colon, slash = url.find(":"), url.find("/")
        if colon >= 0 and not 0 <= slash < colon:
            return None  # host:path, which git reaches by ssh
        path = os.path.join(root, os.path.expanduser(url))
    return path


def _git_folder(path: str) -> Optional[str]:
    """The git folder git's local transport finds at ``path``, when its refs can be read from its
    files as git lists them (:func:`remote_folder`)."""
    for suffix in _ENTER_REPO_SUFFIXES:
        candidate = path + suffix
        try:
            if os.path.isfile(candidate):
                return None  # a .git file naming the folder elsewhere
            if not os.path.isdir(candidate):
                continue
            if not (os.path.isfile(os.path.join(candidate, "HEAD"))
                    and all(os.path.isdir(os.path.join(candidate, name)) for name in ("objects", "refs"))):
                continue  # no git folder (git's is_git_directory)
        except (OSError, ValueError):
            return None
        if any(os.path.lexists(os.path.join(candidate, name)) for name in ("commondir", "reftable")):
            return None
        try:
            if os.stat(candidate).st_uid != os.geteuid():  # type: ignore[attr-defined]
                return None  # another user's: git may refuse it ("dubious ownership")
        except (OSError, AttributeError):
            return None
        try:
            with open(os.path.join(candidate, "config"), "rb") as handle:
                text = handle.read(_REMOTE_SETTINGS_BYTES + 1).lower()
        except FileNotFoundError:
            text = b""
        except OSError:
            return None
        if len(text) > _REMOTE_SETTINGS_BYTES or any(word in text for word in (b"hiderefs", b"include", b"refstorage")):
            return None
        return os.path.realpath(candidate)
    return None


def remote_listing(folder: str, branch: str) -> Optional[Dict[str, str]]:
    """What :func:`listing_args`' ``ls-remote`` lists of the remote at ``folder``
    (:func:`remote_folder`), name -> id, read from its files as git reads them: the shared branch,
    and the refs directly under ``refs/fleet/`` and ``refs/heads/fleet-state/`` (the only ones a
    listing's reader takes); ``None`` where only git can tell, or where git reads faster (a
    ``packed-refs`` over 4 MB, thousands of refs in a folder)."""
    listed = refs_in(folder, (REF_PREFIX, FALLBACK_PREFIX), ANY_HEXLEN, MAX_REMOTE_REF_ENTRIES,
                     MAX_REMOTE_PACKED_REFS_BYTES)
    if listed is None:
        return None
    tip = read_ref(folder, "refs/heads/" + branch, ANY_HEXLEN, MAX_REMOTE_PACKED_REFS_BYTES)
    if tip is UNKNOWN:
        return None
    if tip is not None:
        listed["refs/heads/" + branch] = tip  # type: ignore[assignment]
    return listed


def origin_head(git_dir: str) -> Optional[str]:
    """The branch ``refs/remotes/origin/HEAD`` names, read from its file (a symbolic ref is a
    small loose file in the files backend); ``None`` when that does not tell (git then decides)."""
    prefix = "ref: refs/remotes/origin/"
    try:
        with open(os.path.join(git_dir, "refs", "remotes", "origin", "HEAD"), "rb") as handle:
            text = handle.read(MAX_LOOSE_REF_BYTES + 1).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith(prefix) or len(text) > MAX_LOOSE_REF_BYTES:
        return None
    return text[len(prefix):] or None


# --------------------------------------------------------------------------- the early start

MAX_BRANCH_LENGTH: Final = 255
# What git-check-ref-format(1) refuses anywhere in a ref name: control characters, space, DEL, ~^:?*[\
_REF_TEXT_REFUSED: Final = frozenset([chr(code) for code in range(0x21)] + list("\x7f~^:?*[\\"))

_OWN_OPTIONS: Final = ("--repo", "--server", "--branch")
_STARTED: Dict[Tuple[str, Tuple[str, ...]], "subprocess.Popen[bytes]"] = {}
_STOP_AT_EXIT = False
_GUARD = _thread.allocate_lock()  # the look-ahead's start against the command's taking over and stop_unused
_TIPS_AT_START: Dict[Tuple[str, str], Optional[str]] = {}
_COLLECTOR_HELD = False


def _hold_collector() -> None:
    """Hold the cyclic garbage collector off while the suite loads (until :func:`loaded`): its
    modules, classes and functions, tens of thousands of objects, live as long as the process, and
    the collector walked them again and again as they came (4 % of a look at the fleet)."""
    global _COLLECTOR_HELD
    if gc.isenabled():
        gc.disable()
        _COLLECTOR_HELD = True


def loaded() -> None:
    """The script's modules are in (after :func:`start_poll` or :func:`start_look`): the collector
    leaves what they made be from now on (``gc.freeze``) and runs again for what the command does."""
    global _COLLECTOR_HELD
    if _COLLECTOR_HELD:
        _COLLECTOR_HELD = False
        gc.freeze()
        gc.enable()


class Loading:
    """``with fleet_start.Loading(prog, __name__):`` around a script's imports of its module. Run
    as a command: a Ctrl+C while they load ends it as one during the command does
    (``prog: interrupted`` on stderr, exit 130, the calls started early stopped: :func:`leave`),
    not with a traceback and exit 1; once they are in, :func:`loaded`. Imported, it does nothing."""

    __slots__ = ("prog", "command")

    def __init__(self, prog: str, module_name: str) -> None:
        self.prog = prog
        self.command = module_name == "__main__"

    def __enter__(self) -> "Loading":
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        if not self.command:
            return False
        if kind is KeyboardInterrupt:
            try:
                os.write(2, f"{self.prog}: interrupted\n".encode())
            except OSError:
                pass
            leave(EXIT_INTERRUPTED)
        if kind is None:
            loaded()
        return False


def start_poll(argv: Sequence[str], *, unless: Collection[str] = ()) -> None:
    """Start the poll's fetch (:func:`poll_fetch_args`) that the command on ``argv`` is about to
    run first, and the reading of the clone's settings, when everything they depend on can be read
    without git; not when a word of ``unless`` is on the command line (a command whose first
    network call is another). A clone that mirrors no state ref of this server yet lists the
    remote first (:class:`monitor_remote.RemotePoller`): that listing is started then. The
    collector is held off until the script's module is in (:class:`Loading`)."""
    _hold_collector()
    found = None if any(word in unless for word in argv) else _target(argv)
    if found is None:
        return
    root, git_dir, server, branch = found
    unknown = []

    def mirrored(ref: str) -> bool:
        tip = read_ref(git_dir, ref, ANY_HEXLEN)
        if tip is UNKNOWN:
            unknown.append(ref)
        return tip is not None and tip is not UNKNOWN

    own = own_state_refspecs(server, mirrored)
    if not unknown:
        _remember_tip(root, git_dir, branch)
        _start(root, poll_fetch_args([branch_refspec(branch), *own]) if own else listing_args(branch))
        _start(root, list(CONFIG_ARGS))


def start_look(argv: Sequence[str]) -> None:
    """Start the calls a look at the whole fleet (``fleet_status.py``) begins with
    (:meth:`fleet_state.StateStore.mirror_fleet`) and the reading of the clone's settings. From a
    remote reached by a path (:func:`remote_folder`, once git has given the settings), where git
    starts without subprocess: the one fetch of the branch and the state refs that moved, composed
    from the remote's refs read here (:func:`_look_by_path`). Else, side by side, the listing of
    the remote and the fetch of the shared branch, and a thread that starts the fetch of the state
    refs that moved as soon as the listing is in (:func:`_look_ahead`). The command follows the
    way chosen here (:func:`look_at_start`). The collector is held off until the script's module
    is in (:class:`Loading`)."""
    _hold_collector()
    found = _target(argv)
    if found is not None:
        root, git_dir, _server, branch = found
        _remember_tip(root, git_dir, branch)
        config = _start(root, list(CONFIG_ARGS))
        try:
            url = _written_url(git_dir) if isinstance(config, SpawnedGit) else None
            if url is not None and _look_by_path(root, git_dir, branch, config, url):  # type: ignore[arg-type]
                return
        except Exception:  # noqa: BLE001 - a guess: whatever it cannot read, the command reads itself
            if root in _CHOSEN:
                return
        _CHOSEN[root] = BY_LISTING
        listing = _start(root, listing_args(branch))
        _start(root, branch_fetch_args(branch))
        if isinstance(listing, SpawnedGit) and isinstance(config, SpawnedGit):
            _look_ahead(root, git_dir, listing, config)


class PathLook:
    """A look at a remote reached by a path (:func:`remote_folder`): the remote's refs as
    :func:`remote_listing` read them, the clone's mirrors of the state refs (``before``, as
    :func:`refs_in` read them) and the tracking ref's id (``fetched``; ``None``: no such ref), all
    read before the look's fetch."""

    __slots__ = ("listed", "before", "fetched")

    def __init__(self, listed: Dict[str, str], before: Dict[str, str], fetched: Optional[str]) -> None:
        self.listed = listed
        self.before = before
        self.fetched = fetched


BY_LISTING: Final = "by listing"  # look_at_start: the script listed the remote (the usual way)
_CHOSEN: Dict[str, object] = {}
PATH_LOOK_WAIT_SECONDS: Final = 2.0  # the settings the script waits for before it chooses


def _written_url(git_dir: str) -> Optional[str]:
    """``origin``'s URL as the clone's own settings file gives it (a first reading, before git's):
    only when :func:`_remote_path` takes it for a path does the script wait for git's reading."""
    try:
        with open(os.path.join(git_dir, "config"), "rb") as handle:
            text = handle.read(_REMOTE_SETTINGS_BYTES + 1).decode("utf-8", "replace")
    except OSError:
        return None
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.replace(" ", "").lower()
        elif section == '[remote"origin"]' and line.split("=", 1)[0].strip().lower() == "url":
            return line.partition("=")[2].strip().strip('"')
    return None


def _look_by_path(root: str, git_dir: str, branch: str, config: "SpawnedGit", url: str) -> bool:
    """When the remote is reached by a path (``url``, the settings file's, once git's reading of
    the settings agrees): read its refs and the mirrors, start the look's one fetch (unless nothing
    moved, or the command would compose another: more servers than :data:`MAX_STATE_SERVERS`, more
    refspecs than fit on the command line) and keep what it read for the command; whether it did."""
    fetched = _TIPS_AT_START.get((root, tracking_ref(branch)), UNKNOWN)
    path = _remote_path({"remote.origin.url": url}, (), root)
    folder = _git_folder(path) if path is not None else None
    if folder is None or fetched is UNKNOWN:
        return False
    listed = remote_listing(folder, branch)  # while git reads the settings
    before = refs_in(git_dir, (REF_PREFIX, LOCAL_FALLBACK_PREFIX), ANY_HEXLEN)
    done = config.finished_within(PATH_LOOK_WAIT_SECONDS)
    if listed is None or before is None or done is None or config.returncode != 0:
        return False
    settings, repeated = read_settings(done[0])
    if _remote_path(settings, repeated, root) != path:
        return False  # git's reading differs (an include, a rewriting, another scope)
    _CHOSEN[root] = PathLook(listed, before, fetched)  # type: ignore[arg-type]
    found = listed_state_refs(listed)
    if len(found) <= MAX_STATE_SERVERS:
        wanted = moved_state_refspecs(found, sorted(found), before.get)
        spec = branch_look_refspec(branch, listed.get("refs/heads/" + branch), fetched)
        if spec is not None or wanted:
            negotiate = is_true(settings.get(NEGOTIATE_KEY))
            config_words, args, stdin = state_fetch_command(wanted, negotiate=negotiate, branch=spec,
                                                            branch_from=tracking_ref(branch) if fetched else None)
            if stdin is None:
                _start(root, fetch_args(args, config_words))
    return True


def look_at_start(root: object) -> object:
    """How this command's script began its look in the clone at ``root`` (taken once): a
    :class:`PathLook` (the command composes its fetch from what the script read, and takes the one
    it started), :data:`BY_LISTING` (the command lists the remote as the script did), or ``None``
    (the script started nothing: the command chooses)."""
    return _CHOSEN.pop(os.fspath(root), None)  # type: ignore[arg-type]


def _target(argv: Sequence[str]) -> Optional[Tuple[str, str, str, str]]:
    """(top folder, git dir, server, branch) of the command on ``argv``, when all four are sure."""
    found = _command_line(argv)
    if found is None:
        return None
    repo, server, branch = found
    try:
        clone = _plain_clone(repo)
        if clone is None or not _plausible_server(server):
            return None
        root, git_dir = clone
        branch = branch if branch is not None else origin_head(git_dir)
    except (OSError, ValueError):
        return None  # an early start is a guess: whatever it cannot read, the command reads itself
    if branch is None or branch_name_problem(branch) is not None:
        return None
    return root, git_dir, server, branch


def _command_line(argv: Sequence[str]) -> Optional[Tuple[str, str, Optional[str]]]:
    """(repo, server, branch or None) as the command's parser would read them, or ``None``
    where this reading could differ from argparse's."""
    values: Dict[str, str] = {}
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in ("--", "-h", "--help"):
            return None
        name, equals, value = token.partition("=")
        if name in _OWN_OPTIONS:
            if not equals:
                if index + 1 >= len(tokens):
                    return None
                index += 1
                value = tokens[index]
            values[name] = value
        elif token.startswith("--") and any(option.startswith(name) for option in _OWN_OPTIONS):
            return None  # an abbreviation argparse would take for one of ours
        index += 1
    repo = values.get("--repo") or os.environ.get("BUILD_REPO_PATH") or DEFAULT_REPO
    server = values.get("--server", os.environ.get("SERVER_ID") or DEFAULT_SERVER)
    return repo, server, values.get("--branch")


def _plain_clone(repo: str) -> Optional[Tuple[str, str]]:
    """(top folder, git dir) of a plain clone at ``repo`` (its ``.git`` a folder, no
    ``commondir``: what :class:`fleet_git.Clone` reads without asking git; refs in files, not a
    reftable), else ``None``."""
    top = os.path.expanduser(repo)
    dotgit = os.path.join(top, ".git")
    if (not os.path.isdir(dotgit) or os.path.exists(os.path.join(dotgit, "commondir"))
            or os.path.exists(os.path.join(dotgit, "reftable"))):
        return None
    return os.path.realpath(top), os.path.realpath(dotgit)


_SERVER_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
# Names Windows keeps for devices, with or without an extension ("con", "nul.txt"): a folder of
# that name cannot be created there.
_WINDOWS_DEVICES: Final = frozenset(["con", "prn", "aux", "nul", *(f"{kind}{digit}" for kind in ("com", "lpt")
                                                                    for digit in range(10))])

MAX_SERVER_ID_CHARS: Final = 64


def server_id_shape(canon: str) -> bool:
    """Whether a lower-case id has a server id's shape (PROTOCOL.md): 1 to 64 of a-z 0-9 . _ -,
    the first a letter or digit (:func:`fleet_common.normalize_server_id` says why not)."""
    return 0 < len(canon) <= MAX_SERVER_ID_CHARS and canon[0] not in "._-" and _SERVER_ID_CHARS.issuperset(canon)


def own_id_problem(canon: str, *, windows: bool = os.name == "nt") -> Optional[str]:
    """Why a well-shaped id cannot name the server this process acts as (the end of
    :func:`fleet_common.check_own_server_id`'s message), or ``None``."""
    if canon.endswith(".") or canon.endswith(".lock") or ".." in canon:
        return (f": git refuses the ref refs/fleet/{canon} (an id may not end with '.' or '.lock' "
                "nor hold '..')")
    if windows and canon.split(".")[0] in _WINDOWS_DEVICES:
        return f" on Windows: {canon.split('.')[0]!r} is a device name there, not a folder"
    return None


def _plausible_server(server: str) -> bool:
    """An id :func:`fleet_common.check_own_server_id` surely takes as it is (lower case, no spaces)."""
    return server_id_shape(server) and own_id_problem(server) is None


def branch_name_problem(branch: str) -> Optional[str]:
    """Why git would not take ``branch`` as a branch name (git-check-ref-format(1)), checked
    without running git; ``None`` when it would. :func:`fleet_git.check_branch_name` says it."""
    if not branch or len(branch) > MAX_BRANCH_LENGTH:
        return "empty or too long"
    if not _REF_TEXT_REFUSED.isdisjoint(branch) or any(bad in branch for bad in ("..", "@{", "//")):
        return "it holds '..', '//', '@{', a space, a control character or one of ~^:?*[\\"
    if branch.startswith(("-", "/")) or branch.endswith(("/", ".")) or branch in ("@", "HEAD"):
        return "it starts with '-' or '/', ends with '/' or '.', or is '@' or 'HEAD'"
    if any(not part or part.startswith(".") or part.endswith(".lock") for part in branch.split("/")):
        return "a part starts with '.' or ends with '.lock'"
    return None


def _remember_tip(root: str, git_dir: str, branch: str) -> None:
    ref = tracking_ref(branch)
    tip = read_ref(git_dir, ref, ANY_HEXLEN)
    if tip is not UNKNOWN:
        _TIPS_AT_START[(root, ref)] = tip  # type: ignore[assignment]


def tip_at_start(root: object, ref: str) -> object:
    """The id ``ref`` held in the clone at ``root`` (as :func:`adopt` names it) when this
    command's script read it, before it started any call: what the command knew of the remote
    before its fetch, which a fetch started early has already moved (``None``: no such ref), taken
    once; :data:`UNKNOWN` when the script read none."""
    return _TIPS_AT_START.pop((os.fspath(root), ref), UNKNOWN)  # type: ignore[arg-type]


def _start(root: str, args: List[str]) -> Optional["subprocess.Popen[bytes]"]:
    try:
        proc = (spawn_git(root, args) if POSIX_SPAWN else None) or popen_git(root, args)
    except OSError:
        return None  # no git: the command says so itself
    global _STOP_AT_EXIT
    if not _STOP_AT_EXIT:
        import atexit

        atexit.register(stop_unused)  # whatever ends the process first (a Ctrl+C while it loads)
        _STOP_AT_EXIT = True
    _STARTED[(root, tuple(args))] = proc
    return proc


class _LookAhead:
    """What :func:`_look_ahead`'s thread did: ``before``, the mirrors it read, once it started a
    fetch of the state refs that moved; ``done`` is held until the thread ends."""

    __slots__ = ("root", "done", "before", "taken")

    def __init__(self, root: str) -> None:
        self.root = root
        self.done = _thread.allocate_lock()
        self.before: Optional[Dict[str, str]] = None
        self.taken = False  # the command took over: nothing starts any more


_AHEAD: Optional[_LookAhead] = None


def _look_ahead(root: str, git_dir: str, listing: "SpawnedGit", config: "SpawnedGit") -> None:
    """Start :func:`_read_ahead` in a thread of its own: a look at the fleet lists the remote
    before it fetches the state refs that moved, and the listing is in 20 ms before the suite has
    loaded, so the thread starts that fetch meanwhile (the imports let it run: they wait for files
    and give way to a waiting thread every few milliseconds)."""
    global _AHEAD
    ahead = _AHEAD = _LookAhead(root)
    ahead.done.acquire()
    switching = sys.getswitchinterval()
    # The thread waits for files (refs, git's pipes) and each time waits again for the interpreter
    # the imports hold: by default up to 5 ms each time, a fetch later. Until it is done, they
    # take turns more often.
    sys.setswitchinterval(LOOK_AHEAD_SWITCH_SECONDS)
    try:
        _thread.start_new_thread(_read_ahead, (ahead, git_dir, listing, config, switching))
    except RuntimeError:  # no thread to be had: the command does it all itself
        sys.setswitchinterval(switching)
        ahead.done.release()


def _read_ahead(ahead: _LookAhead, git_dir: str, listing: "SpawnedGit", config: "SpawnedGit",
                switching: float) -> None:
    """The thread: once the clone's settings and the listing are in, start the fetch of the state
    refs that moved as :meth:`fleet_state.StateStore.mirror_fleet` composes it
    (:func:`listed_state_refs`, :func:`moved_state_refspecs`, :func:`state_fetch_command`), and keep
    the mirrors it compared with. It starts nothing where the command could compose another: a
    clone that negotiates, more servers than :data:`MAX_STATE_SERVERS` (some are left out, by the
    roster's ranking), more refspecs than fit on the command line, refs only git can read."""
    try:
        settings = _when_done(config, ahead)
        if settings is None or config.returncode != 0 or is_true(read_settings(settings[0])[0].get(NEGOTIATE_KEY)):
            return
        before = refs_in(git_dir, (REF_PREFIX, LOCAL_FALLBACK_PREFIX), ANY_HEXLEN)  # while the remote answers
        listed = _when_done(listing, ahead)
        if before is None or listed is None or listing.returncode != 0:
            return
        found = listed_state_refs(listed_refs(listed[0]))
        if len(found) > MAX_STATE_SERVERS:
            return
        wanted = moved_state_refspecs(found, sorted(found), before.get)
        if not wanted or len(wanted) > REFSPECS_IN_ARGV:
            return
        config_words, args, _none = state_fetch_command(wanted, negotiate=False)
        with _GUARD:
            if not ahead.taken and _start(ahead.root, fetch_args(args, config_words)):
                ahead.before = before
    except BaseException:  # noqa: BLE001 - a guess: whatever goes wrong, the command does it itself
        pass
    finally:
        sys.setswitchinterval(switching)
        ahead.done.release()


def _when_done(proc: "SpawnedGit", ahead: _LookAhead) -> Optional[Tuple[bytes, bytes]]:
    """``proc``'s output once it is done, or ``None`` once the command has taken over (it waits in
    steps: a git whose output something it left behind holds open is the command's to judge)."""
    while not ahead.taken:
        done = proc.finished_within(LOOK_AHEAD_STEP_SECONDS)
        if done is not None:
            return done
    return None


def mirrors_at_start(root: object) -> Optional[Dict[str, str]]:
    """The state refs' mirrors in the clone at ``root`` (ref -> id) as the look-ahead read them
    when it started a fetch of those that moved (the caller's own fetch of them, composed from the
    same listing and these mirrors, takes it: :func:`adopt`), else ``None``; the look-ahead starts
    nothing after this call (the caller, which has read the listing, composes the fetch itself),
    which gives it one step to decide."""
    global _AHEAD
    ahead = _AHEAD
    if ahead is None or ahead.root != os.fspath(root):  # type: ignore[arg-type]
        return None
    _AHEAD = None
    # The listing is in: the thread's decision follows at once, unless it has still to wake up
    # (the command read the listing first, as it does when the remote answers after the imports).
    if ahead.done.acquire(timeout=LOOK_AHEAD_STEP_SECONDS):
        ahead.done.release()
    with _GUARD:
        ahead.taken = True
        return ahead.before


def adopt(root: object, args: Sequence[str]) -> Optional["subprocess.Popen[bytes]"]:
    """The call started early as ``git <args>`` in ``root`` (:func:`os.fspath` of the clone's
    resolved top folder), taken: the caller waits for it as for its own; ``None`` when none was."""
    if not _STARTED:
        return None
    return _STARTED.pop((os.fspath(root), tuple(args)), None)  # type: ignore[arg-type]


def stop_unused() -> int:
    """Stop every call started early that nobody took, and reap it; how many. Each is first given
    :data:`STOP_GRACE_SECONDS` (together) to finish: a fetch cut off while it receives leaves a
    partial pack behind, and one from a remote on the same disk or a LAN is done by then. Then it
    is stopped: on POSIX by SIGTERM to the process group git leads (git removes its lock files),
    where that does not end it, and on Windows, with its helpers (:func:`fleet_git.stop_git`).
    Whatever interrupts the grace (a Ctrl+C) stops the rest at once."""
    with _GUARD:
        if _AHEAD is not None:
            _AHEAD.taken = True  # the look-ahead starts nothing from now on
    if not _STARTED:
        return 0
    import subprocess
    import time

    stopped = 0
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    try:
        while _STARTED:
            key = next(iter(_STARTED))
            proc = _STARTED[key]
            try:
                proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(proc)
            except OSError:
                pass
            del _STARTED[key]
            stopped += 1
    finally:
        while _STARTED:
            _key, proc = _STARTED.popitem()
            stopped += 1
            _stop(proc)
    return stopped


def _stop(proc: "subprocess.Popen[bytes]") -> None:
    import subprocess

    if os.name == "posix":
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)  # git and its helpers; git removes its locks
            proc.communicate(timeout=STOP_GRACE_SECONDS)
            return
        except (OSError, subprocess.TimeoutExpired):
            pass
    from fleet_git import stop_git  # git and the helpers it runs, killed and reaped

    stop_git(proc)


# --------------------------------------------------------------------------- a git without subprocess

# Where the C library can start a process (os.posix_spawnp: Linux, macOS, the BSDs), the early calls
# start without subprocess: importing it (it brings locale and re) costs 10 ms, and a fetch that
# starts 10 ms earlier is over before the suite has loaded. Windows starts them with subprocess.
POSIX_SPAWN: Final = hasattr(os, "posix_spawnp")
try:
    import _signal as _signals  # the C module signal wraps in enums: loaded with the interpreter
except ImportError:  # pragma: no cover - another Python
    import signal as _signals


def spawn_git(root: str, args: Sequence[str]) -> Optional["SpawnedGit"]:
    """``git <args>`` in ``root`` (``git -C``), started with :func:`os.posix_spawnp` in a session
    of its own (as :func:`own_group`), standard input from the null device, its output in pipes,
    in :func:`git_env`'s environment; ``None`` when this process's open files cannot be listed
    (then only subprocess can keep them from git). ``OSError`` when it cannot start (no git)."""
    import select

    inherited = _inheritable_fds()
    if inherited is None or not hasattr(select, "poll"):  # (SpawnedGit.communicate polls)
        return None
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        # As Popen's close_fds and restore_signals: git and its helpers get no file of the command
        # but its three streams (a caller's pipe would stay open as long as a daemon a helper
        # left), and the signals Python ignores (SIGPIPE, SIGXFSZ) act on them as they should. The
        # pipes made here are not inherited: dup2 onto 1 and 2 makes the child's own copies.
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),  # type: ignore[attr-defined]
                   (os.POSIX_SPAWN_DUP2, out_write, 1), (os.POSIX_SPAWN_DUP2, err_write, 2),  # type: ignore[attr-defined]
                   *((os.POSIX_SPAWN_CLOSE, fd) for fd in inherited)]  # type: ignore[attr-defined]
        pid = os.posix_spawnp("git", ["git", "-C", root, *args], git_env(),  # type: ignore[attr-defined]
                              file_actions=actions, setsid=True,
                              setsigdef=(_signals.SIGPIPE, _signals.SIGXFSZ))  # type: ignore[attr-defined]
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    return SpawnedGit(["git", *args], pid, out_read, err_read)


def _inheritable_fds() -> Optional[List[int]]:
    """The files above the three streams this process would hand a child (``None``: no listing
    of its open files, ``/proc/self/fd`` or ``/dev/fd``, to tell)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found = []
        for name in names:
            if name.isdigit() and int(name) > 2:
                try:
                    if os.get_inheritable(int(name)):
                        found.append(int(name))
                except OSError:
                    pass  # the listing's own, closed by now
        return found
    return None


class _Pipe(io.FileIO):
    """The reading end of a :class:`SpawnedGit`'s pipe: closed only between two reads of it (the
    look-ahead's thread may be reading it; a number closed under a reader and given to another
    call's pipe would hand that reader the other call's output)."""

    def __init__(self, fd: int, reading: "_thread.RLock") -> None:
        super().__init__(fd, "rb")
        self._reading = reading

    def close(self) -> None:
        with self._reading:
            super().close()


class SpawnedGit:
    """A git started by :func:`spawn_git`, with the part of :class:`subprocess.Popen` that
    :mod:`fleet_git` uses on it (``args``, ``pid``, ``returncode``, ``stdout``/``stderr``/``stdin``,
    :meth:`poll`, :meth:`wait`, :meth:`communicate`, :meth:`kill`, :meth:`terminate`), with
    Popen's meaning: :meth:`communicate` raises ``subprocess.TimeoutExpired`` with the output read
    so far and keeps it for the next call, and a negative ``returncode`` names the signal that
    ended git. Two threads may wait for it (the look-ahead's and the command's): one reads at a
    time, one reaps, and both get all of its output."""

    def __init__(self, args: List[str], pid: int, out_fd: int, err_fd: int) -> None:
        self.args = args
        self.pid = pid
        self.returncode: Optional[int] = None
        self.stdin = None
        self._reading = _thread.RLock()  # one reader of the pipes at a time; a pipe closes between reads
        self._reaping = _thread.allocate_lock()  # one waitpid at a time, as in Popen
        self.stdout = _Pipe(out_fd, self._reading)
        self.stderr = _Pipe(err_fd, self._reading)
        self._out = bytearray()
        self._err = bytearray()

    def __repr__(self) -> str:
        return f"<SpawnedGit pid={self.pid} returncode={self.returncode} args={self.args!r}>"

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            with self._reaping:
                if self.returncode is None:
                    try:
                        pid, status = os.waitpid(self.pid, os.WNOHANG)  # type: ignore[attr-defined]
                    except ChildProcessError:
                        pid, status = self.pid, 0  # reaped elsewhere: what Popen assumes too
                    if pid:
                        self.returncode = _exit_code(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._reaped(timeout):
            import subprocess

            raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        return self.returncode  # type: ignore[return-value]

    def _reaped(self, timeout: Optional[float]) -> bool:
        """Whether git ended (and was reaped) within ``timeout`` (``None``: however long it takes)."""
        import time

        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if end is None:
                with self._reaping:
                    if self.returncode is None:
                        try:
                            self.returncode = _exit_code(os.waitpid(self.pid, 0)[1])
                        except ChildProcessError:
                            self.returncode = 0
                break
            left = end - time.monotonic()
            if left <= 0:
                return False
            delay = min(delay * 2, left, 0.05)
            time.sleep(delay)
        return True

    def communicate(self, input: None = None, timeout: Optional[float] = None) -> Tuple[bytes, bytes]:
        """Both outputs read to their end, then git waited for, within ``timeout`` in all; the
        same outputs again on a later call."""
        done = self.finished_within(timeout)
        if done is None:
            import subprocess

            raise subprocess.TimeoutExpired(self.args, timeout,  # type: ignore[arg-type]
                                            bytes(self._out), bytes(self._err))
        return done

    def finished_within(self, timeout: Optional[float]) -> Optional[Tuple[bytes, bytes]]:
        """:meth:`communicate`, ``None`` instead of raising when ``timeout`` passes first."""
        import select  # poll, where posix_spawnp is (spawn_git): not selectors, whose import costs 3 ms
        import time

        end = None if timeout is None else time.monotonic() + timeout
        if not self._reading.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return None
        try:
            poller = select.poll()
            pipes = {}
            for pipe in (self.stdout, self.stderr):
                if not pipe.closed:
                    poller.register(pipe.fileno(), select.POLLIN)
                    pipes[pipe.fileno()] = pipe
            while pipes:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                for fd, _events in poller.poll(None if left is None else left * 1000):
                    data = os.read(fd, 65536)
                    if data:
                        (self._out if pipes[fd] is self.stdout else self._err).extend(data)
                    else:
                        poller.unregister(fd)
                        pipes.pop(fd).close()
            if not self._reaped(None if end is None else max(0.0, end - time.monotonic())):
                return None
        finally:
            self._reading.release()
        return bytes(self._out), bytes(self._err)

    def send_signal(self, signal_number: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal_number)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]


def _exit_code(status: int) -> int:
    """A ``waitpid`` status as Popen's ``returncode`` (``os.waitstatus_to_exitcode``, 3.9+)."""
    if os.WIFSIGNALED(status):  # type: ignore[attr-defined]
        return -os.WTERMSIG(status)  # type: ignore[attr-defined]
    if os.WIFEXITED(status):  # type: ignore[attr-defined]
        return os.WEXITSTATUS(status)  # type: ignore[attr-defined]
    return status


# --------------------------------------------------------------------------- the end


def leave(code: int) -> "NoReturn":
    """End this command's process with exit status ``code`` (see the module's text)."""
    try:
        stop_unused()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED  # the calls are stopped all the same
    if (sys.gettrace() is not None or sys.getprofile() is not None or sys.flags.inspect
            or os.environ.get("PYTHONINSPECT") or not {"bdb", "pydevd"}.isdisjoint(sys.modules)):
        raise SystemExit(code)  # a debugger, profiler, coverage run or "python -i" goes on after the script
    threading = sys.modules.get("threading")
    if threading is not None and any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                                     for t in threading.enumerate()):
        raise SystemExit(code)
    import atexit

    run, clear = getattr(atexit, "_run_exitfuncs", None), getattr(atexit, "_clear", None)
    if run is None or clear is None:
        raise SystemExit(code)
    run()
    clear()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None  # the interpreter reports a closed pipe as it always did
    os._exit(code)
