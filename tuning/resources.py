"""What each kernel's default configuration needs of the GPU, compiled ahead of time, no GPU needed.

For every launch the shipped GPU model makes (tuning.buckets: batch 16, context 256, 384 wide, 6
heads, vocabularies 65 and 50304), in bf16, each kernel of both backends is compiled with its
default configuration for sm_80, sm_90, sm_100 and sm_120, specialised as a real launch would be
(see looplm_triton.aot and looplm_tile.runtime), and the cubin's resources are read: registers per
thread, spill stores / stack / local memory per thread, shared memory per block, threads per block,
and the occupancy they imply (tuning.gpus.occupancy). Tier 0 fails on any spill or exceeded limit
(tests/test_triton_compile.py, tests/test_kernel_resources.py); this module writes the table:

    python -m tuning.resources --out bench/results/kernel_resources     # .json and .md
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tabulate import tabulate

from looplm.backends import KERNEL_PACKAGES
from looplm.cli import CLIError, run_cli
from looplm.fileio import atomic_write_text
from tuning.buckets import MODEL_SHAPES, ModelShape
from tuning.gpus import ARCHS, COMPILE_TARGETS, occupancy, resource_problem, spilled_bytes

GPU_MODEL = MODEL_SHAPES["shakespeare-gpt2"]  # the shakespeare model's dims with both vocabularies below
VOCABS = (65, 50304)

# Spills that a default shows when compiled by one release of the supported range (triton>=3.2) and
# not by the newest: allowed on that release only (tier 0 then says per version what it expects), and
# reported in the table's "known" column. Anything else that spills still fails tier 0.
# (compiler, release, kernel, dtype, arch) -> bytes per thread allowed.
# None today: every default compiles without a spill under Triton 3.6.0 (the H200 machine's) and 3.9.0,
# checked by `python -m tuning.resources --backend triton` with each installed. (The 3.6 spills seen on
# the H200, attention bf16 on sm_100 and layer_norm_linear fp32 on sm_90, went with their old defaults.)
KNOWN_SPILLS: dict[tuple[str, str, str, str, str], int] = {}


def compiler_release(backend: str) -> str:
    """'major.minor' of the compiler behind `backend` ("triton"), "" where unknown."""
    if backend != "triton":
        return ""
    import triton
    return ".".join(triton.__version__.split(".")[:2])


def known_spill(backend: str, kernel: str, dtype: Any, arch: str) -> int:
    """Bytes per thread a default of `kernel` is known to spill with this machine's compiler (0: none)."""
    key = (backend, compiler_release(backend), kernel, str(dtype).removeprefix("torch."), arch)
    return KNOWN_SPILLS.get(key, 0)


def launch_problem(resources: dict, config: dict, arch: str, backend: str, kernel: str, dtype: Any) -> Optional[str]:
    """`tuning.gpus.resource_problem` for a default launch, less a spill KNOWN_SPILLS allows for this
    compiler release (every other limit still applies)."""
    if 0 < spilled_bytes(resources) <= known_spill(backend, kernel, dtype, arch):
        resources = {**resources, "spill_stores": 0, "stack": 0, "local_mem": 0}
    return resource_problem(resources, config, ARCHS[arch])


@dataclass(frozen=True)
class Launch:
    """One default launch to compile: a kernel of one backend at one shape, in one variant."""

    backend: str
    kernel: str
    variant: str  # what sets it apart, e.g. "qkv +bias"
    shape: tuple
    tuning: Any  # the kernel's KernelTuning, whose default (per dtype and arch) is compiled
    compile: Callable[[torch.dtype, str, dict], dict]  # (dtype, arch, config) -> resources
    # the launcher's own default where it follows the shape (attention's tiles follow Tq), else the tuning's
    default: Optional[Callable[[torch.dtype, str], dict]] = None

    def config(self, dtype: torch.dtype, arch: str) -> dict:
        return self.default(dtype, arch) if self.default is not None else self.tuning.default_for(dtype, arch)


def linear_variants(m: ModelShape, vocabs: Sequence[int]) -> list[tuple[str, tuple, dict]]:
    """The linear layers of a forward pass of model shape `m`: (variant, shape (M, N, K), the flags
    both backends' `linear.compile_variant` take)."""
    rows, C = m.batch * m.context, m.n_embd
    return [("qkv", (rows, 3 * C, C), {}), ("proj +residual", (rows, C, C), {"residual": True}),
            ("fc +gelu", (rows, 4 * C, C), {"activation": "gelu"}),
            ("fc2 +residual", (rows, C, 4 * C), {"residual": True}),
            *((f"lm_head V={v}", (rows, v, C), {"bias": False}) for v in vocabs)]


def kernel_launches(backend: str, m: ModelShape = GPU_MODEL, vocabs: Sequence[int] = VOCABS) -> list[Launch]:
    """Every distinct default launch of `backend`'s kernels in a forward pass of model shape `m`, and
    attention's decode step (one query over a static cache, a key_len per batch row). The Triton
    backend adds its fused LayerNorm + linear (cuTile's is a layer norm and a linear launch) and
    attention's pointer path, which views TMA cannot address take."""
    modules = {name: importlib.import_module(f"{KERNEL_PACKAGES[backend]}.{name}")
               for name in ("attention", "halt_update", "layer_norm", "linear", "softmax_entropy")}
    rows, C, H = m.batch * m.context, m.n_embd, m.n_head
    out: list[Launch] = []

    def add(tuning, variant, shape, compile_fn=None, default=None):
        fn = compile_fn or (lambda dt, arch, config, s=shape, t=tuning: t.compile(s, dt, config, arch))
        out.append(Launch(backend, tuning.kernel, variant, shape, tuning, fn, default))

    linear = modules["linear"]
    add(modules["layer_norm"].TUNING, "", (rows, C))
    for name, shape, flags in linear_variants(m, vocabs):
        add(linear.TUNING, name, shape,
            lambda dt, arch, config, s=shape, f=flags: linear.compile_variant(s, dt, config, arch, **f))
    if backend == "triton":
        add(linear.LAYER_NORM_LINEAR_TUNING, "ln_2 + fc +gelu", (rows, C))
    attention, attention_shape = modules["attention"], (m.batch, H, m.context, m.context, C // H)

    def tiles_for(queries: int):  # the launcher's default tiles for this many queries
        return lambda dt, arch: attention.default_config(queries, C // H, dt, arch)
    add(attention.TUNING, "causal", attention_shape, default=tiles_for(m.context))  # Triton: TMA on sm_90
    if backend == "triton":
        add(attention.TUNING, "causal pointers", attention_shape,
            lambda dt, arch, config, s=attention_shape: attention.compile_variant(s, dt, config, arch, False),
            tiles_for(m.context))
    decode_shape = (m.batch, H, 1, m.context, C // H)  # one new token over a static cache of `context` places
    add(attention.TUNING, "decode key_len", decode_shape,
        lambda dt, arch, config, s=decode_shape: attention.compile_variant(s, dt, config, arch, key_len=True),
        tiles_for(1))
    for v in vocabs:
        add(modules["softmax_entropy"].TUNING, f"V={v}", (rows, v))
    add(modules["halt_update"].TUNING, "", (rows, C))
    return out


LAUNCHES = {backend: functools.partial(kernel_launches, backend) for backend in KERNEL_PACKAGES}


def measure(launches: Sequence[Launch], archs: Sequence[str], dtype: torch.dtype, workers: int = 2,
            config: Optional[dict] = None) -> list[dict]:
    """One row per (launch, arch): the compiled resources, what they imply, and any problem. Each
    launch compiles its default configuration for the arch, or `config` if given (a tuning table's)."""
    jobs = [(launch, arch, config or launch.config(dtype, arch)) for launch in launches for arch in archs]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # compiles run in worker processes / tools
        results = list(pool.map(lambda job: job[0].compile(dtype, job[1], job[2]), jobs))
    rows = []
    for (launch, arch, config), resources in zip(jobs, results):
        limits = ARCHS[arch]
        blocks = occupancy(resources, config, limits)
        threads = resources.get("threads")
        rows.append({
            "backend": launch.backend, "kernel": launch.kernel, "variant": launch.variant,
            "shape": list(launch.shape), "dtype": str(dtype).removeprefix("torch."), "arch": arch,
            "config": config, "registers": resources.get("registers"), "spilled": spilled_bytes(resources),
            "shared_mem": resources.get("shared_mem"), "threads": threads, "blocks_per_sm": blocks,
            "warps_per_sm": None if blocks is None or not threads else blocks * threads // 32,
            "tma": bool(resources.get("tma_loads") or resources.get("tma_stores")),
            "known": known_spill(launch.backend, launch.kernel, dtype, arch) if spilled_bytes(resources) else 0,
            "problem": launch_problem(resources, config, arch, launch.backend, launch.kernel, dtype)})
    return rows


def markdown(rows: Sequence[dict], command: str) -> str:
    headers = ["backend", "kernel", "variant", "arch", "registers", "spilled B", "shared B", "threads", "blocks/SM",
               "warps/SM", "problem or known"]
    table = [[r["backend"], r["kernel"], r["variant"] + (" [TMA]" if r.get("tma") else ""), r["arch"],
              r["registers"], r["spilled"], r["shared_mem"], r["threads"] or "-",
              "-" if r["blocks_per_sm"] is None else r["blocks_per_sm"],
              "-" if r["warps_per_sm"] is None else r["warps_per_sm"],
              r["problem"] or (f"known on this compiler release: {r['spilled']} B" if r.get("known") else "")]
             for r in rows]
    shape = GPU_MODEL
    return "\n".join([
        "# Kernel resources of the default configurations (compiled ahead of time, not measured)", "",
        f"- command: `{command}`",
        f"- launches: the shipped GPU model's (batch {shape.batch}, context {shape.context}, {shape.n_embd} wide, "
        f"{shape.n_head} heads, vocabularies {', '.join(map(str, VOCABS))}), {rows[0]['dtype'] if rows else ''}, "
        "each specialised as the JIT specialises a real launch (divisibility of pointers, strides and sizes)",
        "- registers per thread, bytes spilled to local memory per thread (spill stores, stack frame, local), "
        "shared memory per block (bytes), threads per block; blocks/SM and warps/SM: the occupancy these imply "
        "(CUDA occupancy rules, tuning.gpus.occupancy)",
        "- [TMA]: the compiled PTX moves its tiles with bulk tensor copies (tensor descriptors); attention "
        "\"causal\" is the load path the launcher picks on that GPU, \"causal pointers\" the one for views TMA "
        "cannot address; \"decode key_len\": one query over a static cache, a key length per batch row",
        "- problem: what tier 0 refuses (a spill, or a limit of the architecture exceeded); empty means it fits; "
        "known: a spill this compiler release shows and tier 0 allows (tuning.resources.KNOWN_SPILLS)", "",
        tabulate(table, headers, tablefmt="github"), ""])


def load_table(path: Path) -> list[dict]:
    """The rows of a table written by this module; CLIError when missing or corrupt."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CLIError(f"cannot read the resource table {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CLIError(f"resource table {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise CLIError(f"resource table {path} has no 'rows' list (write it with python -m tuning.resources)")
    return data["rows"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--backend", choices=[*LAUNCHES, "all"], default="all")
    p.add_argument("--jobs", type=int, default=2, help="compiles at once (default 2)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
    backends = list(LAUNCHES) if args.backend == "all" else [args.backend]
    rows = []
    for backend in backends:
        rows += measure(LAUNCHES[backend](), COMPILE_TARGETS, torch.bfloat16, args.jobs)
    command = "python -m tuning.resources " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, command)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    problems = [r for r in rows if r["problem"]]
    return 1 if problems else 0


if __name__ == "__main__":
    run_cli(main, prog="python -m tuning.resources")
