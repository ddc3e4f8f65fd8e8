"""Print tuning tables.

    python -m tuning.show            every table found, one line each
    python -m tuning.show rtx5070    one table (a short GPU name or a path): its device, runs and entries
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from tabulate import tabulate

from looplm.cli import CLIError, run_cli
from tuning import table
from tuning.buckets import format_shape


def list_tables() -> str:
    rows = []
    for path in table.table_paths():
        try:
            t = table.load(path)
        except table.TableError as e:
            rows.append((path, "-", "-", "-", f"unusable: {e}"))
            continue
        major, minor = t["device"]["capability"]
        rows.append((path, t["device"]["name"], f"{major}.{minor}", len(t["entries"]), t.get("updated", "-")))
    if not rows:
        return (f"no tuning tables in {', '.join(map(str, table.table_dirs()))}; "
                "python -m tuning.autotune --gpu NAME makes one")
    return tabulate(rows, headers=("table", "device", "capability", "entries", "updated"))


def describe_table(t: dict) -> str:
    major, minor = t["device"]["capability"]
    head = f"{t.get('gpu', '?')}: {t['device']['name']} (compute capability {major}.{minor}), updated {t.get('updated')}"
    runs = tabulate([(r.get("run"), r.get("date"), r.get("driver"),
                      ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items() if v),
                      "yes" if r.get("forced") else "") for r in t["runs"]],
                    headers=("run", "date", "driver", "versions", "forced"))
    rows = []
    for e in t["entries"]:
        best, default_ms = e.get("best"), e.get("default_ms")
        rows.append((e["backend"], e["kernel"], e["dtype"], format_shape(e["bucket"]),
                     best["config"] if best else "-", f"{best['median_ms']:.4f}" if best else "-",
                     f"{default_ms:.4f}" if default_ms else "-",
                     f"{default_ms / best['median_ms']:.2f}x" if best and default_ms else "-",
                     len(e.get("runners_up", [])), len(e.get("failed", [])), len(e.get("pruned", [])), e.get("run")))
    entries = tabulate(rows, headers=("backend", "kernel", "dtype", "bucket", "best config", "ms", "default ms",
                                      "speed-up", "runners-up", "failed", "pruned", "run"))
    return f"{head}\n\n{runs}\n\n{entries}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input raises (CLIError, TableError); `run_cli` turns it into one line and exit 2."""
    p = argparse.ArgumentParser(prog="python -m tuning.show", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="short GPU name or path of a table")
    args = p.parse_args(argv)
    if args.name is None:
        print(list_tables())
        return 0
    path = table.find(args.name)
    if path is None:
        raise CLIError(f"no tuning table {args.name!r} in {', '.join(map(str, table.table_dirs()))} (give a short "
                       "GPU name or the path of a table)")
    print(f"{path}\n{describe_table(table.load(path))}")  # a corrupt table raises TableError: one line, exit 2
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m tuning.show")
