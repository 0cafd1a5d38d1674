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
- with no record there is nothing to undo, and nothing is touched.
Only `apply` and `remove_leftovers` write or delete in that repository.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

RECORD = ".hh-sft-handoff.json"
TEMPORARY = ".hh-sft-tmp"  # suffix of our temporary files: `.NAME.hh-sft-tmp` beside NAME


class RecordError(Exception):
    """A path we may not touch or a record we cannot read: one line, nothing changed."""


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


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
    def from_json(cls, data: dict) -> Entry:
        original = data["original_base64"]
        return cls(data["before_sha256"], None if original is None else base64.b64decode(original),
                   list(data["written_sha256"]))


@dataclass
class Record:
    """What we changed in the repository; `pending` while a change is under way (a kill leaves it so)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    pending: bool = False

    @property
    def empty(self) -> bool:
        return not self.entries


def read_record(repo: Path) -> Record:
    """The repository's record; an empty one when there is none."""
    path = repo / RECORD
    if path.is_symlink():
        raise RecordError(f"{path} is a symbolic link: not a record this tool wrote; nothing was changed")
    if not path.exists():
        return Record()
    try:
        data = json.loads(path.read_bytes())
        return Record({name: Entry.from_json(entry) for name, entry in data["files"].items()},
                      data["state"] == "pending")
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{path} cannot be read ({type(e).__name__}: {e}); it says what the handoff changed: "
                          "restore it (e.g. from git) or undo the changes by hand; nothing was changed") from None


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


def apply(repo: Path, targets: dict[str, bytes | None], *, discard_changes: bool = False) -> Outcome:
    """Make each file named in `targets` hold its bytes (None: as it was before us), as one recorded transaction.

    Refuses (RecordError, nothing written) when a path is unsafe to write, or holds bytes that are neither its
    original nor ours (someone changed it since we wrote it), unless `discard_changes`."""
    record = read_record(repo)
    current = {name: _checked(repo, name) for name in targets}
    foreign = sorted(name for name, data in current.items()
                     if name in record.entries and not _ours_or_original(record.entries[name], data))
    if foreign and not discard_changes:
        raise RecordError(f"changed since the handoff wrote them: {', '.join(foreign)} (in {repo}); nothing was "
                          "changed: keep your edits elsewhere, then rerun with --discard-changes")
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
    """Remove the temporary files a kill left beside the record and beside `names` (ours by their name)."""
    removed = []
    for name in [*names, RECORD]:
        leftover = _temporary(repo / name)
        if leftover.is_file() and not leftover.is_symlink():
            os.unlink(leftover)
            removed.append(leftover.name)
    return removed


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
    """Write `data` to a temporary file beside `path` (mode of `like` when given), then rename it over `path`."""
    temporary = _temporary(path)
    with open(temporary, "wb") as f:
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
    data = {"tool": "hh-sft dpo_handoff.py", "state": "pending" if record.pending else "installed",
            "files": {name: entry.to_json() for name, entry in sorted(record.entries.items())}}
    _write_atomic(repo / RECORD, (json.dumps(data, indent=1) + "\n").encode())
