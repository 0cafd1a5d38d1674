"""Changes to a repository we do not own, as one recorded transaction (the way package installers keep a record).

The record, `.hh-sft-handoff.json` at that repository's root, names every file a change touched: whether it was
added or changed, the sha256 of its bytes before us and of every version we wrote there, and the original bytes of
what was changed. With it:
- nothing is written before every path is checked (absent or a regular file, not a symbolic link, writable, and
  holding either its original bytes or bytes we wrote); a refusal is one line and changes nothing;
- the record is written before the first write (state "pending") and after the last one; each write is atomic (a
  temporary file beside the target, then rename), so a kill leaves every file as it was or as we meant it, and the
  next call, install or undo, starts from the record and finishes the job;
- undo removes exactly what was added and restores exactly what was changed, only where the file still holds bytes
  we wrote; a file changed since is named and nothing is undone unless the caller discards those changes;
- with no record there is nothing to undo, and nothing is touched;
- the record lives in a repository someone else may have written, so it is read as untrusted input: checked whole
  (version, shape, every path one of the files this change knows, "added" only for files it adds, every stored
  original matching its sha256) before anything is read from it;
- one change at a time: `locked` holds an exclusive lock on the repository for the whole change, and temporary
  files are created exclusively (never written through an existing path or link).
Only `apply` and `remove_leftovers` write or delete in that repository.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RECORD = ".hh-sft-handoff.json"
TOOL = "hh-sft dpo_handoff.py"
VERSION = 1  # records written before the version field existed have this shape too
TEMPORARY = ".hh-sft-tmp"  # suffix of our temporary files: `.NAME.hh-sft-tmp` beside NAME
SHA256 = re.compile(r"^[0-9a-f]{64}$")
GET_OUT = (f"to get out: restore the repo's files (git checkout -- <file>) and delete {RECORD}; nothing was "
           "changed")


class RecordError(Exception):
    """A path we may not touch or a record we cannot read: one line, nothing changed."""


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Scope:
    """The files a change may touch (plain names at the repository's root): `addable` ones it may add where they
    are absent; any of `known` it may change. A record naming anything else is refused."""

    known: frozenset[str]
    addable: frozenset[str]


@dataclass
class Entry:
    """One touched file: its sha256 before us (None: it did not exist, so we added it), its original bytes when it
    existed, and the sha256 of every version we wrote there (the last is what the latest change meant it to be)."""

    before: str | None
    original: bytes | None
    written: list[str] = field(default_factory=list)

    @property
    def added(self) -> bool:
        return self.before is None

    def to_json(self) -> dict:
        original = None if self.original is None else base64.b64encode(self.original).decode()
        return {"action": "added" if self.added else "changed", "before_sha256": self.before,
                "written_sha256": self.written, "original_base64": original}

    @classmethod
    def from_json(cls, name: str, data, scope: Scope) -> Entry:
        """An entry of the record, checked: refused (ValueError saying why) unless it is one this tool writes."""
        if not isinstance(data, dict) or set(data) != {"action", "before_sha256", "written_sha256",
                                                       "original_base64"}:
            raise ValueError(f"entry {name!r} is not an object with action, before_sha256, written_sha256, "
                             "original_base64")
        action, before, written, original = (data[k] for k in ("action", "before_sha256", "written_sha256",
                                                               "original_base64"))
        if action not in ("added", "changed"):
            raise ValueError(f"entry {name!r}: action {action!r} is neither 'added' nor 'changed'")
        if action == "added" and name not in scope.addable:
            raise ValueError(f"entry {name!r} is marked 'added' but the handoff never adds that file (it exists "
                             "in the repository before any install)")
        if not isinstance(written, list) or not all(isinstance(h, str) and SHA256.match(h) for h in written):
            raise ValueError(f"entry {name!r}: written_sha256 is not a list of sha256 hex digests")
        if action == "added":
            if before is not None or original is not None:
                raise ValueError(f"entry {name!r} is 'added' but carries original bytes")
            return cls(None, None, list(written))
        if not isinstance(before, str) or not SHA256.match(before) or not isinstance(original, str):
            raise ValueError(f"entry {name!r} is 'changed' but lacks its before_sha256 or original_base64")
        try:
            data_before = base64.b64decode(original, validate=True)
        except binascii.Error:
            raise ValueError(f"entry {name!r}: original_base64 is not base64") from None
        if digest(data_before) != before:
            raise ValueError(f"entry {name!r}: the stored original does not match its before_sha256 (it is not "
                             "the file as it was)")
        return cls(before, data_before, list(written))


@dataclass
class Record:
    """What we changed in the repository; `pending` while a change is under way (a kill leaves it so)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    pending: bool = False

    @property
    def empty(self) -> bool:
        return not self.entries


def read_record(repo: Path, scope: Scope) -> Record:
    """The repository's record, checked whole before anything is taken from it; an empty one when there is none."""
    path = repo / RECORD
    if path.is_symlink():
        raise RecordError(f"{path} is a symbolic link: not a record this tool wrote; {GET_OUT}")
    if not path.exists():
        return Record()
    if not path.is_file():
        raise RecordError(f"{path} is not a file: not a record this tool wrote; {GET_OUT}")
    try:
        return _parse(json.loads(path.read_bytes()), scope)
    except (ValueError, RecursionError) as e:
        raise RecordError(f"{path} is not a record this tool wrote ({str(e).splitlines()[0]}); {GET_OUT}") from None
    except OSError as e:
        raise RecordError(f"{path} cannot be read ({e.strerror}); nothing was changed") from None


def _parse(data, scope: Scope) -> Record:
    """The record from its JSON, refused (ValueError saying why) unless its version, shape and every path are ones
    this tool writes for `scope`."""
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        raise ValueError(f"no \"tool\": \"{TOOL}\"")
    if data.get("version", VERSION) != VERSION:
        raise ValueError(f"version {data['version']!r}; this tool reads version {VERSION}")
    if data.get("state") not in ("pending", "installed"):
        raise ValueError(f"state {data.get('state')!r} is neither 'pending' nor 'installed'")
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError("'files' is not an object of file name -> entry")
    for name in files:
        if name not in scope.known:
            where = ("a path outside the repository" if os.path.isabs(name) or ".." in Path(name).parts else
                     "not one of the files the handoff touches")
            raise ValueError(f"entry {name!r}: {where}")
    return Record({name: Entry.from_json(name, entry, scope) for name, entry in files.items()},
                  data["state"] == "pending")


@contextlib.contextmanager
def locked(repo: Path) -> Iterator[None]:
    """Hold an exclusive lock on the repository (a flock on its folder: no file is added there, and the kernel drops
    it when the process dies) for one change; a second change waits for it, saying so."""
    try:
        handle = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise RecordError(f"{repo} cannot be opened ({e.strerror}); nothing was changed") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: another dpo_handoff.py install or uninstall is changing {repo}", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def original_bytes(repo: Path, name: str, record: Record) -> bytes | None:
    """The file as it was before us: from the record when we touched it, else as it is now."""
    entry = record.entries.get(name)
    return entry.original if entry else _read(repo, name)


@dataclass(frozen=True)
class Outcome:
    """What `apply` did, per file: "added", "changed", "updated", "removed", "restored" or "unchanged"."""

    actions: dict[str, str]
    resumed: bool  # the record was pending: a killed change was finished or undone

    @property
    def changed(self) -> bool:
        return any(action != "unchanged" for action in self.actions.values())


def apply(repo: Path, targets: dict[str, bytes | None], scope: Scope, *, discard_changes: bool = False) -> Outcome:
    """Make each file named in `targets` hold its bytes (None: as it was before us), as one recorded transaction.
    Call it under `locked(repo)`.

    Refuses (RecordError, nothing written) when a path is unsafe to write, or holds bytes that are neither its
    original nor ours (someone changed or deleted it since we wrote it), unless `discard_changes` (a deleted file
    we changed is then put back as it was before us)."""
    assert set(targets) <= scope.known, sorted(set(targets) - scope.known)
    record = read_record(repo, scope)
    current = {name: _checked(repo, name) for name in targets}
    for name in [*targets, RECORD]:
        _check_temporary(repo / name)
    foreign = {name: data for name, data in current.items()
               if name in record.entries and not _ours_or_original(record.entries[name], data)}
    if foreign and not discard_changes:
        deleted = sorted(name for name, data in foreign.items() if data is None)
        edited = sorted(name for name, data in foreign.items() if data is not None)
        said = "; ".join([*([f"changed since the handoff wrote them: {', '.join(edited)}"] if edited else []),
                          *([f"deleted since the handoff wrote them: {', '.join(deleted)}"] if deleted else [])])
        raise RecordError(f"{said} (in {repo}); nothing was changed: keep your edits elsewhere, then rerun with "
                          "--discard-changes (a deleted file is put back as it was before the handoff)")
    remove_leftovers(repo, targets)
    entries = {name: record.entries.get(name) or Entry(digest(data), data) for name, data in current.items()}
    final = {name: entries[name].original if data is None else data for name, data in targets.items()}
    writes = {name: data for name, data in final.items() if data != current[name]}
    for name, data in final.items():  # every version we are about to write is ours, even if a kill cuts in
        if data != entries[name].original and digest(data) not in entries[name].written:
            entries[name].written.append(digest(data))
    untouched = {name: entry for name, entry in record.entries.items() if name not in targets}
    kept = untouched | {name: entries[name] for name, data in final.items() if data != entries[name].original}
    if not writes and not record.pending:
        if not kept and not record.empty:  # every file already as it was before us (put back by hand): the record
            os.unlink(repo / RECORD)       # alone is left, and it is no longer true
        return Outcome(dict.fromkeys(targets, "unchanged"), resumed=False)

    _write_record(repo, Record(untouched | entries, pending=True))
    for name, data in writes.items():
        if data is None:
            os.unlink(repo / name)
        else:
            _write_atomic(repo / name, data, like=repo / name if current[name] is not None else None)
    if kept:
        _write_record(repo, Record(kept))
    else:
        os.unlink(repo / RECORD)
    return Outcome({name: _action(record.entries.get(name), current[name], final[name]) for name in targets},
                   resumed=record.pending)


def remove_leftovers(repo: Path, names=()) -> list[str]:
    """Remove the temporary files a kill left beside the record and beside `names` (ours by their name; a link or
    a folder at that name is not ours and stays)."""
    removed = []
    for name in [*names, RECORD]:
        leftover = _temporary(repo / name)
        if leftover.is_file() and not leftover.is_symlink():
            os.unlink(leftover)
            removed.append(leftover.name)
    return removed


def _check_temporary(path: Path) -> None:
    """Refuse when something other than a leftover of ours (a regular file) sits where our temporary file goes."""
    temporary = _temporary(path)
    if temporary.is_symlink() or (temporary.exists() and not temporary.is_file()):
        kind = "a symbolic link" if temporary.is_symlink() else "not a regular file"
        raise RecordError(f"{temporary} is {kind}: the handoff writes its temporary files there and never through "
                          "a link; remove it, then rerun; nothing was changed")


def _action(entry: Entry | None, now: bytes | None, final: bytes | None) -> str:
    if now == final:
        return "unchanged"
    if entry is None:
        return "added" if now is None else "changed"
    if final is None:
        return "removed"
    return "restored" if final == entry.original else "updated"


def _ours_or_original(entry: Entry, data: bytes | None) -> bool:
    return data == entry.original or digest(data) in entry.written


def _read(repo: Path, name: str) -> bytes | None:
    path = repo / name
    return path.read_bytes() if path.is_file() else None


def _checked(repo: Path, name: str) -> bytes | None:
    """The bytes at `name` (None when absent), after checking that we may replace or remove that path."""
    path = repo / name
    if path.is_symlink():
        raise RecordError(f"{path} is a symbolic link (to {os.readlink(path)}): the handoff writes only regular "
                          "files inside the repository; replace the link with the file, then rerun; nothing was "
                          "changed")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise RecordError(f"{path.parent} is not writable: nothing was changed")
    if not path.exists():
        return None
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise RecordError(f"{path} is not a regular file: nothing was changed")
    if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise RecordError(f"{path} is read-only: make it writable (chmod u+w) to let the handoff change it; "
                          "nothing was changed")
    return path.read_bytes()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY}")


def _write_atomic(path: Path, data: bytes, like: Path | None = None) -> None:
    """Write `data` to a temporary file beside `path` (created exclusively, never through a link; the mode of
    `like` when given, else the umask's), flushed to disk, then renamed over `path`."""
    temporary = _temporary(path)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with open(handle, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if like is not None:
        os.chmod(temporary, stat.S_IMODE(like.stat().st_mode))
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_record(repo: Path, record: Record) -> None:
    data = {"tool": TOOL, "version": VERSION, "state": "pending" if record.pending else "installed",
            "files": {name: entry.to_json() for name, entry in sorted(record.entries.items())}}
    _write_atomic(repo / RECORD, (json.dumps(data, indent=1) + "\n").encode())
