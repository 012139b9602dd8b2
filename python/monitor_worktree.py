"""Keeping the working tree current: the fast-forward, its refusals, and self-upgrade.

PROTOCOL.md ("Keeping the working tree up to date", "Trust between servers"): the checked-out
branch is fast-forwarded only when nothing local can be touched; never when the incoming commits
change a server's runtime path (git would replace ignored files with committed ones); and, under
``--upgrade-signed-by``, never when they change the suite's files without an allowed SSH
signature. When a fast-forward changes the suite's own files, the monitor restarts into the new
version after the cycle, unless that version fails its self-check.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

from fleet_common import RUNTIME_SUBDIRS, is_link, is_valid_server_id
from fleet_git import GitError, ObjectTooLarge, operation_in_progress, run_git

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Set

    from fleet_git import Clone

log = logging.getLogger("message_monitor")  # the monitor's log, as before the split



class WorkTree:
    """The checked-out branch of one clone, as the monitor updates it.

    ``on_restart`` is called when a fast-forward brought a new suite version that passed its
    self-check: the monitor finishes the cycle and restarts into it.
    """

    def __init__(self, clone: Clone, *, upgrade_signers: Optional[str] = None,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        self.clone = clone
        self.repo = clone.root
        self.upgrade_signers = upgrade_signers  # --upgrade-signed-by: git's allowed-signers file
        self.on_restart = on_restart
        self.ff_warned: Optional[str] = None
        self.failed_upgrades: Set[str] = set()

    def fast_forward(self) -> str:
        """Fast-forward the checked-out branch when nothing local can be touched (PROTOCOL.md).

        Refused (a warning, once per reason) when the incoming commits touch a runtime path of
        any server: git replaces ignored files, so a committed ``code2/logs/structured.log``
        symlink or ``code2/queue/message_queue.json`` would take over that server's own files.
        Also refused when ``--upgrade-signed-by`` is set and the commits change the suite's
        files without a signature by an allowed key: the new code would run on the next start.
        """
        tip = self.clone.tip()
        proc = run_git(self.repo, "rev-parse", "HEAD", "--symbolic-full-name", "HEAD", check=False)
        lines = proc.stdout.decode().split()
        if proc.returncode != 0 or len(lines) != 2 or not tip:
            return self._ff_warn("no commit checked out or no fetched branch", "skipped")
        head, head_ref = lines
        if head == tip:
            return "current"
        if head_ref != f"refs/heads/{self.clone.branch}":
            return self._ff_warn(f"{head_ref if head_ref != 'HEAD' else 'a detached HEAD'} is "
                                 f"checked out, not {self.clone.branch}", "other-branch")
        git_dir = self.clone.git_dir
        operation = operation_in_progress(git_dir)
        if operation is not None:
            return self._ff_warn(f"a {operation.marker} is in progress in the working tree", "busy")
        try:
            touched = runtime_paths_changed(self.repo, head, tip)
        except GitError as exc:
            return self._ff_warn(f"the incoming changes cannot be listed: {exc}", "refused")
        if touched:
            more = f" and {len(touched) - 1} more" if len(touched) > 1 else ""
            return self._ff_warn(f"the incoming commits change {ascii(touched[0][:200])}{more}, a "
                                 "server's runtime path (logs, queue and state are never committed)",
                                 "runtime-path")
        refused = self._unsigned_release(head, tip)
        if refused is not None:
            self.ff_warned = refused
            return "unsigned"
        try:
            changes = changed_paths(self.repo, head, tip)
            local = local_files_in_the_way(self.repo, changes)
            before, folders_before = _dirty(self.repo, changes), _folders(self.repo, changes)
        except (GitError, OSError) as exc:
            return self._ff_warn(f"the incoming changes cannot be checked: {exc}", "refused")
        if local:
            return self._ff_warn(f"the incoming commits write {ascii(local[0][:200])}, where this clone keeps "
                                 "files of its own that it ignores", "local-files")
        # --ff-only refuses, touching nothing, when the branch has diverged or local changes are
        # in the way; --no-autostash: a person's work is never stashed; --no-overwrite-ignore:
        # nor is an ignored file of this clone replaced.
        merge = run_git(self.repo, "merge", "--ff-only", "--no-autostash", "--no-overwrite-ignore", "--quiet",
                        "--no-stat", tip, check=False)
        if merge.returncode != 0:
            _undo_partial_checkout(self.repo, head, changes, before, folders_before)
            reason = merge.stderr.decode("utf-8", "replace").strip().splitlines()
            text = reason[0] if reason else "git merge --ff-only failed"
            if "not possible to fast-forward" in text.lower():
                return self._ff_warn("the local branch has commits the remote does not have", "diverged")
            return self._ff_warn(text, "refused")
        after = run_git(self.repo, "rev-parse", "HEAD", check=False).stdout.decode().strip()
        if after != tip:
            return self._ff_warn("the local branch has commits the remote does not have", "diverged")
        self.ff_warned = None
        log.info("working tree fast-forwarded to %s", tip[:12], extra={"metadata": {"tip": tip}})
        self._check_upgrade(head, tip)
        return "fast-forwarded"

    def _ff_warn(self, reason: str, outcome: str) -> str:
        if self.ff_warned != reason:  # once per reason, not every cycle
            self.ff_warned = reason
            log.warning("working tree not fast-forwarded: %s (mail is read from the fetched "
                        "branch and keeps flowing)", reason, extra={"metadata": {"reason": reason}})
        return outcome

    def _suite_folder(self) -> Optional[str]:
        """The suite's folder relative to the clone (``python``), or None when it lives elsewhere."""
        suite = Path(__file__).resolve().parent
        try:
            return suite.relative_to(self.repo.resolve()).as_posix() or "."
        except ValueError:
            return None

    def _suite_changed(self, old: str, new: str) -> bool:
        rel = self._suite_folder()
        if rel is None:
            return False  # the suite does not live in this clone
        diff = run_git(self.repo, "diff", "--quiet", old, new, "--", rel, check=False)
        return diff.returncode != 0

    def _unsigned_release(self, old: str, new: str) -> Optional[str]:
        """Why the commits ``old..new`` may not reach the working tree under ``--upgrade-signed-by``
        (they change the suite's files and ``new`` is not signed by an allowed key), else None.

        Logged as an error once per commit. The signature of the tip covers its whole tree, so
        a signed release on top of unsigned commits is a release its signer vouches for.
        """
        if self.upgrade_signers is None or not self._suite_changed(old, new):
            return None
        try:
            problem = release_signature_problem(self.clone, new, self.upgrade_signers)
        except GitError as exc:
            problem = str(exc)
        if problem is None:
            return None
        reason = (f"the suite's files change in {new[:12]}, which is not signed by a key in "
                  f"{self.upgrade_signers}: {problem}")
        if new not in self.failed_upgrades:
            self.failed_upgrades.add(new)
            log.error("new suite version not run and working tree not fast-forwarded: %s", reason,
                      extra={"metadata": {"commit": new, "problem": problem}})
        return reason

    def _check_upgrade(self, old: str, new: str) -> None:
        """When the fast-forward changed the suite's own files, restart into the new version
        after this cycle, unless the new version fails its self-check (then stay, and say so).
        Under ``--upgrade-signed-by`` nothing of the new version runs, not even its self-check,
        unless ``new`` carries a signature by an allowed key."""
        if new in self.failed_upgrades or not self._suite_changed(old, new):
            return
        if self.upgrade_signers is not None:
            try:
                problem = release_signature_problem(self.clone, new, self.upgrade_signers)
            except GitError as exc:
                problem = str(exc)
            if problem is not None:
                self.failed_upgrades.add(new)
                log.error("new suite version at %s is not run: not signed by a key in %s: %s",
                          new[:12], self.upgrade_signers, problem,
                          extra={"metadata": {"commit": new, "problem": problem}})
                return
        suite = Path(__file__).resolve().parent
        from fleet_service import self_check

        problem = self_check(sys.executable, str(suite / "message_monitor.py"))
        if problem is not None:
            self.failed_upgrades.add(new)
            log.error("new suite version at %s fails its self-check, staying on the running "
                      "version: %s", new[:12], problem, extra={"metadata": {"commit": new}})
            return
        log.warning("the suite's files changed in %s: restarting into the new version", new[:12],
                    extra={"metadata": {"commit": new}})
        self.on_restart()

    # ----------------------------------------------------------------- periodic work



def runtime_paths_changed(repo: Path, old: str, new: str) -> List[str]:
    """Paths that the commits from ``old`` to ``new`` change in any server's runtime folders.

    That is ``<id>/logs/...``, ``<id>/queue/...`` and ``<id>/state/...`` for any valid id (the
    folders themselves included, in any letter case, for case-insensitive file systems), and a
    top-level ``<id>`` that becomes a symlink or submodule, or a file where this clone has a
    folder: a fast-forward would put it in place of that server's runtime files (PROTOCOL.md,
    "Trust between servers").
    """
    out = run_git(repo, "diff-tree", "-r", "-z", "--no-renames", old, new).stdout
    fields = out.split(b"\0")
    found: List[str] = []
    for meta, raw_path in zip(fields[0::2], fields[1::2]):
        parts = meta.decode("ascii", "replace").lstrip(":").split()
        new_mode = parts[1] if len(parts) > 1 else ""
        path = raw_path.decode("utf-8", "surrogateescape")
        names = path.split("/")
        top = names[0].lower()
        if not is_valid_server_id(top):
            continue
        if len(names) > 1:
            if names[1].lower() in RUNTIME_SUBDIRS:
                found.append(path)
        elif new_mode in ("120000", "160000") or (new_mode != "000000" and _is_real_folder(repo / names[0])):
            found.append(path)
    return found


def changed_paths(repo: Path, old: str, new: str) -> Dict[str, str]:
    """Path -> status letter (``A``, ``M``, ``D``, ``T``) of what the commits ``old..new`` change."""
    out = run_git(repo, "diff-tree", "-r", "-z", "--no-renames", "--name-status", old, new).stdout
    fields = out.split(b"\0")
    return {path.decode("utf-8", "surrogateescape"): status.decode("ascii", "replace")[:1]
            for status, path in zip(fields[0::2], fields[1::2]) if path}


def local_files_in_the_way(repo: Path, changes: Dict[str, str]) -> List[str]:
    """What a fast-forward would write where this clone keeps ignored files of its own, which
    ``git merge`` would add to without a word: an incoming path that exists here ignored, or that
    goes into a folder that exists here and that this clone ignores (an operator's ``.venv``, a
    tool's cache). A path ignored here that touches nothing local (``*.json`` ignored, a first
    ``<id>/heartbeat.json``) is no one's file and goes through."""
    written = sorted(path for path, status in changes.items() if status != "D")
    local: Dict[str, str] = {}  # what exists here -> the incoming path it is in the way of
    for path in written:
        if _below_a_link(repo, path):
            continue  # (a link here that the commit makes a folder: git's own checks judge that)
        if os.path.lexists(repo / path):
            local.setdefault(path, path)
        for folder in _parents(path):
            if _is_real_folder(repo / folder):
                local.setdefault(folder + "/", path)
    if not local:
        return []
    ignored = run_git(repo, "check-ignore", "-z", "--stdin", check=False,
                      input="\0".join(local).encode("utf-8", "surrogateescape"))
    if ignored.returncode not in (0, 1):  # 1: nothing ignored
        raise GitError(["git", "check-ignore"], ignored.returncode, ignored.stdout, ignored.stderr)
    hits = [p.decode("utf-8", "surrogateescape") for p in ignored.stdout.split(b"\0") if p]
    return sorted({local[hit] for hit in hits if hit in local})


def _parents(path: str) -> List[str]:
    """The folders on the way to ``path``, outermost first (``a``, ``a/b`` for ``a/b/c``)."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def _below_a_link(repo: Path, path: str) -> bool:
    """Whether one of the folders on the way to ``path`` is a symbolic link in this clone."""
    for folder in _parents(path):
        try:
            if is_link(os.lstat(repo / folder)):
                return True
        except OSError:
            return False  # nothing there: nothing below it either
    return False


def _dirty(repo: Path, changes: Dict[str, str]) -> Set[str]:
    """Which of these paths differ from ``HEAD`` in the working tree now (or exist, untracked).
    No path goes on git's command line (a commit may change 70,000 of them, or name a file
    ``*``): git lists what differs, and that is matched here."""
    if not changes:
        return set()
    diff = run_git(repo, "diff", "--name-only", "--no-renames", "-z", "HEAD", check=False).stdout
    dirty = {p.decode("utf-8", "surrogateescape") for p in diff.split(b"\0") if p} & set(changes)
    dirty.update(path for path, status in changes.items() if status == "A" and os.path.lexists(repo / path))
    return dirty


def _folders(repo: Path, changes: Dict[str, str]) -> Set[str]:
    """The folders on the way to the paths a fast-forward adds that exist here now."""
    return {folder for path, status in changes.items() if status == "A"
            for folder in _parents(path) if _is_real_folder(repo / folder)}


def _undo_partial_checkout(repo: Path, head: str, changes: Dict[str, str], before: Set[str],
                           folders_before: Set[str]) -> None:
    """A fast-forward that failed half-way (a file it could not replace: read-only, or held open
    on Windows) may have written some files already: put back those it wrote, and remove the
    folders it made, so that a refused fast-forward leaves the working tree as it was, not with
    changes nobody made."""
    after = _dirty(repo, changes)
    written = sorted(after - before)
    made = sorted(_folders(repo, changes) - folders_before, key=lambda f: -f.count("/"))
    if not written and not made:
        return
    restore = [path for path in written if changes[path] != "A"]
    if restore:
        run_git(repo, "--literal-pathspecs", "checkout", head, "--pathspec-from-file=-", "--pathspec-file-nul",
                check=False, input="\0".join(restore).encode("utf-8", "surrogateescape"))
    for path in written:
        if changes[path] == "A":
            try:
                os.unlink(repo / path)
            except OSError:
                pass
    for folder in made:  # deepest first; only folders left empty
        try:
            os.rmdir(repo / folder)
        except OSError:
            pass
    log.warning("a fast-forward that failed half-way had written %d file(s); they were put back", len(written))


def _is_real_folder(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and not is_link(info)


SSH_SIGNATURE_START = b"-----BEGIN SSH SIGNATURE-----"
MAX_RELEASE_COMMIT_BYTES = 1024 * 1024  # a message and a signature; a larger commit is no release


def release_signature_problem(clone: Clone, commit: str, allowed_signers: str) -> Optional[str]:
    """Why ``commit`` is not signed by a key in ``allowed_signers`` (git's allowed-signers file,
    ``gpg.ssh.allowedSignersFile``), or None when it is.

    Only SSH signatures count: a GPG signature would be judged by whatever keyring the service
    account happens to have, not by the operator's list. The commit comes from another machine:
    one over :data:`MAX_RELEASE_COMMIT_BYTES` is refused unread.
    """
    repo = clone.root
    try:
        found = clone.read_objects([commit], MAX_RELEASE_COMMIT_BYTES)[0]
    except ObjectTooLarge as exc:
        return exc.reason
    if found is None or found[1] != "commit":
        return "the commit cannot be read"
    raw = found[2]
    headers = raw.split(b"\n\n", 1)[0]
    signature = next((line.split(b" ", 1)[1] for line in headers.split(b"\n")
                      if line.startswith((b"gpgsig ", b"gpgsig-sha256 ")) and b" " in line), None)
    if signature is None:
        return "the commit is not signed"
    if not signature.strip().startswith(SSH_SIGNATURE_START):
        return "the commit is not signed with an SSH key"
    proc = run_git(repo, "-c", "gpg.format=ssh", "-c", f"gpg.ssh.allowedSignersFile={allowed_signers}",
                   "verify-commit", commit, check=False)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    bad = [line for line in lines if not line.lower().startswith("good ")]
    return " ".join((bad or lines or ["git verify-commit failed"])[-1].split())[:200]


# --------------------------------------------------------------------------- --init
