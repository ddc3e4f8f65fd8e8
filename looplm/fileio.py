"""Atomic file writes: a reader sees the old file or the new one, never a part of either.

A write goes to a temporary file beside its target (`.NAME.XXXXXXXX.tmp`), which is flushed to
disk (fsync) and renamed onto the target; then the folder is flushed, so that the rename itself
survives a power cut. A process killed in the middle leaves the temporary file: `remove_stale_temps`
clears them, for a path that has one writer (a run's own files), before the next write.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


def temp_prefix(path: PathLike) -> str:
    """How the temporary files of writes to `path` begin (the rest is random, then TEMP_SUFFIX)."""
    return f".{Path(path).name}."


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (the names renamed into it) to disk. A no-op where folders cannot be
    opened (Windows), where renames are durable by other means."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to. When the block succeeds it is flushed to disk and
    renamed onto `path`, and the folder is flushed; when it fails it is removed and `path` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def stale_temps(path: PathLike) -> list[Path]:
    """The temporary files that interrupted atomic writes to `path` left beside it."""
    path = Path(path)
    pattern = glob.escape(str(path.parent / temp_prefix(path))) + "*" + TEMP_SUFFIX
    return sorted(Path(p) for p in glob.glob(pattern))


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Remove what interrupted writes to `path` left beside it; returns what was removed. Only for a
    path with one writer: another process's write in progress would lose its temporary file."""
    return remove_paths(stale_temps(path))


def remove_paths(paths: list[Path]) -> list[Path]:
    """Remove each of `paths`, file or folder (one already gone is fine); returns `paths`."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return paths
