"""Git objects of one clone, written and read by hand, with git's plumbing as the checked fallback.

A send writes a blob, the trees along its path and a commit, and reads the mailbox at the tip.
A git process per object costs more than the rest of the send, so :class:`ObjectStore` writes
them itself in git's stable loose-object format (zlib of ``"<kind> <size>\\0"`` plus the content,
at ``objects/<2 hex>/<rest>``) and reads loose objects the same way. When that fast path cannot
be used it asks git instead, which writes the same bytes and so the same ids:

- an object format it does not know (only ``sha1`` and ``sha256`` are known),
- an objects folder it cannot write (another user's clone, a read-only mount),
- ``FLEET_GIT_PLUMBING=1`` in the environment (tests run both paths).

Then ``hash-object -w`` stores blobs, ``mktree`` trees, ``commit-tree`` commits, and reads go
through ``cat-file`` (the caller's batch), never through the loose reader.
"""

from __future__ import annotations

import os
import time
import zlib

from fleet_start import LOOSE_COMPRESSION  # (fetches write loose objects at the same level)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Callable, Dict, Final, List, Mapping, Optional, Sequence, Tuple

    TreeEntry = Tuple[str, str, str, str]  # mode as git stores it ("40000" for a tree), type, oid, name

    ReadResult = Optional[Tuple[str, str, bytes]]  # (oid, type, content), as cat-file --batch gives it

    Runner = Callable[..., "object"]  # run_git bound to the clone: (*args, input=..., env=...) -> CompletedProcess


PLUMBING_ENV: Final = "FLEET_GIT_PLUMBING"  # "1": never the fast path (tests, odd filesystems)
KNOWN_FORMATS: Final = {"sha1": 40, "sha256": 64}  # object format -> hex length of an id
STORE_ATTEMPTS: Final = 5  # writes of one loose object while a prune removes folders under it
_LOOSE_CHUNK: Final = 64 * 1024  # compressed bytes read before the header is checked
_HEADER_MAX: Final = 64  # "<kind> <size>\0" fits: the longest kind is 6 letters, a size 20 digits
_READ_FLAGS: Final = os.O_RDONLY | getattr(os, "O_BINARY", 0)  # (Windows opens files as text without it)


class StoreFailed(OSError):
    """A loose object could not be stored (the caller turns it into its own error)."""


class TooLarge(ValueError):
    """An object declares more content than the reader takes (the caller turns it into its own
    error). Its content was not read: an object from another machine is bounded before use."""

    def __init__(self, oid: str, kind: str, size: int, limit: int) -> None:
        super().__init__(f"{kind} {oid[:12]} holds {size:,} bytes, more than the {limit:,} this suite reads")
        self.oid = oid
        self.kind = kind
        self.size = size


def hasher(hexlen: int):
    """SHA-1 or SHA-256 for object ids. CPython's built-in ``_sha1``/``_sha256`` start much faster
    than OpenSSL through ``hashlib``, which is only the fallback (a send is a short process)."""
    try:
        if hexlen == 40:
            from _sha1 import sha1  # type: ignore[import-not-found]

            return sha1()
        try:
            from _sha2 import sha256  # type: ignore[import-not-found]  # Python 3.12+
        except ImportError:
            from _sha256 import sha256  # type: ignore[import-not-found]

        return sha256()
    except ImportError:
        import hashlib

        return hashlib.sha1() if hexlen == 40 else hashlib.sha256()


def parse_tree(raw: bytes, hexlen: int) -> List[TreeEntry]:
    """Entries of a raw tree object (as ``cat-file --batch`` prints it)."""
    entries: List[TreeEntry] = []
    pos = 0
    rawlen = hexlen // 2
    while pos < len(raw):
        space = raw.index(b" ", pos)
        nul = raw.index(b"\0", space)
        mode = raw[pos:space].decode("ascii")
        name = raw[space + 1:nul].decode("utf-8", "surrogateescape")
        oid = raw[nul + 1:nul + 1 + rawlen].hex()
        kind = "tree" if mode == "40000" else ("commit" if mode == "160000" else "blob")
        entries.append((mode, kind, oid, name))
        pos = nul + 1 + rawlen
    return entries


def tree_bytes(entries: Sequence[TreeEntry]) -> bytes:
    """A tree object's content, entries in git's order (a tree sorts as if its name ended in /)."""
    def order(entry: TreeEntry) -> bytes:
        name = entry[3].encode("utf-8", "surrogateescape")
        return name + b"/" if entry[1] == "tree" else name

    return b"".join(mode.encode("ascii") + b" " + name.encode("utf-8", "surrogateescape") + b"\0"
                    + bytes.fromhex(oid) for mode, _kind, oid, name in sorted(entries, key=order))


def ident_part(text: str) -> str:
    """A name or email as git stores it in a commit: no angle brackets, no line breaks."""
    cleaned = "".join(" " if ch in "<>\n\r\0" else ch for ch in text).strip(" .,:;\"'")
    return cleaned or "unknown"


def date_stamp(now: Optional[float] = None) -> str:
    """``<unix seconds> <+hhmm>`` in the local time zone, as git writes a commit's date."""
    now = time.time() if now is None else now
    offset = int(time.localtime(now).tm_gmtoff or 0) // 60
    return f"{int(now)} {'-' if offset < 0 else '+'}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"


def commit_body(tree: str, parent: Optional[str], people: Mapping[str, Tuple[str, str]], stamp: str,
                message: str) -> bytes:
    """An unsigned commit object's content, as ``git commit-tree`` writes it."""
    lines = [f"tree {tree}"] + ([f"parent {parent}"] if parent else [])
    for role in ("author", "committer"):
        name, email = (ident_part(part) for part in people[role])
        lines.append(f"{role} {name} <{email}> {stamp}")
    body = "\n".join(lines) + "\n\n" + message.rstrip("\n") + "\n"
    return body.encode("utf-8", "surrogateescape")


def _store_loose(target: Path, body: bytes) -> None:
    target.parent.mkdir(exist_ok=True)
    tmp = str(target.parent / f"tmp_obj_{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
        os.chmod(tmp, 0o444)
        try:
            os.replace(tmp, target)
            tmp = ""
        except PermissionError:  # Windows: another writer stored the same object meanwhile
            if not target.exists():
                raise
    finally:
        if tmp:
            try:
                os.chmod(tmp, 0o644)  # Windows refuses to delete a read-only file
                os.unlink(tmp)
            except OSError:
                pass


class ObjectStore:
    """The objects folder of one clone: loose objects by hand, or git's plumbing (module doc).

    ``git(*args, input=None, env=None)`` runs git in the clone and raises on failure; the
    caller maps its errors (a missing object is the caller's ``ObjectMissing``).
    """

    def __init__(self, objects_dir: Path, object_format: str, git: Runner) -> None:
        self.objects_dir = objects_dir
        self._objects_path = os.fspath(objects_dir)  # (a status reads hundreds: no Path per object)
        self.object_format = object_format
        self.hexlen = KNOWN_FORMATS.get(object_format, 40)
        self.git = git
        self.fast = (object_format in KNOWN_FORMATS and os.environ.get(PLUMBING_ENV, "") != "1"
                     and os.access(str(objects_dir), os.W_OK))

    # ----------------------------------------------------------------- writing

    def write(self, kind: str, data: bytes) -> str:
        """Store an object (``blob``, ``tree``, ``commit``) and return its id. An object that
        exists already is left alone (and made fresh again, so no prune takes it meanwhile)."""
        if self.fast:
            try:
                return self._write_loose(kind, data)
            except PermissionError:
                self.fast = False  # a folder we cannot write after all: git can, or says why
        if kind == "tree":
            return self.write_tree(parse_tree(data, self.hexlen))
        return self._stdout(self.git("hash-object", "-w", "-t", kind, "--stdin", input=data))

    def write_tree(self, entries: Sequence[TreeEntry]) -> str:
        if self.fast:
            return self.write("tree", tree_bytes(entries))
        lines = b"".join(f"{mode.zfill(6)} {kind} {oid}\t".encode("ascii") + name.encode("utf-8", "surrogateescape")
                         + b"\0" for mode, kind, oid, name in entries)
        # git checks that each entry's object exists and has its type; a submodule's commit is
        # never here, so only a tree with one is written without that check.
        missing = ["--missing"] if any(kind == "commit" for _mode, kind, _oid, _name in entries) else []
        return self._stdout(self.git("mktree", "-z", *missing, input=lines))

    def write_commit(self, tree: str, parent: Optional[str], people: Mapping[str, Tuple[str, str]],
                     message: str, stamp: Optional[str] = None) -> str:
        """An unsigned commit; ``stamp`` ``None`` means git's own date (``GIT_*_DATE`` honoured)."""
        if self.fast and stamp is not None:
            return self.write("commit", commit_body(tree, parent, people, stamp, message))
        env = {"GIT_AUTHOR_NAME": ident_part(people["author"][0]), "GIT_AUTHOR_EMAIL": ident_part(people["author"][1]),
               "GIT_COMMITTER_NAME": ident_part(people["committer"][0]),
               "GIT_COMMITTER_EMAIL": ident_part(people["committer"][1])}
        if stamp is not None:
            env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = "@" + stamp
        args = ["-c", "commit.gpgsign=false", "commit-tree", tree] + (["-p", parent] if parent else [])
        message_bytes = (message.rstrip("\n") + "\n").encode("utf-8", "surrogateescape")
        return self._stdout(self.git(*args, input=message_bytes, env=env))

    @staticmethod
    def _stdout(proc: "object") -> str:
        return proc.stdout.decode("ascii").strip()  # type: ignore[attr-defined]

    def _write_loose(self, kind: str, data: bytes) -> str:
        header = f"{kind} {len(data)}".encode("ascii") + b"\0"
        digest = hasher(self.hexlen)
        digest.update(header)
        digest.update(data)
        oid = digest.hexdigest()
        target = self.objects_dir / oid[:2] / oid[2:]
        if target.exists():
            try:
                os.utime(target)
            except OSError:
                pass
            return oid
        packer = zlib.compressobj(LOOSE_COMPRESSION)
        body = packer.compress(header) + packer.compress(data) + packer.flush()
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                _store_loose(target, body)
                return oid
            except FileNotFoundError as exc:
                # A prune (git gc) removed the empty fan-out folder, or our temporary file (it
                # takes tmp_obj_* files as well), while we wrote: write again, as git does.
                if attempt == STORE_ATTEMPTS:
                    raise StoreFailed(f"could not store an object in this clone: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- reading

    def read_loose(self, oid: str, max_bytes: int) -> Optional[Tuple[str, bytes]]:
        """(type, content) of a loose object, or ``None`` when it is packed, absent, or only git
        may read it (the plumbing path). :class:`TooLarge` when its header declares more than
        ``max_bytes``: the header is read first, the content only when it is within the bound."""
        if not self.fast:
            return None
        try:  # (os.open and os.read: a file object per object cost a third of a state's reading)
            fd = os.open(os.path.join(self._objects_path, oid[:2], oid[2:]), _READ_FLAGS)
            try:
                chunk = os.read(fd, _LOOSE_CHUNK)
                inflate = zlib.decompressobj()
                start = inflate.decompress(chunk, _HEADER_MAX)
                nul = start.find(b"\0")
                kind, _, size = start[:nul].partition(b" ")
                if nul < 0 or not size.isdigit():
                    return None
                if int(size) > max_bytes:
                    raise TooLarge(oid, kind.decode("ascii", "replace"), int(size), max_bytes)
                rest = [inflate.unconsumed_tail]
                while chunk:  # to the end of the file (a short read of a file is its end)
                    chunk = os.read(fd, _LOOSE_CHUNK) if len(chunk) == _LOOSE_CHUNK else b""
                    rest.append(chunk)
                head = start[nul + 1:]
                if len(head) > int(size):
                    return None  # git reads it, and says what is wrong with it
                # No more than the header declares (and one byte to tell a longer stream; 0 would
                # mean no bound): a stream that inflates past it is not inflated whole.
                body = head + inflate.decompress(b"".join(rest), int(size) - len(head) + 1)
            finally:
                os.close(fd)
        except (OSError, zlib.error):
            return None
        if int(size) != len(body) or not inflate.eof or inflate.unused_data:
            return None  # git reads it, and says what is wrong with it
        return kind.decode("ascii", "replace"), body

    def walk_loose(self, commit: str, path: str, max_bytes: int) -> Optional[List[ReadResult]]:
        """The trees along ``path`` and its blob, as ``cat-file --batch`` gives them, read from
        loose objects alone; ``None`` as soon as one is packed (then git reads them).
        :class:`TooLarge` for an object over ``max_bytes``.

        The objects at the tip are loose after our own writes and after a small fetch, so a
        send usually needs no process to read the mailbox."""
        found = self.read_loose(commit, max_bytes)
        if found is None or found[0] != "commit" or not found[1].startswith(b"tree "):
            return None
        oid = found[1][5:5 + self.hexlen].decode("ascii")
        out: List[ReadResult] = []
        parts = path.split("/")
        for depth, name in enumerate(parts):
            tree = self.read_loose(oid, max_bytes)
            if tree is None or tree[0] != "tree":
                return None
            out.append((oid, "tree", tree[1]))
            try:
                entries = parse_tree(tree[1], self.hexlen)
            except (ValueError, UnicodeDecodeError):
                return None  # git reads it and says what is wrong with it
            keys = [e[3].encode("utf-8", "surrogateescape") + (b"/" if e[1] == "tree" else b"") for e in entries]
            if any(a >= b for a, b in zip(keys, keys[1:])):
                return None  # out of git's order: git's lookup may stop early, so git looks
            entry = next((e for e in entries if e[3] == name), None)
            if entry is None:  # absent: the rest of the path does not exist either
                out.extend([None] * (len(parts) - depth))
                return out
            oid = entry[2]
        blob = self.read_loose(oid, max_bytes)
        if blob is None:
            return None
        out.append((oid, blob[0], blob[1]))
        return out


def edit_tree(store: ObjectStore, trees: Mapping[str, List[TreeEntry]], prefix: str,
              blobs: Mapping[str, Optional[str]]) -> Optional[str]:
    """Write the tree at ``prefix`` of ``trees`` (folder -> entries) with ``blobs`` (path -> blob
    id, ``None`` to delete) applied; ``None`` when it ends up empty."""
    entries: Dict[str, TreeEntry] = {e[3]: e for e in trees.get(prefix.rstrip("/"), [])}
    children: Dict[str, Dict[str, Optional[str]]] = {}
    for path, oid in blobs.items():
        rel = path[len(prefix):]
        head, sep, _rest = rel.partition("/")
        if sep:
            children.setdefault(head, {})[path] = oid
        elif oid is None:
            entries.pop(head, None)
        else:
            kept = entries.get(head)
            mode = kept[0] if kept is not None and kept[1] == "blob" else "100644"
            entries[head] = (mode, "blob", oid, head)
    for name, sub in children.items():
        existing = entries.get(name)
        if existing is not None and existing[1] != "tree":
            entries.pop(name)  # a file where a folder must go: the folder replaces it
        sub_oid = edit_tree(store, trees, f"{prefix}{name}/", sub)
        if sub_oid is None:
            entries.pop(name, None)
        else:
            entries[name] = ("40000", "tree", sub_oid, name)
    if not entries:
        return None
    return store.write_tree(list(entries.values()))
