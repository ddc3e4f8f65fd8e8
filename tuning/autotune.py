"""Time every kernel's candidate configs on this GPU and record the best in its tuning table.

    python -m tuning.autotune --gpu rtx5070                      every kernel, the shipped model shapes
    python -m tuning.autotune --gpu h100 --backend triton --kernels layer_norm --shapes 4096x384
    python -m tuning.autotune --gpu b200 --dry-run               the plan, pruned by AOT compile; no GPU needed

NAME is a short GPU name (tuning.gpus); the GPU in this machine must be one (or pass --force, which
records the device really measured). The table (default tuning/tables/NAME.json, or under
$LOOPLM_TUNING_DIR when set) keeps the entries this run does not retune.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tabulate import tabulate

from looplm.backends import KERNEL_PACKAGES
from looplm.cli import CLIError, run_cli
from tuning import gpus, lookup, table
from tuning.buckets import DTYPES, MODEL_SHAPES, TUNED_DTYPES, format_shape, model_shape, parse_shape
from tuning.search import IsolatedRunner, Task, discover, plan, run_tasks
from tuning.spec import is_torch
from tuning.timing import TIMERS


class AutotuneError(CLIError):
    """This machine cannot tune what was asked (no GPU, another GPU, nothing to tune)."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuning.autotune", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", required=True, metavar="NAME", help=f"short GPU name: {', '.join(sorted(gpus.GPUS))}")
    p.add_argument("--backend", choices=[*KERNEL_PACKAGES, "all"], default="all")
    p.add_argument("--kernels", nargs="+", metavar="KERNEL", help="op or kernel names (default: all)")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--shapes", nargs="+", metavar="AxB", type=parse_shape,
                        help="explicit shape keys for every selected kernel (see each kernel's shape_key)")
    shapes.add_argument("--config", nargs="+", metavar="MODEL_CONFIG", default=list(MODEL_SHAPES),
                        help=f"model shapes to tune for: {', '.join(MODEL_SHAPES)} or a JSON model config "
                             "(default: all shipped)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(TUNED_DTYPES))
    p.add_argument("--out", type=Path, help="table to write (default: tuning/tables/NAME.json or "
                                            f"${table.USER_DIR_ENV}/NAME.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; compile, never run")
    p.add_argument("--force", action="store_true", help="tune even if this GPU is not NAME (records the real one)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="processes compiling candidates ahead of time (default: one per CPU core)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="seconds per candidate (default 60)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
    if not args.time_limit > 0:
        raise CLIError(f"--time-limit must be > 0 seconds, got {args.time_limit:g}")
    return args


def check_device(target: gpus.Gpu, force: bool) -> tuple[str, tuple[int, int]]:
    """(name, capability) of the GPU here, if it is `target` or `force` is set; AutotuneError if not."""
    if not torch.cuda.is_available():
        raise AutotuneError(f"no CUDA GPU here, so nothing can be timed; run this on the {target.name} itself "
                            "(--dry-run prints the plan without a GPU)")
    name, capability = torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
    if not target.matches(name):
        known = gpus.gpu_for_device(name)
        hint = f"use --gpu {known.name}" if known else "this GPU has no short name in tuning/gpus.py yet"
        if not force:
            raise AutotuneError(f"this machine's GPU is {name!r}, not a {target.name} ({' or '.join(target.device_names)}"
                                f"); {hint}, or pass --force to tune it anyway and record it as {name!r}")
        print(f"warning: --force: measuring {name!r}, not a {target.name}; the table records {name!r}",
              file=sys.stderr)
    return name, capability


def versions() -> dict[str, Optional[str]]:
    def version(dist: str) -> Optional[str]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "cuda-tile": version("cuda-tile")}


def driver_version() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader", f"--id={torch.cuda.current_device()}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def print_plan(tasks: Sequence[Task], notes: Sequence[str], arch: str) -> None:
    rows = [(t.kernel.backend, t.kernel.name, t.dtype, format_shape(t.bucket), format_shape(t.shape),
             len(t.candidates), len(t.pruned)) for t in tasks]
    print(tabulate(rows, headers=("backend", "kernel", "dtype", "bucket", "shape", "to time", "pruned")))
    pruned = [(t.kernel.backend, t.kernel.name, t.dtype, format_shape(t.bucket), p["config"], p["reason"])
              for t in tasks for p in t.pruned]
    if pruned:
        print(f"\npruned for {arch}:")
        print(tabulate(pruned, headers=("backend", "kernel", "dtype", "bucket", "config", "why")))
    n_kernels = len({(t.kernel.backend, t.kernel.name) for t in tasks})
    with_torch = sum(any(is_torch(c) for c in t.candidates) for t in tasks)
    print(f"\n{n_kernels} kernels x {len(tasks)} (dtype, shape bucket) pairs: "
          f"{sum(len(t.candidates) for t in tasks)} configurations to time (the PyTorch op among them in "
          f"{with_torch} pairs), {len(pruned)} pruned")
    print_notes(notes)


def print_notes(notes: Sequence[str]) -> None:
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  {note}")


def print_summary(entries: Sequence[dict]) -> None:
    rows = []
    for e in entries:
        best = e["best"]
        default = e["default_ms"]
        rows.append((e["backend"], e["kernel"], e["dtype"], format_shape(e["bucket"]),
                     best["config"] if best else "-", f"{best['median_ms']:.4f}" if best else "-",
                     f"{default / best['median_ms']:.2f}x" if best and default else "-",
                     len(e["failed"]), len(e["pruned"])))
    print(tabulate(rows, headers=("backend", "kernel", "dtype", "bucket", "best config", "ms", "vs default",
                                  "failed", "pruned")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input raises (CLIError, ValueError, ...); `run_cli` turns it into one line and exit 2."""
    args = parse_args(argv)
    target = gpus.gpu(args.gpu)
    models = [] if args.shapes else [model_shape(spec) for spec in args.config]
    backends = list(KERNEL_PACKAGES) if args.backend == "all" else [args.backend]
    if args.dry_run:
        limits = target.limits
    else:
        device_name, capability = check_device(target, args.force)
        limits = target.limits if target.matches(device_name) else gpus.arch_for_capability(capability)
    kernels, notes = discover(backends, args.kernels)
    tasks, plan_notes = plan(kernels, args.dtypes, limits, models, args.shapes or (), progress=True,
                             workers=args.jobs)
    notes += plan_notes
    if args.dry_run:
        print(f"plan for {target.name} ({limits.arch}, {limits.shared_mem_per_block} bytes of shared memory "
              f"per block, {limits.registers_per_block} registers per block):\n")
        print_plan(tasks, notes, limits.arch)
        return 0
    if not tasks:
        print_notes(notes)
        raise AutotuneError("nothing to tune: no kernel with a TUNING was found for these options")
    out = args.out or table.default_path(target.name)
    if out.exists():
        table.load(out)  # a corrupt table to add to is refused before hours of measuring, not after
    run = {"date": table.now(), "driver": driver_version(), "versions": versions(),
           "forced": not target.matches(device_name)}
    entries: list[dict] = []  # filled as each entry is measured, so an interrupted run still keeps them
    try:
        for backend in backends:
            backend_tasks = [t for t in tasks if t.kernel.backend == backend]
            if backend_tasks:
                with IsolatedRunner(TIMERS[backend], args.time_limit) as runner:
                    run_tasks(backend_tasks, runner, progress=True, on_entry=entries.append)
    finally:
        if entries:
            table.record(out, target.name, device_name, capability, run, entries)
            lookup.reset()
            print(f"wrote {len(entries)} entries to {out}")
    print_summary(entries)
    print_notes(notes)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m tuning.autotune")
