"""What the compiler made of a Triton launch, read from its SASS: tensor-core and copy-engine
instructions, plus the cubin's resources. No GPU needed.

A launcher is called on meta tensors inside `looplm_triton.common.captured_launches(arch)`, and
every launch it records is compiled for `arch` as the JIT specialises it, with its machine code
(`looplm_triton.aot.compile_launch(..., sass=True)`, which under Triton's interpreter compiles in a
worker process of its own); here its opcodes are counted.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from looplm_triton.aot import compile_launch

# The instruction families tier 0 looks for, by the opcode prefix SASS gives them.
HOPPER_MMA = "HGMMA"  # wgmma.mma_async: warpgroup matrix multiply (sm_90)
AMPERE_MMA = "HMMA"  # mma.sync (sm_80, sm_120; and sm_90 code that does not use wgmma)
BLACKWELL_MMA = "UTC"  # tcgen05.mma (UTCHMMA, UTCQMMA...): sm_100's tensor-memory matrix multiply
TMA_LOAD = "UTMALDG"  # cp.async.bulk.tensor global -> shared
TMA_STORE = "UTMASTG"  # cp.async.bulk.tensor shared -> global
ASYNC_COPY = "LDGSTS"  # cp.async (sm_80 style pipelined loads)


def compiler_or_skip(disassembler: bool = False) -> None:
    """Skip the calling test unless Triton finds ptxas (and, with `disassembler`, cuobjdump) to
    compile for a GPU ahead of time."""
    import triton
    tools = "ptxas/cuobjdump" if disassembler else "ptxas"
    try:
        found = triton.knobs.nvidia.ptxas.path and (not disassembler or triton.knobs.nvidia.cuobjdump.path)
    except Exception as e:  # Triton raises when it finds no ptxas
        pytest.skip(f"no {tools} to compile for a GPU ahead of time: {e}")
    if not found:
        pytest.skip(f"no {tools} to compile for a GPU ahead of time")


def opcode_counts(sass: str) -> dict[str, int]:
    """How often each opcode (without its modifiers: HGMMA.64x128x16.F32.BF16 -> HGMMA) occurs."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return dict(Counter(ops))


def wide_accesses(sass: str) -> dict[str, int]:
    """Global loads and stores by width in bits, e.g. {"LDG.128": 4, "STG.64": 1}: 16-byte vectors
    show as .128 (a plain LDG.E is 32 bits)."""
    found = re.findall(r"\b(LDG|STG)\.E(?:\.(?:EL|LU|EF|NA|CONSTANT|STRONG\.\w+|GPU|SYS|SYS\.\w+))*"
                       r"(?:\.(64|128|U16|16|U8|8))?\b", sass)
    return dict(Counter(f"{op}.{width or 32}" for op, width in found))


def count_prefix(counts: dict[str, int], prefix: str) -> int:
    return sum(n for op, n in counts.items() if op.startswith(prefix))


# ---- compiling the launches of a variant

def _variant_launches(kernel: str, shape: list, dtype: str, arch: str, flags: dict) -> list:
    from looplm_triton import attention, layer_norm, linear, softmax_entropy
    from looplm_triton.common import capture

    dt = getattr(torch, dtype)
    if kernel == "linear":
        M, N, K = shape
        x, w, b = (torch.empty(M, K, dtype=dt, device="meta"), torch.empty(N, K, dtype=dt, device="meta"),
                   torch.empty(N, dtype=dt, device="meta"))
        res = torch.empty(M, N, dtype=dt, device="meta") if flags.get("residual") else None
        norm = (torch.empty(K, dtype=dt, device="meta"),) * 2 if flags.get("norm") else (None, None)
        config = flags.get("config") or linear.TUNING.default_for(dt, arch)
        return capture(linear._launch, x, w, b, flags.get("activation", "none"), res, config, *norm, arch=arch)
    if kernel == "attention":
        B, H, Tq, Tk, D = shape
        q, k, v = (torch.empty(B, H, T, D, dtype=dt, device="meta") for T in (Tq, Tk, Tk))
        return capture(attention.attention_into, q, k, v, torch.empty_like(q), True, D ** -0.5, flags.get("config"),
                       flags.get("tensor_descriptors"), arch=arch)
    if kernel == "layer_norm":
        N, C = shape
        x, w = torch.empty(N, C, dtype=dt, device="meta"), torch.empty(C, dtype=dt, device="meta")
        config = flags.get("config") or layer_norm.default_config(C)
        return capture(layer_norm._launch, x, w, w, 1e-5, config, arch=arch)
    if kernel == "softmax_entropy":
        N, V = shape
        logits = torch.empty(N, V, dtype=dt, device="meta")
        config = flags.get("config") or softmax_entropy.default_config(V)
        return capture(softmax_entropy._launch, logits, config, arch=arch)
    raise ValueError(f"no launch variant for kernel {kernel!r}")


def report(kernel: str, shape: list, dtype: str, arch: str, flags: dict) -> list[dict]:
    """One entry per launch the launcher makes for this variant: the kernel's name, grid and launch
    options, its compiled resources, SASS opcode counts ("ops") and global accesses by width."""
    entries = []
    for launch in _variant_launches(kernel, shape, dtype, arch, flags):
        compiled = compile_launch(launch, arch, sass=True)
        sass = compiled.pop("sass")
        entries.append({"kernel": getattr(launch.kernel, "fn", launch.kernel).__name__, "grid": list(launch.grid),
                        "options": dict(launch.options), **compiled, "ops": opcode_counts(sass),
                        "accesses": wide_accesses(sass)})
    return entries


_REPORTS: dict[str, list[dict]] = {}  # the session's answers, by request
_COMPILERS = ThreadPoolExecutor(max_workers=2)  # two compiles at a time: each thread has its own compile worker


def sass_reports(jobs: list[tuple]) -> list[list[dict]]:
    """`report(...)` of each (kernel, shape, dtype, arch, flags) job, kept for the session."""
    keys = [json.dumps([kernel, list(shape), dtype, arch, flags], sort_keys=True)
            for kernel, shape, dtype, arch, flags in jobs]
    missing = sorted({key for key in keys if key not in _REPORTS})
    _REPORTS.update(zip(missing, _COMPILERS.map(lambda key: report(*json.loads(key)), missing)))
    return [_REPORTS[key] for key in keys]


def sass_report(kernel: str, shape: tuple, dtype: str, arch: str, **flags: Any) -> list[dict]:
    """`report(...)` of one launch variant, as `sass_reports` computes it."""
    return sass_reports([(kernel, shape, dtype, arch, flags)])[0]
