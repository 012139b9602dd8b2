"""The git facts fleet_git owns: the git-dir layout, lock files, operations in progress."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from conftest import git

from fleet_common import ensure_excluded
from fleet_git import (
    GIT_LOCK_NAMES,
    GitLayout,
    git_layout,
    lock_files,
    lock_name,
    operation_in_progress,
    remove_stale_locks,
)
from system_health import get_system_health


def _worktree(fleet, tmp_path: Path) -> Tuple[Path, Path]:
    """A clone and a linked worktree of it (its own git dir, refs and objects shared)."""
    clone = fleet.clone("code2")
    linked = tmp_path / "linked"
    git(clone, "worktree", "add", "-q", "-b", "side", str(linked))
    return clone, linked


def test_a_plain_clone_has_one_git_dir(fleet):
    clone = fleet.clone("code2")
    dotgit = (clone / ".git").resolve()
    assert git_layout(clone) == GitLayout(dotgit, dotgit)


def test_a_linked_worktree_has_its_own_git_dir_and_the_common_one(fleet, tmp_path):
    clone, linked = _worktree(fleet, tmp_path)
    layout = git_layout(linked)
    assert layout is not None
    assert layout.git_dir == Path(git(linked, "rev-parse", "--absolute-git-dir")).resolve()
    assert layout.common_dir == (clone / ".git").resolve() != layout.git_dir


def test_no_git_dir_or_a_foreign_dot_git_file_is_none(tmp_path):
    assert git_layout(tmp_path) is None
    (tmp_path / ".git").write_text("not a gitfile\n")
    assert git_layout(tmp_path) is None


def test_runtime_folders_are_excluded_in_the_common_dir_of_a_worktree(fleet, tmp_path):
    clone, linked = _worktree(fleet, tmp_path)
    ensure_excluded(linked, "code2")
    exclude = (clone / ".git" / "info" / "exclude").read_text()
    assert "/code2/queue/" in exclude


def test_every_operation_marker_is_seen_bisect_included(fleet):
    clone = fleet.clone("code2")
    git_dir = clone / ".git"
    assert operation_in_progress(git_dir) is None
    git(clone, "bisect", "start")
    found = operation_in_progress(git_dir)
    assert found is not None and (found.marker, found.label) == ("BISECT_LOG", "bisect")
    git(clone, "bisect", "reset")
    assert operation_in_progress(git_dir) is None


def test_locks_of_a_worktree_are_found_in_both_git_dirs(fleet, tmp_path):
    _clone, linked = _worktree(fleet, tmp_path)
    layout = git_layout(linked)
    assert layout is not None
    own = layout.git_dir / "index.lock"
    ref = layout.common_dir / "refs" / "heads" / "side.lock"
    for path in (own, ref):
        path.write_bytes(b"")
    found = lock_files(layout.git_dir, layout.common_dir)
    assert set(found) == {own, ref}
    names = sorted(lock_name(path, layout.common_dir) for path in found)
    assert names == ["refs/heads/side.lock", "worktrees/linked/index.lock"]
    removed = remove_stale_locks(linked, layout.git_dir, common_dir=layout.common_dir, max_age=-1.0)
    assert {path for path, _age in removed} == {own, ref} and not own.exists() and not ref.exists()


def test_system_health_reports_the_same_locks_as_fleet_git(fleet):
    clone = fleet.clone("code2")
    for name in GIT_LOCK_NAMES:
        (clone / ".git" / name).write_bytes(b"")
    repo = get_system_health(str(clone), "code2")["checks"]["repository"]
    assert sorted(item["path"] for item in repo["lock_files"]) == sorted(GIT_LOCK_NAMES)
