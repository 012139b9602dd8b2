"""Git for the fleet suite: one runner, typed errors, and the plumbing transaction.

Every git call goes through :func:`run_git` (argument lists, a timeout, a controlled
environment). :class:`Clone` wraps one server's clone of the fleet repository and offers what
PROTOCOL.md asks of a writer: fetch the shared branch, read a file from the fetched tip, build a
commit on top of that tip without touching the working tree or the index (the new blob and the
trees along its path and the commit are written by :mod:`fleet_objects`), push it as a
compare-and-swap, and accept it only once the remote's own ref-update status confirms it.

What a read may conclude is narrow (PROTOCOL.md, "Trust between servers"): a path is absent only
when a tree along it was read and does not name it; a tree or blob that git cannot produce is
:class:`ObjectMissing`, which stops the transaction, never an empty mailbox. A branch that the
remote does not have is :class:`BranchMissing`; only ``--init`` creates one.
"""

from __future__ import annotations

import _thread
import os
import re
import time
from collections import namedtuple
from pathlib import Path

from fleet_common import EXIT_USAGE, LazyModule, SuiteError, UsageError, get_logger, sleep_jittered
from fleet_mailbox import (
    MAILBOX_PATH,  # noqa: F401 - the mailbox module owns it; importable here as before
    MAX_MAILBOX_BYTES,
)
from fleet_objects import ObjectStore, StoreFailed, TooLarge, date_stamp, edit_tree, parse_tree
from fleet_secrets import LazyPattern
from fleet_start import (  # noqa: F401  (git_env and NO_HOOKS: fleet_git offers what it always offered)
    CONFIG_ARGS,
    LOOSE_COMPRESSION,
    NO_HOOKS,
    UNKNOWN,
    adopt,
    branch_fetch_args,
    branch_name_problem,
    fetch_args,
    git_env,
    is_oid,
    is_true,
    listed_refs,
    origin_head,
    own_group,
    popen_git,
    read_ref,
    read_settings,
    refs_in,
    remote_folder,
    tip_at_start,
    tracking_ref,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import subprocess
    import threading
    from typing import (
        Any,
        Callable,
        Dict,
        Final,
        FrozenSet,
        Iterable,
        List,
        Mapping,
        Optional,
        Sequence,
        Set,
        Tuple,
        Union,
    )

    from fleet_objects import TreeEntry

    PushStatus = Tuple[str, str]  # (flag, summary) of a ``push --porcelain`` line: " ", "*", "=", "!"...

else:  # imported where first used (fleet_common.LazyModule)
    subprocess = LazyModule("subprocess")
    threading = LazyModule("threading")

log = get_logger(__name__)

LOCAL_TIMEOUT: Final = 30.0  # local plumbing
# No object larger than this is read into memory: the largest file the suite reads, the mailbox.
# Readers of smaller files pass their own bound (the rules, the roster, a state file).
MAX_OBJECT_BYTES: Final = MAX_MAILBOX_BYTES
NETWORK_TIMEOUT: Final = 60.0  # fetch, push, ls-remote
STANDALONE_FRESHNESS: Final = 10.0  # seconds a standalone send trusts the last fetch
MAX_RACE_ATTEMPTS: Final = 200  # with RACE_DELAY_CAP, about a minute of lost races at most
RACE_TIME_LIMIT: Final = 60.0  # and no longer than this (each attempt also pays its fetch and push)
MIN_RACE_ATTEMPTS: Final = 5  # ... once this many tried: on a slow remote one lost race is no verdict
RACE_DELAY_CAP: Final = 1.0  # seconds: tens to hundreds of milliseconds (PROTOCOL.md step 5)


def _folders_of(paths: Iterable[str]) -> List[str]:
    """Every folder that holds one of ``paths``, the root (``""``) first."""
    return sorted({"/".join(p.split("/")[:n]) for p in paths for n in range(p.count("/") + 1)})


def _entries(folder: Path) -> List["os.DirEntry[str]"]:
    """A folder's entries; none when it does not exist."""
    try:
        with os.scandir(folder) as found:
            return list(found)
    except FileNotFoundError:
        return []


_HEADER_LINE_MAX: Final = 4096  # "<oid> <type> <size>", or "<spec> missing" for a spec of ours


def _feed(stream: "object", data: bytes) -> None:
    """Write ``data`` to a child's stdin and close it (a thread: the child answers meanwhile)."""
    try:
        stream.write(data)  # type: ignore[attr-defined]
    except OSError:
        pass  # the child stopped early (it was stopped, or failed): its answer says why
    finally:
        try:
            stream.close()  # type: ignore[attr-defined]
        except OSError:
            pass


def _tree_spec(commit: str, folder: str) -> str:
    return f"{commit}:{folder}" if folder else f"{commit}^{{tree}}"


class GitError(SuiteError):
    """A git command failed; carries what it ran and what it said."""

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stdout: bytes = b"",
                 stderr: bytes = b"", reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason or _first_line(stderr) or f"exit {returncode}"
        super().__init__(f"git {' '.join(self.argv[1:3])}: {self.reason}")

    def details(self) -> str:
        return (f"argv={self.argv!r} returncode={self.returncode} "
                f"stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}")


class GitTimeout(GitError):
    """A git command ran past its timeout (treated like an unreachable remote)."""


class RemoteUnavailable(GitError):
    """The remote could not be reached or refused us: network, authentication, server error.

    Callers back off and count it in the circuit breaker.
    """


class PushRejected(GitError):
    """Another server's push landed first; refetch and retry soon (not a failure)."""


class ObjectMissing(GitError):
    """A commit, tree or blob that a read or a push needs is missing or unreadable in this clone.

    Pruned by a ``git gc`` racing us, deleted or damaged on disk: never the same as a path that
    is absent. The transaction stops; it fetches every object again once and retries, and
    otherwise raises this (a send queues, a monitor's cycle reports it). Nothing is written.
    """


class NotAFile(GitError):
    """A folder or a submodule (gitlink) sits where a file should be: the path is not absent,
    and there is no content to read. A reader of the mailbox treats it as a corrupt mailbox."""

    def __init__(self, argv: Sequence[str], reason: str, oid: str) -> None:
        super().__init__(argv, None, b"", b"", reason)
        self.oid = oid


class ObjectTooLarge(NotAFile):
    """A tree or blob larger than the reader's bound (:data:`MAX_OBJECT_BYTES`) where a file is
    read: its content is never read into memory, and readers treat it as they treat a folder
    there (the mailbox: corrupt; the auto-reply rules: the ones in force stay)."""


class BranchMissing(GitError, UsageError):
    """The shared branch does not exist on the remote: a mistyped ``--branch`` or an empty origin.

    Bad input (exit 2), not an outage: retrying or queueing would never deliver, and a send or a
    monitor never creates the branch (only ``--init`` does, PROTOCOL.md "Trust between servers").
    """

    exit_code = EXIT_USAGE

    def __init__(self, branch: str, argv: Sequence[str], returncode: Optional[int],
                 stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(argv, returncode, stdout, stderr, f"no branch '{branch}' on the remote")
        self.branch = branch

    def __str__(self) -> str:
        return (f"the branch '{self.branch}' does not exist on origin (check --branch; only "
                "message_monitor.py --init creates it)")


class LocalRefLocked(GitError):
    """The fetch talked to the remote fine, but a ref of this clone stayed locked while git tried
    to update it (another git process holds ``<ref>.lock``, or one crashed and left it).

    A local fault, not an outage: no breaker failure, no "remote unreachable". ``fetched`` is the
    tip the fetch brought (from ``FETCH_HEAD``), when it could be read: a writer builds on it.
    Locks older than :data:`STALE_LOCK_AGE` are removed by the monitor.
    """

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stdout: bytes = b"",
                 stderr: bytes = b"", reason: str = "", fetched: Optional[str] = None) -> None:
        super().__init__(argv, returncode, stdout, stderr, reason)
        self.fetched = fetched


class NotAClone(UsageError):
    """``--repo`` is missing, not a git clone, or has no ``origin``."""


def check_branch_name(branch: str) -> str:
    """``branch`` when git would accept it as a branch name; :class:`UsageError` otherwise.

    Checked before any git call: ``--branch ../../x`` names no branch, and a name becomes part
    of a refspec and a path under ``.git/refs``.
    """
    problem = branch_name_problem(branch)  # (fleet_start: its script checks names before anything loads)
    if problem is not None:
        raise UsageError(f"invalid --branch {branch!r}: {problem}")
    return branch


def _first_line(data: bytes) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("hint:"):
            return line[:300]
    return ""


# Git children run in their own process group (fleet_start.own_group; issue 7).
_SPAWN_KW: Final = own_group()


def run_git(repo: Union[str, "os.PathLike[str]"], *args: str, check: bool = True,
            timeout: float = LOCAL_TIMEOUT, input: Optional[bytes] = None,
            env: Optional[Mapping[str, str]] = None) -> "subprocess.CompletedProcess[bytes]":
    """Run ``git <args>`` in ``repo``; bytes out; :class:`GitError` on failure when ``check``."""
    argv = ["git", *args]
    try:
        proc = subprocess.run(
            argv, cwd=str(repo), input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=git_env(env), timeout=timeout, **_SPAWN_KW,  # type: ignore[arg-type]
        )
    except subprocess.TimeoutExpired as exc:
        raise GitTimeout(argv, None, exc.stdout or b"", exc.stderr or b"",
                         f"timed out after {timeout:g} s") from None
    except FileNotFoundError:
        raise SuiteError("git is not installed or not on PATH") from None
    if check and proc.returncode != 0:
        raise GitError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def spawn_git(repo: Union[str, "os.PathLike[str]"], *args: str,
              stdin: Optional[int] = None) -> "subprocess.Popen[bytes]":
    """Start ``git <args>`` in ``repo`` and return at once (pipes for its output; ``stdin``, or
    the null device)."""
    try:
        return popen_git(str(repo), args, stdin)
    except FileNotFoundError:
        raise SuiteError("git is not installed or not on PATH") from None


class Finished(namedtuple("Finished", ("args", "returncode", "stdout", "stderr"))):
    """A finished git call, as ``subprocess.CompletedProcess`` gives it (without importing
    :mod:`subprocess`: a command whose calls its script started needs nothing else of it)."""

    __slots__ = ()


# Network git calls running in this process (started, not yet finished): a process that ends
# while worker threads wait on some (the MCP server, stopped) stops them with their helpers.
_NETWORK_CALLS: "Set[subprocess.Popen[bytes]]" = set()
_NETWORK_CALLS_LOCK = _thread.allocate_lock()


def _track(proc: "subprocess.Popen[bytes]") -> "subprocess.Popen[bytes]":
    with _NETWORK_CALLS_LOCK:
        _NETWORK_CALLS.add(proc)
    return proc


def stop_network_calls() -> int:
    """Stop every network git call of this process that is still running (:func:`stop_git`:
    git with its helpers, so no push lands after its caller was told it failed); how many."""
    with _NETWORK_CALLS_LOCK:
        running = list(_NETWORK_CALLS)
        _NETWORK_CALLS.clear()
    for proc in running:
        stop_git(proc)
    return len(running)


def stop_git(proc: "subprocess.Popen[Any]") -> None:
    """Kill a started git and the helpers it runs (``git-remote-https``, ``ssh``, ``upload-pack``)
    and reap it: the tree psutil finds under it, where a daemon git started (such as ``git
    credential-cache--daemon``) is no longer found and so is spared; without psutil, the POSIX
    process group git leads (:data:`_SPAWN_KW`), daemon included. A detached child that still
    holds git's pipes is not waited for (:func:`_drain`). A helper left behind would hold its
    connection open until the remote answered."""
    if proc.poll() is not None:
        return
    try:
        import psutil  # lazy: only a stopped command gets here

        helpers = psutil.Process(proc.pid).children(recursive=True)  # (a daemon git started has left it)
    except Exception:  # noqa: BLE001 - no psutil, or git gone meanwhile: its process group instead
        helpers = None
    if helpers is None and os.name == "posix":
        try:
            os.killpg(proc.pid, 9)  # SIGKILL to the group git leads
        except OSError:
            pass
    for helper in helpers or ():
        try:
            helper.kill()
        except Exception:  # noqa: BLE001 - it ended on its own
            pass
    proc.kill()
    proc.wait()


def _drain(proc: "subprocess.Popen[bytes]") -> Tuple[bytes, bytes]:
    """What a finished or stopped git wrote, read for at most a second more: a detached process
    that still holds its pipes must not hold the caller. Then :class:`_PipesHeld`, with what was
    read: all git wrote, where Python can tell (POSIX: git has ended and its pipe is read to the
    end of what it holds), else nothing (:meth:`Clone.finish_network_git` decides)."""
    try:
        out, err = proc.communicate(timeout=1.0)
    except subprocess.TimeoutExpired as exc:
        out, err = exc.stdout, exc.stderr
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        raise _PipesHeld(out or b"", err or b"") from None
    return out or b"", err or b""


class _PipesHeld(Exception):
    """git ended, but another process still holds its output open."""

    def __init__(self, out: bytes, err: bytes) -> None:
        super().__init__("git's output was held open by another process")
        self.out, self.err = out, err


_RACE_MARKERS = (
    "non-fast-forward", "fetch first", "[rejected]", "cannot lock ref", "failed to update ref",
    "stale info", "incorrect old value", "reference already exists", "failed to lock",
    "but expected",
)


LOCAL_LOCK_RETRIES: Final = 20
LOCAL_LOCK_WAIT: Final = 2.0  # seconds a fetch waits for another process's ref lock to go

# What git says when this clone lacks an object that a push must send (pruned by a gc racing us),
# or holds a damaged one (which a fetch cannot replace: git compares what it receives with it).
_LOCAL_OBJECT_PROBLEM = LazyPattern(  # compiled on first use: only a failing git call needs it
    r"unable to read [0-9a-f]{40}|bad object [0-9a-f]{40}|missing (?:blob|tree|commit) [0-9a-f]{40}"
    r"|not a valid '?(?:tree|commit)'? object|inflate: data stream error|object file .* is empty"
    r"|loose object [0-9a-f]{40} .*is corrupt", re.IGNORECASE)


def _local_object_problem(stderr: bytes) -> bool:
    """Whether git's messages name an object of this clone that is missing or damaged (lines the
    remote sent, ``remote: ...``, are the remote's business)."""
    return any(_LOCAL_OBJECT_PROBLEM.search(line)
               for line in stderr.decode("utf-8", "replace").splitlines() if not line.startswith("remote:"))


def _local_lock_busy(text: str) -> bool:
    """A fetch could not update a ref of this clone because another process of the clone was
    updating it (a lock file exists, or the ref moved under it): contention, not an outage."""
    lowered = text.lower()
    return ("cannot lock ref" in lowered or "unable to update local ref" in lowered
            or (".lock" in lowered and "file exists" in lowered))


def _is_race(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _RACE_MARKERS)


def _push_status(stdout: bytes, dest: str) -> Optional[PushStatus]:
    """The remote's ref-update status for ``dest`` in ``push --porcelain`` output, if any."""
    status = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].endswith(":" + dest):
            status = (parts[0], parts[2])
    return status


def _push_failure(argv: List[str], proc: "subprocess.CompletedProcess[bytes]",
                  status: Optional[PushStatus]) -> GitError:
    """What a push that did not land means: a lost race, a local object it could not read, or
    an unavailable remote."""
    said = status[1] if status else ""
    if _is_race(said) or (status is None and _is_race(proc.stderr.decode("utf-8", "replace"))):
        return PushRejected(argv, proc.returncode, proc.stdout, proc.stderr,
                            said or _first_line(proc.stderr) or "rejected")
    if _local_object_problem(proc.stderr):
        return ObjectMissing(argv, proc.returncode, proc.stdout, proc.stderr,
                             f"the push could not read a local object: {_first_line(proc.stderr)}")
    return RemoteUnavailable(argv, proc.returncode, proc.stdout, proc.stderr,
                             _first_line(proc.stderr) or said or "push failed")


def ref_stays_locked(argv: Sequence[str], proc: "Finished", ref: str,
                     fetched: Optional[str] = None) -> "LocalRefLocked":
    """A fetch that reached the remote but could not update ``ref`` of this clone: locked."""
    return LocalRefLocked(argv, proc.returncode, proc.stdout, proc.stderr,
                          f"{ref} stays locked in this clone: {_first_line(proc.stderr)}", fetched=fetched)


def damaged_objects(argv: Sequence[str], proc: "Finished") -> Optional["ObjectMissing"]:
    """A failed fetch whose messages name a missing or damaged object of this clone: not an
    outage (the remote answered); ``None`` for any other failure."""
    if not _local_object_problem(proc.stderr):
        return None
    return ObjectMissing(argv, proc.returncode, proc.stdout, proc.stderr,
                         f"an object of this clone is damaged: {_first_line(proc.stderr)} (git fsck names it)")


# --------------------------------------------------------------------------- the clone


class Clone:
    """One server's clone of the fleet repository."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], branch: Optional[str] = None) -> None:
        if branch is not None:
            check_branch_name(branch)
        root = Path(path).expanduser()  # "~/Build" as typed: Windows shells pass "~" on unexpanded
        if not root.is_dir():
            raise NotAClone(f"--repo {path}: no such directory")
        self._config, self._repeated = self._read_config(root)
        layout = git_layout(root)
        if layout is not None and layout.git_dir == layout.common_dir and self._config.get("remote.origin.url"):
            # The usual case, --repo naming a clone's top folder: its layout is known without
            # asking git (git_layout, the one reader of it), and the one config call above told
            # the rest. Anything else (a subfolder, a linked worktree) asks git itself.
            self.root = root.resolve()
            self.git_dir = self.common_dir = layout.git_dir
            object_format = self._config.get("extensions.objectformat", "sha1")
        else:
            proc = run_git(root, "rev-parse", "--show-toplevel", "--absolute-git-dir", "--show-object-format",
                           "--git-common-dir", check=False)
            lines = proc.stdout.decode("utf-8", "surrogateescape").splitlines()
            if proc.returncode != 0 or len(lines) < 4:
                raise NotAClone(f"--repo {path}: not a git clone ({_first_line(proc.stderr) or 'no work tree'})")
            self.root = Path(lines[0])
            self.git_dir = Path(lines[1])
            self.common_dir = (root / lines[3]).resolve()  # refs and objects shared by worktrees
            object_format = lines[2].strip()
            if self.root.resolve() != root.resolve():
                self._config, self._repeated = self._read_config(self.root)
        self.origin_url = self._config.get("remote.origin.url", "")
        if not self.origin_url:
            raise NotAClone(f"--repo {path}: the clone has no remote 'origin'")
        self.branch = branch or self._default_branch()
        self.remote_ref = tracking_ref(self.branch)
        # git push moves refs/remotes/origin/<branch> itself when the fetch refspec maps it.
        self._push_updates_tracking_ref = self._config.get("remote.origin.fetch") in (
            "+refs/heads/*:refs/remotes/origin/*", f"+refs/heads/{self.branch}:{self.remote_ref}")
        self.objects_dir = self.common_dir / "objects"
        self.objects = ObjectStore(self.objects_dir, object_format, self._objects_git)
        self.hexlen = self.objects.hexlen
        self.last_sync: float = 0.0  # monotonic time of the last fetch or verified push
        # What this command knew of the remote's tip before its fetch (its script read it before
        # starting that fetch early, fleet_start), else nothing yet.
        self._tip: object = tip_at_start(self.root, self.remote_ref)
        self._files: Dict[Tuple[str, str], Tuple[Optional[str], Optional[bytes]]] = {}
        self._trees: Dict[Tuple[str, str], Optional[List[TreeEntry]]] = {}
        self.push_attempts = 0  # pushes tried (for benchmarks: retries = attempts - commits)
        # Run before and after every network call of this clone (the systemd watchdog keeps a
        # monitor alive through a slow git operation; see message_monitor).
        self._network_hooks: List[Callable[[], None]] = []
        # A time (time.monotonic) no network call of this clone waits past: a caller's own
        # deadline (``inbox.py wait --timeout``), on top of each call's limit.
        self.network_deadline: Optional[float] = None

    # ----------------------------------------------------------------- basics

    @staticmethod
    def _read_config(folder: Path) -> Tuple[Dict[str, str], FrozenSet[str]]:
        """The settings of :data:`fleet_start.CONFIG_ARGS`, from one ``git config`` (the one this
        command's script started before its modules loaded, when it did), and the keys set more
        than once (:func:`fleet_start.read_settings`)."""
        early = adopt(os.path.realpath(folder), CONFIG_ARGS)
        if early is not None:
            try:
                out = early.communicate(timeout=LOCAL_TIMEOUT)[0]
            except subprocess.TimeoutExpired:
                stop_git(early)
                out = run_git(folder, *CONFIG_ARGS, check=False).stdout
        else:
            out = run_git(folder, *CONFIG_ARGS, check=False).stdout
        return read_settings(out)

    def setting(self, key: str) -> Optional[str]:
        """A setting of this clone's git configuration as read at start (only the keys
        :meth:`_read_config` asks for; ``key`` in lower case)."""
        return self._config.get(key)

    def setting_is_true(self, key: str) -> bool:
        """Whether a boolean setting is true, in any of the spellings git accepts."""
        return is_true(self._config.get(key))

    def remote_folder(self) -> Optional[str]:
        """The git folder of ``origin`` when it is reached by a path whose refs can be read as
        ``ls-remote`` reads them (:func:`fleet_start.remote_folder`), else ``None``."""
        return remote_folder(self._config, self._repeated, os.fspath(self.root))

    def remember(self, key: str, value: str) -> None:
        """Write a setting into this clone's own configuration (``.git/config``)."""
        self.git("config", key, value)
        self._config[key.lower()] = value

    def git(self, *args: str, **kw) -> "subprocess.CompletedProcess[bytes]":
        return run_git(self.root, *args, **kw)

    def _objects_git(self, *args: str, input: Optional[bytes] = None,
                     env: Optional[Mapping[str, str]] = None) -> "subprocess.CompletedProcess[bytes]":
        """Plumbing for :class:`fleet_objects.ObjectStore`: an object it needs and cannot read is
        :class:`ObjectMissing`, like on the fast path."""
        try:
            return run_git(self.root, *args, input=input, env=env)
        except GitTimeout:
            raise
        except GitError as exc:
            if _local_object_problem(exc.stderr) or b"unavailable" in exc.stderr:
                raise ObjectMissing(exc.argv, exc.returncode, exc.stdout, exc.stderr) from None
            raise

    def fetch_git(self, *args: str, config: Sequence[str] = (), maintain: bool = True,
                  input: Optional[bytes] = None) -> "Finished":
        """``git fetch`` with ``args`` (never raising for its exit status; ``input``: its standard
        input, for ``--stdin``), followed by :meth:`maintain` when it succeeded, in place of git's
        own automatic maintenance (with ``maintain=False`` the caller runs it, when something came)."""
        proc = self.network_git(*fetch_args(args, config), check=False, input=input)
        if proc.returncode == 0 and maintain:
            self.maintain()
        return proc

    def maintain(self) -> None:
        """What ``git fetch`` runs after it (``git maintenance run --auto``), without a process
        when git's own test says there is nothing to do.

        Every fetch of the suite passes ``-c maintenance.auto=false`` and calls this instead: git
        would start a process on every fetch just to find, nearly always, that the clone needs no
        ``gc`` (4 ms here, a tenth of a short command). The test is the one ``git gc --auto``
        documents and makes: more loose objects than ``gc.auto`` (estimated from ``objects/17``,
        a 256th of them) or more packs without ``.keep`` than ``gc.autoPackLimit``. With any
        ``maintenance.*`` setting of the user's (a strategy, a task; not ``maintenance.repo``,
        the list that ``git maintenance start`` keeps), or a value this cannot read, git decides.
        """
        if self._maintenance_due():
            self.git("maintenance", "run", "--auto", "--quiet", check=False)

    def _maintenance_due(self) -> bool:
        config = self._config
        if config.get("maintenance.auto", "").lower() in ("false", "no", "off", "0"):
            return False
        if any(key.startswith("maintenance.") and key != "maintenance.repo" for key in config):
            return True  # (maintenance.repo lists the repositories "git maintenance start" runs on)
        try:
            auto = int(config.get("gc.auto", "6700"))
            pack_limit = int(config.get("gc.autopacklimit", "50"))
        except ValueError:
            return True  # "6.7k", say: git reads units this does not
        if auto <= 0:
            return False
        try:
            loose = sum(1 for entry in _entries(self.objects_dir / "17") if len(entry.name) == self.hexlen - 2)
            names = {entry.name for entry in _entries(self.objects_dir / "pack")} if pack_limit > 0 else set()
        except OSError:
            return True
        packs = sum(1 for name in names if name.endswith(".pack") and name[:-5] + ".keep" not in names)
        return loose > (auto + 255) // 256 or (pack_limit > 0 and packs > pack_limit)

    def add_network_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before and after each network call of this clone (once per hook)."""
        if hook not in self._network_hooks:
            self._network_hooks.append(hook)

    def _call_network_hooks(self) -> None:
        for hook in self._network_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook must never break a git call
                pass

    def network_git(self, *args: str, check: bool = True, input: Optional[bytes] = None,
                    timeout: float = NETWORK_TIMEOUT) -> "Finished":
        """A git call that talks to the remote; a timeout is :class:`RemoteUnavailable`, a failure
        :class:`GitError` when ``check``. Whatever stops the wait (a timeout, Ctrl+C) stops git
        with its helpers (:func:`stop_git`): ``git-remote-https`` or ``ssh`` would otherwise
        hold the connection until the remote answered."""
        self._call_network_hooks()
        proc = self._spawn_with_input(args, input)
        done = self.finish_network_git(proc, deadline=time.monotonic() + timeout)  # (hooks after)
        if check and done.returncode != 0:
            raise GitError(["git", *args], done.returncode, done.stdout, done.stderr)
        return done

    def start_network_git(self, *args: str) -> "subprocess.Popen[bytes]":
        """Start a git call that talks to the remote and return at once; :meth:`finish_network_git`
        waits for it (or kills it on the way out)."""
        self._call_network_hooks()
        return self._spawn(args)

    def _spawn(self, args: Sequence[str]) -> "subprocess.Popen[bytes]":
        """``git <args>`` started here, tracked as a network call: the very call this command's
        script started before its modules loaded (:func:`fleet_start.adopt`), when it did."""
        return _track(adopt(self.root, args) or spawn_git(self.root, *args))

    def start_fetch(self, *args: str, config: Sequence[str] = (),
                    input: Optional[bytes] = None) -> "subprocess.Popen[bytes]":
        """Start the ``git fetch`` that :meth:`fetch_git` would run and return at once, for two
        fetches side by side; :meth:`finish_network_git` waits for it (or kills it on the way out).
        ``input`` (refspecs for ``--stdin``) reaches git from a temporary file, so nothing has
        to write to it meanwhile."""
        self._call_network_hooks()
        return self._spawn_with_input(fetch_args(args, config), input)

    def _spawn_with_input(self, args: Sequence[str], input: Optional[bytes]) -> "subprocess.Popen[bytes]":
        """git started with ``input`` as its standard input from a temporary file (nothing has to
        write to it while it runs, however long the wait), or none."""
        if input is None:
            return self._spawn(args)
        import tempfile  # only for many refspecs (fleet_start.REFSPECS_IN_ARGV)

        with tempfile.TemporaryFile() as source:
            source.write(input)
            source.seek(0)
            return _track(spawn_git(self.root, *args, stdin=source.fileno()))

    def finish_network_git(self, proc: "subprocess.Popen[bytes]", *,
                           deadline: Optional[float] = None) -> "Finished":
        """Wait for a git call of :meth:`start_fetch` or :meth:`start_network_git`, until
        ``deadline`` (:func:`time.monotonic`; by default the network timeout from now). A timeout
        is :class:`RemoteUnavailable`; whatever stops the wait (Ctrl+C too) stops git with its
        helpers (:func:`stop_git`)."""
        if self.network_deadline is not None:
            deadline = self.network_deadline if deadline is None else min(deadline, self.network_deadline)
        limit = NETWORK_TIMEOUT if deadline is None else max(0.0, deadline - time.monotonic())
        until = time.monotonic() + limit
        try:
            while True:  # in steps, so a git that ended is not waited for while others hold its pipes
                try:
                    out, err = proc.communicate(timeout=max(0.0, min(0.5, until - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    ended = proc.poll() is not None  # (one that ended before its wait began is no timeout)
                    if not ended and time.monotonic() < until:
                        continue
                if not ended:
                    stop_git(proc)
                try:
                    out, err = _drain(proc)
                except _PipesHeld as held:  # something git left behind holds its output open
                    out, err = held.out, held.err
                    # git's own answer where it was read whole (POSIX); where it cannot be told
                    # (Windows reads in threads and gives nothing back), none: a cut listing must
                    # never read as an empty one.
                    ended = ended and os.name == "posix"
                    if ended:
                        log.warning("a process that %s left behind holds its output open",
                                    " ".join(str(a) for a in proc.args[:3]))
                if not ended:
                    raise RemoteUnavailable(proc.args, None, out, err,  # type: ignore[arg-type]
                                            f"no answer within {limit:.3g} s")
                break
        except BaseException:
            stop_git(proc)
            raise
        finally:
            with _NETWORK_CALLS_LOCK:
                _NETWORK_CALLS.discard(proc)
            self._call_network_hooks()
        return Finished(proc.args, proc.returncode, out, err)

    def _default_branch(self) -> str:
        prefix = "refs/remotes/origin/"
        named = origin_head(os.fspath(self.git_dir))  # no process needed, nearly always
        if named is not None:
            return named
        proc = self.git("symbolic-ref", "-q", "refs/remotes/origin/HEAD", check=False)
        ref = proc.stdout.decode().strip()
        if proc.returncode == 0 and ref.startswith(prefix):
            return ref[len(prefix):]
        return "main"

    def identity(self, role: str, fallback_name: str) -> Tuple[str, str]:
        """(name, email) of the ``author`` or ``committer``: what git would use (environment,
        ``author.*``/``committer.*``, ``user.*``), else the server id (PROTOCOL.md)."""
        upper = role.upper()
        name = (os.environ.get(f"GIT_{upper}_NAME") or self._config.get(f"{role}.name")
                or self._config.get("user.name") or fallback_name)
        email = (os.environ.get(f"GIT_{upper}_EMAIL") or self._config.get(f"{role}.email")
                 or self._config.get("user.email") or os.environ.get("EMAIL")
                 or f"{fallback_name}@fleet.invalid")
        return name, email

    def tip(self) -> Optional[str]:
        """The fetched tip of the shared branch, or ``None`` when the remote has no branch yet.

        Known without a process after our own fetch or verified push. Someone else moving the
        tracking ref in this clone only makes it stale, which costs one rejected push.
        """
        if self._tip is UNKNOWN:
            self._tip = self._read_ref_file(self.remote_ref)
        if self._tip is UNKNOWN:
            proc = self.git("rev-parse", "-q", "--verify", f"{self.remote_ref}^{{commit}}", check=False)
            self._tip = proc.stdout.decode().strip() or None
        return self._tip  # type: ignore[return-value]

    def read_ref(self, refname: str) -> Optional[str]:
        """A ref's id in this clone, ``None`` when it does not exist: read from git's files
        backend without a process when it can be, else by ``rev-parse``."""
        found = self._read_ref_file(refname)
        if found is not UNKNOWN:
            return found  # type: ignore[return-value]
        proc = self.git("rev-parse", "-q", "--verify", refname, check=False)
        return proc.stdout.decode().strip() or None

    def _read_ref_file(self, refname: str) -> object:
        """A ref's id read from git's files backend (:func:`fleet_start.read_ref`): ``None``
        when absent, ``UNKNOWN`` when only git can tell (another ref storage, a symbolic ref)."""
        return read_ref(os.fspath(self.common_dir), refname, self.hexlen)

    def refs_in(self, *folders: str) -> Dict[str, str]:
        """The refs directly in these ref folders (``refs/fleet/``, say; not in folders below
        them), name -> id: read from git's files backend without a process when it can be
        (:func:`fleet_start.refs_in`), else by ``for-each-ref``."""
        found = refs_in(os.fspath(self.common_dir), folders, self.hexlen)
        if found is not None:
            return found
        proc = self.git("for-each-ref", "--format=%(objectname) %(refname)", *folders)
        found = {}
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            oid, _, name = line.partition(" ")
            if name.rpartition("/")[0] + "/" in folders:
                found[name] = oid
        return found

    # ----------------------------------------------------------------- network

    def start_branch_fetch(self) -> "subprocess.Popen[bytes]":
        """The first attempt of :meth:`fetch`, started (for ``fetch(started=...)``)."""
        self._call_network_hooks()
        return self._spawn(branch_fetch_args(self.branch))

    def fetch(self, *, allow_missing: bool = False, refetch: bool = False,
              started: Optional["subprocess.Popen[bytes]"] = None,
              deadline: Optional[float] = None) -> Optional[str]:
        """Fetch the shared branch into ``refs/remotes/origin/<branch>``; return its tip.

        A branch the remote does not have is :class:`BranchMissing`, unless ``allow_missing``
        (``--init``, which creates it): then ``None``. ``refetch`` fetches every object of the
        branch again (``--refetch``): a plain fetch brings nothing when the tip is known, even if
        objects under it were lost. A ref of this clone that stays locked is
        :class:`LocalRefLocked`, never :class:`RemoteUnavailable`. ``started``: its first
        attempt, already running (:meth:`start_branch_fetch`), waited for until ``deadline``.
        """
        argv = ["git", "fetch", "origin", self.branch]
        keep_pack = refetch
        for attempt in range(LOCAL_LOCK_RETRIES + 1):
            if started is not None:
                proc, started = self.finish_network_git(started, deadline=deadline), None
            else:
                proc = self.network_git(*branch_fetch_args(self.branch, refetch=refetch, keep_pack=keep_pack),
                                        check=False)
            if proc.returncode == 0:
                self.maintain()
                break
            text = proc.stderr.decode("utf-8", "replace")
            lowered = text.lower()
            if refetch and "unknown option" in lowered and "refetch" in lowered:
                refetch = False  # git before 2.36: a plain fetch is all there is
                continue
            if "couldn't find remote ref" in lowered:
                self.last_sync = time.monotonic()
                if not allow_missing:
                    raise BranchMissing(self.branch, argv, proc.returncode, proc.stdout, proc.stderr)
                self._tip = None
                return None
            if _local_lock_busy(text):
                # Another process of this clone (a send, a person's git) holds the ref lock for a
                # moment: that is not an outage. Wait for the lock file to go (no network call
                # meanwhile), then fetch again.
                if attempt < LOCAL_LOCK_RETRIES and self._ref_lock_released():
                    continue
                # The remote answered; only this clone's ref stayed locked (a lock younger than
                # STALE_LOCK_AGE, which nobody may remove yet).
                raise ref_stays_locked(argv, proc, self.remote_ref, fetched=self._fetched_head())
            raise damaged_objects(argv, proc) or RemoteUnavailable(argv, proc.returncode, proc.stdout, proc.stderr)
        self.last_sync = time.monotonic()
        self._tip = UNKNOWN  # read the ref our fetch wrote (FETCH_HEAD may be someone else's)
        return self.tip()

    def note_fetched(self, tip: Optional[str]) -> None:
        """A fetch of the shared branch outside :meth:`fetch` (the monitor's poll, a look at the
        whole fleet) just succeeded with ``tip``: the tip cache, the in-process freshness (a
        delivery right after builds on it without fetching again) and ``FETCH_HEAD``'s time (a
        standalone send in this clone sees a fresh fetch, even after ``--no-write-fetch-head``)."""
        self._tip = tip  # the value the fetch wrote to the tracking ref: no process to read it again
        self.last_sync = time.monotonic()
        try:
            os.utime(self.git_dir / "FETCH_HEAD")
        except OSError:
            pass  # no FETCH_HEAD yet: a standalone send fetches, as before

    def _ref_lock_released(self) -> bool:
        """Wait up to :data:`LOCAL_LOCK_WAIT` seconds for the tracking ref's lock files to go;
        whether they did (with none there, the ref only moved under the fetch: try again)."""
        locks = [self.common_dir / f"{self.remote_ref}.lock", self.common_dir / "packed-refs.lock"]
        deadline = time.monotonic() + LOCAL_LOCK_WAIT
        while True:
            sleep_jittered(0.05, 0.2)
            if not any(lock.exists() for lock in locks):
                return True
            if time.monotonic() >= deadline:
                return False

    def _fetched_head(self) -> Optional[str]:
        """The shared branch's tip as the last fetch recorded it in ``FETCH_HEAD``, when that
        names this branch and the commit is here; else ``None``."""
        try:
            text = (self.git_dir / "FETCH_HEAD").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        for line in text.splitlines()[:100]:
            oid, _, rest = line.partition("\t")
            if is_oid(oid, self.hexlen) and f"branch '{self.branch}' of " in rest:
                proc = self.git("rev-parse", "-q", "--verify", f"{oid}^{{commit}}", check=False)
                return oid if proc.returncode == 0 else None
        return None

    def remote_tip(self, *, allow_missing: bool = False) -> Optional[str]:
        """The remote's current tip by ``ls-remote`` (no objects transferred).

        A branch the remote does not have is :class:`BranchMissing` (``None`` with
        ``allow_missing``).
        """
        proc = self.network_git("ls-remote", "--heads", "origin", f"refs/heads/{self.branch}", check=False)
        if proc.returncode != 0:
            raise RemoteUnavailable(["git", "ls-remote", "origin", self.branch], proc.returncode,
                                    proc.stdout, proc.stderr)
        tip = listed_refs(proc.stdout).get(f"refs/heads/{self.branch}")
        if tip is not None:
            return tip
        if allow_missing:
            return None
        raise BranchMissing(self.branch, ["git", "ls-remote", "origin", self.branch], proc.returncode,
                            proc.stdout, proc.stderr)

    def sync(self, max_age: float = 0.0, *, allow_missing: bool = False) -> Optional[str]:
        """The tip to build on: the known one when it is younger than ``max_age``, else fetched.

        PROTOCOL.md allows pushing from a recent tip; a stale one only costs a rejected push.
        No known tip is never "recent": ``FETCH_HEAD``'s age says nothing about a branch this
        clone has not fetched, so the fetch tells whether the remote has it.
        """
        if max_age > 0:
            age = time.monotonic() - self.last_sync if self.last_sync else self._fetch_head_age()
            if age is not None and age < max_age:
                tip = self.tip()
                if tip is not None or allow_missing:
                    return tip
        return self.fetch(allow_missing=allow_missing)

    def _fetch_head_age(self) -> Optional[float]:
        try:
            return max(0.0, time.time() - (self.git_dir / "FETCH_HEAD").stat().st_mtime)
        except OSError:
            return None

    def _mark_synced(self) -> None:
        self.last_sync = time.monotonic()
        try:  # a verified push counts as a fetch of the branch for the next standalone send
            os.utime(self.git_dir / "FETCH_HEAD")
        except OSError:
            pass

    def push(self, commit: str, expected: Optional[str]) -> None:
        """Push ``commit`` as a compare-and-swap and verify it by the remote's ref-update status.

        ``expected`` is the tip ``commit`` was built on, ``None`` for a branch that must not
        exist yet (``--init``). The push carries it as a lease
        (``--force-with-lease=refs/heads/<branch>:<expected>``), which the remote checks in the
        same atomic update: the branch moves only while it still points at ``expected``. So a
        push never lands on a tip it did not read (another server's push landed first, the
        branch was rewritten or deleted): that is :class:`PushRejected`, and the transaction
        reads again. ``commit``'s only parent is ``expected``, so the update is a fast-forward.

        A local object that the push cannot read (pruned under us) is :class:`ObjectMissing`;
        any other failure is :class:`RemoteUnavailable`.
        """
        self.push_attempts += 1
        dest = f"refs/heads/{self.branch}"
        proc = self.network_git("-c", f"core.looseCompression={LOOSE_COMPRESSION}",
                                "push", "--porcelain", "--no-verify",
                                f"--force-with-lease={dest}:{expected or ''}", "origin",
                                f"{commit}:{dest}", check=False)
        status = _push_status(proc.stdout, dest)
        if status is None and proc.returncode == 0 and self.remote_tip(allow_missing=True) == commit:
            status = ("=", "verified by ls-remote")  # no porcelain line: ask the remote itself
        if status is not None and status[0] in (" ", "*", "="):
            self._pushed(commit, clean_exit=proc.returncode == 0)
            return
        raise _push_failure(["git", "push", "origin", f"{commit}:{dest}"], proc, status)

    def _pushed(self, commit: str, *, clean_exit: bool) -> None:
        """The remote's own ref-update status says the branch is at ``commit``: remember it.

        A non-zero exit beside that status is local (the tracking ref was busy): set that ref
        ourselves; a lock that still holds it only leaves the ref stale, which costs one
        rejected push."""
        self._tip = commit
        if not self._push_updates_tracking_ref or not clean_exit:
            self.git("update-ref", "-m", "fleet: verified push", self.remote_ref, commit, check=False)
        self._mark_synced()

    # ----------------------------------------------------------------- objects

    def read_objects(self, specs: Sequence[str], max_bytes: Optional[int] = None
                     ) -> List[Optional[Tuple[str, str, bytes]]]:
        """``cat-file --batch`` for several specs at once: (oid, type, content) or ``None``.

        ``None`` is git's ``<spec> missing``, which means either that a path is not in its tree
        or that an object is gone: only the caller, who knows the trees along the path, can tell
        (:meth:`_checked_trees`). A ``cat-file`` that fails (a damaged object) is
        :class:`ObjectMissing`. Each object's header is read before its content: one that
        declares more than ``max_bytes`` stops the read (:class:`ObjectTooLarge`) unread.
        """
        if not specs:
            return []
        limit = MAX_OBJECT_BYTES if max_bytes is None else max_bytes
        argv = ["git", "cat-file", "--batch"]
        proc = spawn_git(self.root, *argv[1:], stdin=subprocess.PIPE)
        errors: List[bytes] = []
        expired: List[bool] = []

        def expire() -> None:
            expired.append(True)
            proc.kill()

        helpers = [threading.Thread(target=_feed, daemon=True,
                                    args=(proc.stdin, "".join(s + "\n" for s in specs).encode("utf-8"))),
                   threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)]
        timer = threading.Timer(LOCAL_TIMEOUT, expire)
        for thread in (*helpers, timer):
            thread.start()
        done = False
        try:
            results = [self._read_one(proc, spec, limit) for spec in specs]
            done = True
            return results
        except ObjectMissing as exc:
            proc.kill()
            for thread in helpers:
                thread.join()
            if expired:
                raise GitTimeout(argv, None, b"", b"".join(errors), f"timed out after {LOCAL_TIMEOUT:g} s") from None
            raise ObjectMissing(argv, proc.wait(), b"", b"".join(errors), exc.reason) from None
        except ObjectTooLarge:
            proc.kill()
            raise
        finally:
            timer.cancel()
            if not done:
                proc.kill()  # whatever stopped the read (Ctrl+C included), the child stops too
            proc.stdout.close()
            proc.wait()
            for thread in helpers:
                thread.join()

    def read_objects_within(self, specs: Sequence[str], max_bytes: int
                            ) -> Tuple[Dict[str, Optional[Tuple[str, str, bytes]]], Dict[str, ObjectTooLarge]]:
        """:meth:`read_objects`, leaving out each object over ``max_bytes`` (the batch is read
        again without it), so that one oversized object, which another server may have written,
        cannot keep the others from being read. Returns (spec -> what ``cat-file`` gave, spec ->
        why it was left out).

        A spec that names an object by its id (``<oid>`` or ``<oid>:<path>``) is read from loose
        objects when it can be (:meth:`ObjectStore.walk_loose`): after a small fetch what moved
        is loose, and a look at the fleet then needs no ``cat-file`` for it."""
        found: Dict[str, Optional[Tuple[str, str, bytes]]] = {}
        left_out: Dict[str, ObjectTooLarge] = {}
        wanted = []
        for spec in specs:
            oid, colon, path = spec.partition(":")
            try:
                loose = (self._read_loose_spec(oid, path, max_bytes)
                         if is_oid(oid, self.hexlen) and bool(colon) == bool(path) else None)
            except TooLarge as exc:
                if path:  # perhaps a commit or tree on the way: git says what it makes of it
                    loose = None
                else:
                    left_out[spec] = ObjectTooLarge(["git", "cat-file", spec], f"{spec}: {exc}", exc.oid)
                    continue
            if loose is None:
                wanted.append(spec)
            else:
                found[spec] = loose[0]
        while True:
            try:
                found.update(zip(wanted, self.read_objects(wanted, max_bytes)))
                return found, left_out
            except ObjectTooLarge as exc:
                spec = exc.argv[-1]
                if spec not in wanted:
                    raise
                wanted.remove(spec)
                left_out[spec] = exc

    def _read_loose_spec(self, oid: str, path: str,
                         max_bytes: int) -> Optional[Tuple[Optional[Tuple[str, str, bytes]]]]:
        """``(what cat-file would give for <oid>[:<path>],)`` from loose objects alone; ``None``
        when git has to read it."""
        if not path:
            item = self.objects.read_loose(oid, max_bytes)
            return None if item is None else ((oid, item[0], item[1]),)
        walked = self.objects.walk_loose(oid, path, max_bytes)
        return None if walked is None else (walked[-1],)

    @staticmethod
    def _read_one(proc: "subprocess.Popen[bytes]", spec: str, max_bytes: int) -> Optional[Tuple[str, str, bytes]]:
        """One answer of a running ``cat-file --batch``: its header line, then its content."""
        header = proc.stdout.readline(_HEADER_LINE_MAX)
        if not header.endswith(b"\n"):
            raise ObjectMissing(["git", "cat-file", "--batch"], proc.poll(), b"", b"",
                                f"cat-file stopped before {spec}")
        parts = header.decode("utf-8", "replace").split(" ")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            return None  # "<spec> missing", "ambiguous"
        oid, kind, size = parts[0], parts[1], int(parts[2])
        if size > max_bytes:
            raise ObjectTooLarge(["git", "cat-file", spec], f"{spec}: {TooLarge(oid, kind, size, max_bytes)}", oid)
        content = proc.stdout.read(size + 1)
        if len(content) != size + 1:
            raise ObjectMissing(["git", "cat-file", "--batch"], proc.poll(), b"", b"",
                                f"cat-file stopped inside {spec}")
        return oid, kind, content[:size]

    def _checked_trees(self, commit: str, found: Mapping[str, Optional[Tuple[str, str, bytes]]],
                       known: Optional[Mapping[str, Optional[List[TreeEntry]]]] = None
                       ) -> Dict[str, Optional[List[TreeEntry]]]:
        """The trees of ``commit`` at these folders, parsed; ``None`` for a folder that is absent.

        ``found`` holds what git (or the loose reader) gave for each folder, ``known`` trees
        already checked. A folder is absent only when its parent tree was read and holds no
        folder of that name; the root tree, and every tree its parent names, must be readable,
        or this raises :class:`ObjectMissing` (PROTOCOL.md: a missing object is never an empty
        mailbox). Parents come first: every folder's parent is in ``found`` or ``known``.
        """
        trees: Dict[str, Optional[List[TreeEntry]]] = dict(known or {})
        for folder in sorted(found):  # a prefix sorts before its extensions: parents first
            expected: Optional[str] = None
            if folder:
                parent, _, name = folder.rpartition("/")
                entries = trees.get(parent)
                entry = None if entries is None else next((e for e in entries if e[3] == name), None)
                if entry is None or entry[1] != "tree":
                    trees[folder] = None  # absent from a tree that was read (or a file is there)
                    continue
                expected = entry[2]
            obj = found[folder]
            spec = _tree_spec(commit, folder)
            if obj is None or obj[1] != "tree" or (expected is not None and obj[0] != expected):
                raise ObjectMissing(["git", "cat-file", spec], None, b"", b"",
                                    f"{spec} is missing or unreadable in this clone")
            try:
                trees[folder] = parse_tree(obj[2], self.hexlen)
            except (ValueError, UnicodeDecodeError):
                raise ObjectMissing(["git", "cat-file", spec], None, b"", b"",
                                    f"{spec} is not a readable tree") from None
        return trees

    def read_file(self, commit: Optional[str], path: str, max_bytes: Optional[int] = None
                  ) -> Tuple[Optional[str], Optional[bytes]]:
        """(blob id, content) of ``path`` at ``commit``; ``(None, None)`` when absent; a blob (or
        tree along the path) over ``max_bytes`` is :class:`ObjectTooLarge`, never read.

        Absent means: a tree along the path was read and does not name the next part. Any tree
        or blob that the path needs and git cannot produce raises :class:`ObjectMissing`; a
        folder (or submodule) where the file should be raises :class:`NotAFile`.

        A commit id names immutable content, so the last few reads are kept: a cycle that reads
        the mailbox and then marks it read asks git once.
        """
        if commit is None:
            return None, None
        key = (commit, path)
        if key in self._files:
            return self._files[key]
        cacheable = len(commit) == self.hexlen
        # The trees along the path come in the same call: they tell "absent" from "missing", and
        # a transaction that then writes this file needs them, and asks no second time.
        folders = _folders_of([path])
        *found_trees, found = self._path_objects(commit, path, folders, cacheable,
                                                 MAX_OBJECT_BYTES if max_bytes is None else max_bytes)
        trees = self._checked_trees(commit, dict(zip(folders, found_trees)))
        parent, _, name = path.rpartition("/")
        entries = trees.get(parent)
        entry = None if entries is None else next((e for e in entries if e[3] == name), None)
        result: Tuple[Optional[str], Optional[bytes]] = (None, None)
        if entry is not None and entry[1] != "blob":
            raise NotAFile(["git", "cat-file", f"{commit}:{path}"],
                           f"{path} at {commit[:12]} is a {'folder' if entry[1] == 'tree' else 'submodule'}, "
                           "not a file", entry[2])
        if entry is not None:
            if found is None or found[1] != "blob" or found[0] != entry[2]:
                raise ObjectMissing(["git", "cat-file", f"{commit}:{path}"], None, b"", b"",
                                    f"{commit}:{path} (blob {entry[2][:12]}) is missing or unreadable "
                                    "in this clone")
            result = (found[0], found[2])
        if cacheable:
            if len(self._files) >= 4:
                self._files.clear()
                self._trees.clear()
            self._files[key] = result
            for folder, tree in trees.items():
                self._trees[(commit, folder)] = tree
        return result

    def _path_objects(self, commit: str, path: str, folders: Sequence[str], cacheable: bool,
                      max_bytes: int) -> List[Optional[Tuple[str, str, bytes]]]:
        """The trees of ``folders`` and the blob at ``path``, as ``cat-file --batch`` gives them:
        from loose objects when they all are, else from git; over ``max_bytes`` is
        :class:`ObjectTooLarge`."""
        try:
            loose = self.objects.walk_loose(commit, path, max_bytes) if cacheable else None
        except TooLarge as exc:
            raise ObjectTooLarge(["git", "cat-file", f"{commit}:{path}"], f"{path} at {commit[:12]}: {exc}",
                                 exc.oid) from None
        if loose is not None:
            return loose
        specs = [_tree_spec(commit, folder) for folder in folders] + [f"{commit}:{path}"]
        return self.read_objects(specs, max_bytes)

    def read_tree(self, commit: Optional[str], folder: str) -> Optional[List[TreeEntry]]:
        """The entries of ``folder`` at ``commit``; ``None`` when absent (as :meth:`read_file`
        tells it: a tree along the path was read and does not name it). A tree that cannot be
        read raises :class:`ObjectMissing`, never reads as an empty folder."""
        if commit is None:
            return None
        folders = _folders_of([f"{folder}/-"]) if folder else [""]
        found = self.read_objects([_tree_spec(commit, f) for f in folders])
        trees = self._checked_trees(commit, dict(zip(folders, found)))
        if len(commit) == self.hexlen:
            for name, tree in trees.items():
                self._trees[(commit, name)] = tree
        return trees.get(folder)

    def write_object(self, kind: str, data: bytes) -> str:
        """Store an object (``blob``, ``tree``, ``commit``) in the clone and return its id
        (:class:`fleet_objects.ObjectStore`: a loose object written by hand, or git's plumbing)."""
        try:
            return self.objects.write(kind, data)
        except StoreFailed as exc:
            raise ObjectMissing(["git", "hash-object", "-w"], None, b"", b"", str(exc)) from None

    def build_tree(self, base_commit: Optional[str], changes: Mapping[str, Optional[bytes]]) -> str:
        """The root tree of ``base_commit`` with ``changes`` applied (path -> content, or None to
        delete). Only the trees along the changed paths are read (one ``cat-file``) and written:
        the cost grows with the depth of the paths, not the size of the repository, and the
        index is never used."""
        blobs = {path: (self.write_object("blob", data) if data is not None else None)
                 for path, data in changes.items()}
        trees: Dict[str, List[TreeEntry]] = {}
        if base_commit:
            folders = _folders_of(changes)
            known = {f: self._trees[(base_commit, f)] for f in folders if (base_commit, f) in self._trees}
            missing = [f for f in folders if f not in known]
            found = self.read_objects([_tree_spec(base_commit, folder) for folder in missing])
            # A tree that cannot be read raises: building on "nothing" there would drop every
            # file it holds from the new commit.
            checked = self._checked_trees(base_commit, dict(zip(missing, found)), known)
            trees = {folder: tree for folder, tree in checked.items() if tree is not None}
        try:
            return edit_tree(self.objects, trees, "", blobs) or self.objects.write_tree([])
        except StoreFailed as exc:
            raise ObjectMissing(["git", "mktree"], None, b"", b"", str(exc)) from None

    def commit_tree(self, tree: str, parent: Optional[str], message: str, author: str) -> str:
        """Write an unsigned commit of ``tree`` on ``parent`` and return its id.

        Written as a loose object like the trees, with the identity git would use and the local
        time zone; when a date is forced through ``GIT_AUTHOR_DATE``/``GIT_COMMITTER_DATE`` (whose
        formats only git parses) ``git commit-tree`` writes it instead.
        """
        people = {role: self.identity(role, author) for role in ("author", "committer")}
        forced = bool(os.environ.get("GIT_AUTHOR_DATE") or os.environ.get("GIT_COMMITTER_DATE"))
        try:
            return self.objects.write_commit(tree, parent, people, message, None if forced else date_stamp())
        except StoreFailed as exc:
            raise ObjectMissing(["git", "commit-tree"], None, b"", b"", str(exc)) from None

    # ----------------------------------------------------------------- the transaction

    def transact(self, change: Callable[[Optional[str]], Optional[Tuple[Mapping[str, Optional[bytes]], str]]],
                 *, author: str, fresh_for: float = 0.0,
                 max_attempts: int = MAX_RACE_ATTEMPTS, create_branch: bool = False) -> "TxResult":
        """Run one PROTOCOL.md transaction.

        ``change(tip)`` reads what it needs at ``tip`` and returns ``(path -> new content,
        commit message)``, or ``None`` when the change is already there (idempotent). Lost push
        races are retried after a short, growing random delay; other failures raise.

        The branch must exist on the remote (:class:`BranchMissing` otherwise); only
        ``create_branch`` (``--init``) may build a first commit. An object that cannot be read
        (:class:`ObjectMissing`) makes it fetch every object again and start over, once; a
        second time it raises, with nothing written to the remote.
        """
        delay = 0.05
        refetched = False
        started = time.monotonic()
        tip = self._tip_for_write(fresh_for, create_branch)
        for attempt in range(1, max_attempts + 1):
            try:
                planned = change(tip)
                if planned is None:
                    return TxResult(commit=tip, changed=False, attempts=attempt, base=tip)
                files, message = planned
                tree = self.build_tree(tip, files)
                commit = self.commit_tree(tree, tip, message, author)
                self.push(commit, tip)
            except ObjectMissing as exc:
                if refetched or attempt == max_attempts:
                    raise
                refetched = True
                log.warning("%s: fetching every object of the branch again before retrying", exc.reason,
                            extra={"metadata": {"error": exc.reason}})
                tip = self._tip_for_write(0.0, create_branch, refetch=True)
                continue
            except PushRejected:
                if attempt == max_attempts or (attempt >= MIN_RACE_ATTEMPTS
                                               and time.monotonic() - started > RACE_TIME_LIMIT):
                    raise
                # Jittered and growing: with many writers, retries spread out instead of
                # colliding again (measured in bench/contention.py).
                sleep_jittered(delay / 2, delay)
                delay = min(delay * 1.6, RACE_DELAY_CAP)
                tip = self._tip_for_write(0.0, create_branch)
                continue
            return TxResult(commit=commit, changed=True, attempts=attempt, base=tip)
        raise AssertionError("unreachable")  # pragma: no cover

    def _tip_for_write(self, max_age: float, create_branch: bool, *, refetch: bool = False) -> Optional[str]:
        """The tip a transaction builds on (:meth:`sync`, or a full refetch).

        A fetch whose only trouble was a locked ref of this clone still brought the tip
        (``FETCH_HEAD``): the transaction builds on that, since the push is the compare-and-swap
        and the tracking ref is only a cache. A branch the remote does not have is
        :class:`BranchMissing` unless ``create_branch``: no send or monitor creates it.
        """
        try:
            if refetch:
                tip = self.fetch(allow_missing=create_branch, refetch=True)
            else:
                tip = self.sync(max_age, allow_missing=create_branch)
        except LocalRefLocked as exc:
            if exc.fetched is None:
                raise
            log.warning("%s; building on the fetched tip %s", exc.reason, exc.fetched[:12],
                        extra={"metadata": {"error": exc.reason, "tip": exc.fetched}})
            tip = self._tip = exc.fetched
            self.last_sync = time.monotonic()
        if tip is None and not create_branch:
            raise BranchMissing(self.branch, ["git", "fetch", "origin", self.branch], None)
        return tip


class TxResult:
    """A finished transaction: the commit now on the remote, built on ``base`` (its parent)."""

    __slots__ = ("commit", "changed", "attempts", "base")

    def __init__(self, commit: Optional[str], changed: bool, attempts: int,
                 base: Optional[str] = None) -> None:
        self.commit = commit
        self.changed = changed
        self.attempts = attempts
        self.base = base

    def __repr__(self) -> str:
        return f"TxResult(commit={self.commit!r}, changed={self.changed}, attempts={self.attempts})"


# --------------------------------------------------------------------------- git facts
#
# What this suite knows about a repository's files, said once: where the git dirs are, which lock
# files git leaves behind, which markers say an operation is under way. ``Clone``, the monitor,
# ``system_health`` and ``fleet_common.ensure_excluded`` ask these functions rather than looking.


class GitLayout(namedtuple("GitLayout", ("git_dir", "common_dir"))):
    """Where a work tree keeps its git data (two :class:`~pathlib.Path`).

    ``git_dir`` is the work tree's own (``HEAD``, ``index``, ``MERGE_HEAD``); ``common_dir`` is
    what linked worktrees share (``refs``, ``objects``, ``config``, ``info/exclude``). They are the
    same folder in a plain clone.
    """

    __slots__ = ()


GITFILE_MAX_BYTES: Final = 4096  # a ".git" file holds one "gitdir: <path>" line


def git_layout(work_tree: Union[str, "os.PathLike[str]"]) -> Optional[GitLayout]:
    """The git dirs of the work tree whose top folder is ``work_tree``, read without running git
    (a plain clone's ``.git`` folder, or the ``gitdir:`` file of a linked worktree or submodule,
    with its ``commondir``); ``None`` when ``work_tree`` has no readable ``.git``."""
    top = Path(work_tree)
    dotgit = top / ".git"
    try:
        if dotgit.is_dir():
            git_dir = dotgit.resolve()
        elif dotgit.is_file():
            with open(dotgit, "rb") as handle:
                text = handle.read(GITFILE_MAX_BYTES).decode("utf-8", "replace").strip()
            if not text.startswith("gitdir:"):
                return None
            git_dir = (top / text[len("gitdir:"):].strip()).resolve()  # relative to the work tree
        else:
            return None
        common_file = git_dir / "commondir"
        if not common_file.is_file():
            return GitLayout(git_dir, git_dir)
        with open(common_file, "rb") as handle:
            base = handle.read(GITFILE_MAX_BYTES).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return GitLayout(git_dir, (git_dir / base).resolve())  # relative to the worktree's git dir


# Operations a person runs in a work tree, by the marker git leaves in its git dir while one is
# under way (git's own wt-status.c looks for the same): a merge or fast-forward now would land
# in the middle of it.
OPERATION_MARKERS: Final = (("MERGE_HEAD", "merge"), ("rebase-merge", "rebase"),
                            ("rebase-apply", "rebase"), ("CHERRY_PICK_HEAD", "cherry-pick"),
                            ("REVERT_HEAD", "revert"), ("BISECT_LOG", "bisect"))


class Operation(namedtuple("Operation", ("marker", "label"))):
    """An operation under way: ``marker``, the file or folder git left (``MERGE_HEAD``), and
    ``label``, what a person calls it (``merge``)."""

    __slots__ = ()


def operation_in_progress(git_dir: Path) -> Optional[Operation]:
    """The operation under way in the work tree of ``git_dir`` (its own, not the common dir)."""
    for marker, label in OPERATION_MARKERS:
        if (git_dir / marker).exists():
            return Operation(marker, label)
    return None


STALE_LOCK_AGE: Final = 120.0  # seconds (the seed: locks older than 2 minutes are stale)
# Lock files git takes at the top of a git dir (a worktree's own index and HEAD, the common
# dir's packed-refs, config and shallow); ref locks live under refs/ and are found by walking.
GIT_LOCK_NAMES: Final = ("index.lock", "HEAD.lock", "packed-refs.lock", "config.lock", "shallow.lock",
                         "ORIG_HEAD.lock", "FETCH_HEAD.lock")
# How many entries of refs/ the lock search visits: a clone with a huge number of loose refs
# must not make a health check or a monitor cycle slow.
LOCK_WALK_BUDGET: Final = 20000


def lock_files(git_dir: Path, common_dir: Optional[Path] = None) -> List[Path]:
    """Lock files git leaves behind when killed: top-level ones in the work tree's git dir and
    the common dir, and any under ``refs/`` (searched within :data:`LOCK_WALK_BUDGET`)."""
    common = git_dir if common_dir is None else common_dir
    folders = [git_dir] if os.path.normcase(str(common)) == os.path.normcase(str(git_dir)) else [git_dir, common]
    found = [folder / name for folder in folders for name in GIT_LOCK_NAMES if (folder / name).exists()]
    budget = LOCK_WALK_BUDGET
    for folder, _dirs, files in os.walk(common / "refs"):
        found.extend(Path(folder) / name for name in files if name.endswith(".lock"))
        budget -= 1 + len(files)
        if budget <= 0:
            break
    return found


def lock_name(path: Path, common_dir: Path) -> str:
    """A lock file as a person reads it, relative to the common dir: ``refs/heads/main.lock``,
    ``index.lock``, a linked worktree's ``worktrees/<name>/index.lock``."""
    try:
        return path.relative_to(common_dir).as_posix()
    except ValueError:
        return path.name  # a git dir kept outside the common one (a submodule's, say)


def git_busy_in(repo_root: Path, git_dir: Path) -> bool:
    """Whether a running git process may be working in this repository (psutil).

    A git process whose working folder or command line we cannot read counts as busy: a lock is
    only ever removed when we are sure nobody holds it.
    """
    import psutil  # lazy: only needed when a stale-looking lock exists

    roots = {str(repo_root.resolve()), str(git_dir.resolve())} | _linked_worktrees(git_dir)
    me = os.getpid()
    for proc in psutil.process_iter(["name", "pid"]):
        try:
            name = (proc.info.get("name") or "").lower()
            if proc.info.get("pid") == me or not name.startswith("git"):
                continue
            cwd = proc.cwd()
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            return True
        if _inside(cwd, roots) or any(r in cmd for r in roots):
            return True
        try:
            named = proc.environ().get("GIT_DIR")  # git started by path alone (GIT_DIR=... git ...)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            return True
        if named and _inside(str(Path(cwd, named).resolve()), roots):
            return True
    return False


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def _linked_worktrees(git_dir: Path) -> Set[str]:
    """The folders of this repository's linked worktrees (``git worktree add``), which share
    its refs and so its locks: ``<git dir>/worktrees/*/gitdir`` names each one's ``.git`` file."""
    found: Set[str] = set()
    for entry in _entries(git_dir / "worktrees"):
        try:
            text = (Path(entry.path) / "gitdir").read_text(encoding="utf-8", errors="replace")[:4096].strip()
        except OSError:
            continue
        if text:
            found.add(str(Path(text).parent.resolve()))
            found.add(str(Path(entry.path).resolve()))
    return found


def remove_stale_locks(repo_root: Path, git_dir: Path, *, max_age: float = STALE_LOCK_AGE,
                       now: Optional[float] = None, common_dir: Optional[Path] = None) -> List[Tuple[Path, float]]:
    """Remove git lock files older than ``max_age`` when no git process works in the repo.

    Returns what was removed with each file's age; every removal is logged.
    """
    now = time.time() if now is None else now
    stale = []
    for path in lock_files(git_dir, common_dir):
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        if age > max_age:
            stale.append((path, age))
    if not stale or git_busy_in(repo_root, git_dir):
        return []
    removed = []
    for path, age in stale:
        try:
            path.unlink()
        except OSError as exc:
            log.warning("could not remove stale git lock %s: %s", path, exc)
            continue
        removed.append((path, age))
        log.warning("removed stale git lock %s (%.0f s old, no git process running here)",
                    lock_name(path, common_dir or git_dir), age,
                    extra={"metadata": {"path": str(path), "age_seconds": round(age, 1)}})
    return removed
