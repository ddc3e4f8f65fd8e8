"""What the compiler made of a Triton launch, read from its SASS: tensor-core and copy-engine
instructions, plus the cubin's resources. No GPU needed.

A launcher is called on meta tensors inside `looplm_triton.common.captured_launches(arch)`, and
every launch it records is compiled for `arch` as the JIT specialises it (`looplm_triton.aot`);
the cubin is disassembled with the `cuobjdump` Triton ships and its opcodes are counted.

Compiles run in a process without Triton's interpreter (under it kernels are not compilable):
`sass_reports(...)` in a test starts `python -m tests.kernel_sass`, which reads one JSON request a
line, compiles and answers with JSON. By hand:

    echo '["linear", [8192, 4096, 4096], "bfloat16", "sm_90", {}]' | python -m tests.kernel_sass
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

# The instruction families tier 0 looks for, by the opcode prefix SASS gives them.
HOPPER_MMA = "HGMMA"  # wgmma.mma_async: warpgroup matrix multiply (sm_90)
AMPERE_MMA = "HMMA"  # mma.sync (sm_80, sm_120; and sm_90 code that does not use wgmma)
BLACKWELL_MMA = "UTC"  # tcgen05.mma (UTCHMMA, UTCQMMA...): sm_100's tensor-memory matrix multiply
TMA_LOAD = "UTMALDG"  # cp.async.bulk.tensor global -> shared
TMA_STORE = "UTMASTG"  # cp.async.bulk.tensor shared -> global
ASYNC_COPY = "LDGSTS"  # cp.async (sm_80 style pipelined loads)


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


# ---- the worker side (no interpreter)

def _variant_launches(kernel: str, shape: list, dtype: str, arch: str, flags: dict) -> list:
    import torch

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


def _compile_sass(launch, arch: str) -> dict[str, Any]:
    """Compile one recorded launch for `arch`; its resources, kernel name and SASS opcode counts."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from looplm_triton import aot

    fn = getattr(launch.kernel, "fn", launch.kernel)
    kernel = getattr(importlib.import_module(fn.__module__), fn.__name__)
    described = {name: aot.describe_argument(v) for name, v in launch.args.items()}
    target = GPUTarget("cuda", aot.capability(arch), 32)
    signature, constexprs, attrs = aot.specialise(kernel, described, make_backend(target))
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=dict(launch.options))
    cubin = compiled.asm["cubin"]
    resources = aot.cubin_resources(cubin)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    return {"kernel": fn.__name__, "grid": list(launch.grid), "options": dict(launch.options),
            "constexprs": {k: v for k, v in constexprs.items() if k.isupper()}, **resources,
            "shared_mem": max(resources.get("shared_mem", 0), int(compiled.metadata.shared)),
            "ops": opcode_counts(sass), "accesses": wide_accesses(sass)}


def report(kernel: str, shape: list, dtype: str, arch: str, flags: dict) -> list[dict]:
    """One entry per launch the launcher makes for this variant (see `_compile_sass`)."""
    return [_compile_sass(launch, arch) for launch in _variant_launches(kernel, shape, dtype, arch, flags)]


_REPORTS: dict[str, list[dict]] = {}  # one process's answers, by request


def sass_reports(jobs: list[tuple]) -> list[list[dict]]:
    """`report(...)` of each (kernel, shape, dtype, arch, flags) job, computed in one fresh process
    started without Triton's interpreter (two compiles at a time) and kept for the session."""
    keys = [json.dumps([kernel, list(shape), dtype, arch, flags], sort_keys=True)
            for kernel, shape, dtype, arch, flags in jobs]
    missing = sorted({key for key in keys if key not in _REPORTS})
    if missing:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-m", "tests.kernel_sass"], input="\n".join(missing), env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {missing} failed:\n{done.stderr[-4000:]}")
        _REPORTS.update(zip(missing, json.loads(done.stdout.splitlines()[-1])))
    return [_REPORTS[key] for key in keys]


def sass_report(kernel: str, shape: tuple, dtype: str, arch: str, **flags: Any) -> list[dict]:
    """`report(...)` of one launch variant, as `sass_reports` computes it."""
    return sass_reports([(kernel, shape, dtype, arch, flags)])[0]


if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor

    requests = [json.loads(line) for line in sys.stdin.read().splitlines() if line.strip()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda request: report(*request), requests))
    print(json.dumps(answers))
