"""Tuning tables: one JSON file per GPU, their schema, and safe reading, writing and merging.

    {
      "schema": 1,
      "gpu": "rtx5070",                                 the short name (tuning.gpus)
      "device": {"name": "NVIDIA GeForce RTX 5070", "capability": [12, 0]},
      "updated": "2025-01-31T12:00:00+00:00",
      "provenance": {"source": ..., "date": ..., "gpu": ..., "toolchain": {...},   optional: where a table
                     "partial": ..., "command": ...},                             not written here came from
      "runs": [{"run": 1, "date": ..., "driver": ..., "versions": {"torch": ..., "triton": ...,
                "cuda-tile": ..., ...}, "forced": false}],
      "entries": [{
        "backend": "triton", "kernel": "layer_norm", "dtype": "bfloat16",
        "bucket": [4096, 512], "shape": [4096, 384],    the launch measured for the bucket
        "run": 1,
        "best": {"config": {...}, "median_ms": 0.012},  null if every candidate failed
        "default_ms": 0.015,                            the built-in default's time
        "runners_up": [{"config": {...}, "median_ms": ...}, ...],   fastest first
        "failed": [{"config": {...}, "reason": "..."}],   raised, hung, crashed or gave a wrong output
        "pruned": [{"config": {...}, "reason": "..."}]}]  cannot fit the GPU: never run
    }

A table belongs to the one device it was measured on. Writers lock the table's directory, merge
their entries into what is there (an entry is replaced only by a new measurement of its own key) and
replace the file atomically, so concurrent runs and crashes never leave a torn table.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from looplm.fileio import atomic_write_text

SCHEMA_VERSION = 1
PACKAGE_TABLES = Path(__file__).with_name("tables")
USER_DIR_ENV = "LOOPLM_TUNING_DIR"  # searched before the shipped tables; os.pathsep separates several

EntryKey = tuple[str, str, str, tuple[int, ...]]  # (backend, kernel, dtype, bucket)


class TableError(ValueError):
    """A table that cannot be used: unreadable, malformed, or of a newer schema."""


def table_dirs() -> list[Path]:
    """Where tables are looked for, first match first: $LOOPLM_TUNING_DIR, then the shipped ones."""
    user = [Path(p) for p in os.environ.get(USER_DIR_ENV, "").split(os.pathsep) if p]
    return user + [PACKAGE_TABLES]


def table_paths() -> list[Path]:
    return [p for d in table_dirs() if d.is_dir() for p in sorted(d.glob("*.json"))]


def default_path(gpu_name: str) -> Path:
    """Where a new table for `gpu_name` goes: the user directory when one is set, else the package's."""
    dirs = table_dirs()
    return dirs[0] / f"{gpu_name}.json"


def entry_key(entry: Mapping[str, Any]) -> EntryKey:
    return entry["backend"], entry["kernel"], entry["dtype"], tuple(entry["bucket"])


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- reading

def _require(cond: bool, path: Any, what: str) -> None:
    if not cond:
        raise TableError(f"tuning table {path}: {what}")


def validate(table: Any, path: Any = "<table>") -> dict:
    """`table` if it is a well-formed table of a schema this code reads; TableError otherwise."""
    _require(isinstance(table, dict), path, "not a JSON object")
    schema = table.get("schema")
    _require(isinstance(schema, int) and not isinstance(schema, bool) and schema >= 1, path,
             f"'schema' must be an integer >= 1, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise TableError(f"tuning table {path} has schema {schema}, newer than the {SCHEMA_VERSION} this version "
                         "of looplm reads; upgrade looplm or re-run python -m tuning.autotune")
    device = table.get("device")
    _require(isinstance(device, dict) and isinstance(device.get("name"), str), path, "'device.name' is missing")
    capability = device.get("capability")
    _require(isinstance(capability, list) and len(capability) == 2 and all(isinstance(c, int) for c in capability),
             path, f"'device.capability' must be [major, minor], got {capability!r}")
    _require(isinstance(table.get("runs"), list), path, "'runs' must be a list")
    entries = table.get("entries")
    _require(isinstance(entries, list), path, "'entries' must be a list")
    for i, e in enumerate(entries):
        _require(isinstance(e, dict), path, f"entry {i} is not an object")
        for field, kind in (("backend", str), ("kernel", str), ("dtype", str), ("bucket", list)):
            _require(isinstance(e.get(field), kind), path, f"entry {i}: {field!r} must be a {kind.__name__}")
        _require(all(isinstance(d, int) for d in e["bucket"]), path, f"entry {i}: 'bucket' must hold integers")
        best = e.get("best")
        _require(best is None or (isinstance(best, dict) and isinstance(best.get("config"), dict)
                                  and isinstance(best.get("median_ms"), (int, float))), path,
                 f"entry {i}: 'best' must be null or {{config, median_ms}}")
    return table


def load(path: os.PathLike) -> dict:
    """A validated table from `path`; TableError if it is unreadable, malformed or too new."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TableError(f"tuning table {path}: cannot read: {e}") from None
    try:
        table = json.loads(text)
    except ValueError as e:
        raise TableError(f"tuning table {path}: not valid JSON ({e})") from None
    return validate(table, path)


# ---- writing

def dumps(value: Any, indent: int = 2, level: int = 0, width: int = 110) -> str:
    """JSON for people: a value goes on one line when it fits `width`, so that each config, shape
    and measurement reads as one line; larger objects and lists open up one item per line."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    line = json.dumps(value, separators=(", ", ": "))
    if len(pad) + len(line) <= width or not isinstance(value, (dict, list)) or not value:
        return line
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent, level + 1, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{dumps(v, indent, level + 1, width)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


@contextlib.contextmanager
def locked(path: os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock (blocking) on the directory of `path` for a read-merge-write cycle; a
    lock on the directory leaves no lock file behind among the tables."""
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def new_table(gpu_name: str, device_name: str, capability: Sequence[int]) -> dict:
    return {"schema": SCHEMA_VERSION, "gpu": gpu_name, "device": {"name": device_name,
            "capability": list(capability)}, "updated": now(), "runs": [], "entries": []}


def merge(table: dict, run: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict:
    """`table` with `entries` (measured in `run`) added or replacing those of the same key; every
    other entry is kept. Runs no entry refers to any more are dropped."""
    run_id = max((r["run"] for r in table["runs"]), default=0) + 1
    fresh = {entry_key(e): {**e, "run": run_id} for e in entries}
    kept = [e for e in table["entries"] if entry_key(e) not in fresh]
    merged = sorted(kept + list(fresh.values()), key=entry_key)
    used = {e.get("run") for e in merged}
    runs = [r for r in table["runs"] if r["run"] in used] + ([{"run": run_id, **run}] if fresh else [])
    return {**table, "updated": now(), "runs": runs, "entries": merged}


def record(path: os.PathLike, gpu_name: str, device_name: str, capability: Sequence[int], run: Mapping[str, Any],
           entries: Sequence[Mapping[str, Any]]) -> dict:
    """Merge `entries` into the table at `path` (created if absent) under its lock; returns the table.

    Refuses, rather than overwrite, a table that is corrupt, of a newer schema, or of another device.
    """
    with locked(path):
        if Path(path).exists():
            table = load(path)
            if table["device"]["name"] != device_name:
                raise TableError(f"tuning table {path} holds measurements of {table['device']['name']!r}, not of "
                                 f"this {device_name!r}; write to another --out")
        else:
            table = new_table(gpu_name, device_name, capability)
        table = merge(table, run, entries)
        atomic_write_text(path, dumps(table) + "\n")
    return table


def find(name_or_path: str) -> Optional[Path]:
    """A table by path, or by short GPU name in the table directories (first found)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path if path.exists() else None
    return next((d / f"{name_or_path}.json" for d in table_dirs() if (d / f"{name_or_path}.json").exists()), None)
