"""File helpers shared by every stage: atomic writes and JSONL reading with precise error locations."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Malformed input, located by file, line and field, with what to do about it."""

    def __init__(self, path: str | os.PathLike, line: int | None, field_name: str | None, problem: str):
        self.path, self.line, self.field_name, self.problem = str(path), line, field_name, problem
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")

    def __reduce__(self):
        # Rebuild from the parts, so the error survives pickling from a Ray task to the driver intact.
        return (type(self), (self.path, self.line, self.field_name, self.problem))


@dataclass
class RowErrors:
    """What `on_error='skip'` skipped; reported in summaries so nothing is silently lost."""

    policy: str = "fail"  # fail | skip
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.policy!r}")

    def handle(self, err: DataError) -> None:
        if self.policy == "fail":
            raise err
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))


def _tmp_prefix(final: Path) -> str:
    """Temp names carry host and pid, `.<name>.<host>.<pid>.<random>.tmp`, so a later writer can tell the leftover
    of a process that was killed mid-write (SIGKILL skips every cleanup) from a write still in flight."""
    return f".{final.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_orphans(final: Path) -> None:
    """Delete temp files/dirs of `final` left by dead processes of this host (a killed job's rerun would
    otherwise leave them behind for good: a killed RM update left its encoded pairs, 232 KB at tiny scale)."""
    mine = re.compile(rf"\.{re.escape(final.name)}\.{re.escape(socket.gethostname())}\.(\d+)\.[^.]+\.tmp")
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        owner = mine.fullmatch(stale.name)
        if owner is None or _alive(int(owner.group(1))):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write via a temp file in the same directory plus rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final), suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, row) for each non-empty line; a bad line raises DataError naming file and line."""
    import fsspec

    with fsspec.open(str(path), "rt") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # the newline would move the error to "column 1" of a next line
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, lineno, None, f"must be a JSON object, got {type(row).__name__}")
            yield lineno, row
