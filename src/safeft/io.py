"""The one atomic writer: every file and directory safeft writes appears whole or not at all.

A write goes to a temporary sibling and is renamed over the target, so a reader (or a resumed run) sees the
old content or the new, never half of either, whatever kills the process in between. Temp files and dirs
from ``tempfile`` are private (0600 / 0700); the result gets the mode the umask gives an ordinary file or
directory, so colleagues on a shared machine can read a run as they could any other file.

A write that fails raises ``WriteError`` (an ``OSError``) naming the path and the reason, so a full disk
reads "cannot write runs/x/metrics.jsonl: No space left on device" instead of a bare errno.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safeft.data.types import DataError


class WriteError(OSError):
    """A failed write: ``str()`` names the path and the reason (``errno`` is the original one)."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a ``WriteError`` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise WriteError(e.errno, f"cannot write {path}: {reason}", str(path)) from e


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path, default: int) -> int:
    # keep the mode a file already had (a user may have chmod-ed it); else what the umask gives
    return path.stat().st_mode & 0o777 if path.exists() else default & ~umask()


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _mode(path, 0o666))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _umask_modes(root: Path) -> None:
    """Give ``root`` and everything in it the umask's modes. Writers we call into (safetensors, a
    tokenizer's save) create some files 0600; a checkpoint is data for colleagues to read, not a secret."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it becomes ``target`` (an old one is replaced
    when ``replace``, else an existing target is an error). On failure nothing is left behind."""
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-tmp-"))
    try:
        with writing(target):  # an OSError while filling it (a full disk) names the target
            yield tmp
            _umask_modes(tmp)
            if target.exists():
                # the swap is two renames: move the old one aside first so no moment exists with neither
                old = target.parent / f".{target.name}-old-{os.getpid()}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class AppendLog:
    """An append-only log (``metrics.jsonl``, ``evals.jsonl``): each ``write`` is flushed at once.

    Appending cannot be atomic the way a rename is: a full disk can leave a torn last line. Readers
    (``safeft.runs.read_log``) drop such a line with a warning, and a resumed run rewrites the log whole
    before it appends again, so a torn line never ends up in the middle of a log.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")

    def write(self, text: str) -> None:
        with writing(self.path):
            self._f.write(text)
            self._f.flush()

    def flush(self) -> None:
        with writing(self.path):
            self._f.flush()

    def close(self) -> None:
        with writing(self.path):
            self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self.close()
        except OSError:
            if exc_type is None:  # else the error already on its way out is the one to report
                raise


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to an append-only log."""
    with AppendLog(path) as log:
        log.write(json.dumps(record) + "\n")


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON Lines file; a line that is not a JSON object
    raises DataError naming the file and line. The one reader of our strict JSON Lines files."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
