"""What every cuTile kernel module shares: launching (GPU or emulator), compiler hints, and
ahead-of-time compilation to cubin for the tier-0 tests and the tuner."""
from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from typing import Any, Sequence

import torch

import cuda.tile as ct
from cuda.tile.compilation import (ArrayConstraint, CallingConvention, ConstantConstraint, KernelSignature,
                                   ScalarConstraint, export_kernel)

from looplm_tile import emulator
from looplm_tile.emulator import tile_dtype
from tuning.gpus import COMPILE_TARGETS

ARCHES = COMPILE_TARGETS
HINTS = ("occupancy", "num_ctas")  # config knobs that are compiler hints rather than kernel arguments


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hints_of(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in HINTS}


@functools.lru_cache(maxsize=None)
def _with_hints(kernel: ct.kernel, hints: tuple) -> ct.kernel:
    return kernel.replace_hints(**dict(hints)) if hints else kernel


def with_hints(kernel: ct.kernel, config: dict) -> ct.kernel:
    """The kernel compiled with the config's hints (occupancy, num_ctas); one object per hint set."""
    return _with_hints(kernel, tuple(sorted(hints_of(config).items())))


_warned_emulated = False


def launch(grid: Sequence[int], kernel: ct.kernel, args: Sequence[Any], config: dict) -> None:
    """Launch on the current CUDA stream when the tensors live on a GPU, else in the CPU emulator."""
    on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if on_gpu:
        ct.launch(torch.cuda.current_stream(), tuple(grid), with_hints(kernel, config), tuple(args))
        return
    global _warned_emulated
    if not _warned_emulated:
        _warned_emulated = True
        warnings.warn("backend 'tile' runs its cuTile kernels in the CPU emulator: correct but slow, meant for "
                      "testing; use a CUDA GPU (capability 8.0+) for speed", RuntimeWarning, stacklevel=3)
    emulator.launch(grid, kernel, args)


# ---- ahead-of-time compilation (no GPU needed)

def array(dtype: torch.dtype | ct.DType, ndim: int, contiguous_last: bool = True) -> ArrayConstraint:
    """The constraint a launch with an ordinary torch tensor satisfies: non-negative strides, no
    aliasing, 16-byte aligned base, unit stride in the last dim."""
    return ArrayConstraint(tile_dtype(dtype), ndim, index_dtype=ct.int32, stride_lower_bound_incl=0,
                           alias_groups=(), may_alias_internally=False,
                           stride_constant=((None,) * (ndim - 1) + (1,)) if contiguous_last else None,
                           base_addr_divisible_by=16)


def scalar(dtype: ct.DType) -> ScalarConstraint:
    return ScalarConstraint(dtype)


def constant(value) -> ConstantConstraint:
    return ConstantConstraint(value)


def compile_cubin(kernel: ct.kernel, parameters: Sequence[Any], arch: str, config: dict) -> dict:
    """Compile `kernel` for `arch` with these parameter constraints; returns the resources the
    cubin reports (registers, shared/local memory, stack) when cuobjdump is at hand, else {}."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    signature = KernelSignature(list(parameters), calling_convention=CallingConvention.cutile_python_v2())
    buffer = io.BytesIO()
    export_kernel(with_hints(kernel, config), [signature], buffer, output_format="cubin", gpu_code=arch)
    return resource_usage(buffer.getvalue())


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton ships one next to its ptxas
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else None


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "shared_mem", "local_mem", "stack", "cubin_bytes"} as far as known."""
    usage = {"cubin_bytes": len(cubin)}
    tool = _cuobjdump()
    if tool is None:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out))
    names = {"REG": "registers", "SHARED": "shared_mem", "LOCAL": "local_mem", "STACK": "stack"}
    usage.update({names[k]: int(v) for k, v in fields.items()})
    return usage

