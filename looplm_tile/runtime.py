"""What every cuTile kernel module shares: launching (GPU or emulator), compiler hints, and
ahead-of-time compilation to cubin for the tier-0 tests and the tuner.

What is compiled is what runs: a module's own launcher is called on meta tensors inside
`captured_launches()`, which records each launch (grid, kernel, arguments) instead of running it;
`signature_of` turns the recorded arguments into the parameter constraints cuTile's JIT derives
at a launch (as `cuda.tile`'s own JAX binding spells them out): 16-byte aligned bases, unit strides
and unit dims as constants, strides and dims divisible by 16 bytes / 16 elements where they are,
64-bit indices where a dim or stride exceeds int32.
"""
from __future__ import annotations

import functools
import io
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

import cuda.tile as ct
from cuda.tile.compilation import (ArrayConstraint, CallingConvention, ConstantConstraint, KernelSignature,
                                   ScalarConstraint, export_kernel)

from looplm.kernels import MAX_GRID, capture, captured_launches, check_grid, cubin_resources, launch_arch, \
    most_demanding, multiprocessors, persistent_programs, record, recording
from looplm_tile import emulator
from looplm_tile.emulator import tile_dtype
from tuning.gpus import COMPILE_TARGETS

ARCHES = COMPILE_TARGETS
HINTS = ("occupancy", "num_ctas")  # config knobs that are compiler hints rather than kernel arguments
__all__ = ["ARCHES", "HINTS", "MAX_GRID", "arch_of", "array", "array_of", "capture", "captured_launches", "cdiv",
           "check_grid", "compile_cubin", "compile_run", "constant", "default_config", "hints_of", "launch",
           "multiprocessors", "next_power_of_2", "persistent_programs", "resource_usage", "scalar", "signature_of",
           "with_hints"]
INT32_MAX = 2 ** 31 - 1


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def arch_of(t: torch.Tensor) -> Optional[str]:
    """The architecture ("sm_90") a launch on `t`'s device compiles for (`looplm.kernels.launch_arch`):
    the recorded one inside `captured_launches(arch)`, so that an ahead-of-time compile takes that
    architecture's defaults; the GPU's own on CUDA; None in the emulator."""
    return launch_arch(t.device)


def default_config(tuning, t: torch.Tensor) -> dict:
    """The kernel's built-in default for a launch on `t`'s device (`arch_of`): its architecture's own
    where it has one (tile shapes that fit an sm_80 or sm_120 without spilling differ from Hopper's)."""
    return tuning.default_for(t.dtype, arch_of(t))


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
    """Launch on the current CUDA stream when the tensors live on a GPU, else in the CPU emulator
    (or record it as (grid, kernel, args, config), inside `captured_launches()`)."""
    check_grid(grid)
    if recording():
        record((tuple(grid), kernel, tuple(args), dict(config)))
        return
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

def array_of(t: torch.Tensor) -> ArrayConstraint:
    """The constraint cuTile's JIT derives for a launch with tensor `t` (a meta tensor will do)."""
    bits = torch.finfo(t.dtype).bits if t.dtype.is_floating_point else (8 if t.dtype == torch.bool
                                                                            else torch.iinfo(t.dtype).bits)
    stride_unit = 128 // bits if 128 % bits == 0 else 1  # 16 bytes, in elements
    shape, strides = tuple(t.shape), tuple(t.stride())
    wide = any(d > INT32_MAX for d in shape) or any(s > INT32_MAX for s in strides)
    return ArrayConstraint(
        tile_dtype(t.dtype), t.dim(), index_dtype=ct.int64 if wide else ct.int32, stride_lower_bound_incl=0,
        alias_groups=(), may_alias_internally=False,
        stride_constant=tuple(1 if s == 1 else None for s in strides),
        shape_constant=tuple(1 if d == 1 else None for d in shape),
        stride_divisible_by=tuple(stride_unit if s % stride_unit == 0 else 1 for s in strides),
        shape_divisible_by=tuple(16 if d % 16 == 0 else 1 for d in shape),
        base_addr_divisible_by=16 if (t.storage_offset() * t.element_size()) % 16 == 0 else t.element_size())


def signature_of(kernel: ct.kernel, args: Sequence[Any]) -> list:
    """The parameter constraints of a launch of `kernel` with `args`: tensors by `array_of`,
    ct.Constant parameters as constants, Python ints as int32 (int64 when they need it) and floats
    as float32 scalars."""
    _, constant, scalar_dtype = emulator.emulated(kernel)
    params = []
    for value, is_constant, wide in zip(args, constant, scalar_dtype):
        if isinstance(value, torch.Tensor):
            params.append(array_of(value))
        elif is_constant:
            params.append(ConstantConstraint(value))
        elif isinstance(value, bool):
            params.append(ScalarConstraint(ct.bool_))
        elif isinstance(value, int):
            params.append(ScalarConstraint(wide or (ct.int64 if abs(value) > INT32_MAX else ct.int32)))
        elif isinstance(value, float):
            params.append(ScalarConstraint(ct.float32))
        else:
            raise TypeError(f"no constraint for a kernel argument of type {type(value).__name__}")
    return params


def compile_run(run: Callable[..., Any], arch: str, *args: Any, **kwargs: Any) -> dict:
    """Compile for `arch` every launch `run` makes (specialised as the JIT would) and return the
    resources of the most demanding, with "launches": how many kernels it compiled."""
    return most_demanding(compile_cubin(kernel, signature_of(kernel, launch_args), arch, config)
                          for _, kernel, launch_args, config in capture(run, *args, arch=arch, **kwargs))


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
    key = (id(kernel), repr(list(parameters)), arch, tuple(sorted(hints_of(config).items())))
    if key not in _compiled:  # tier 0 and the resource table ask for the same launches
        signature = KernelSignature(list(parameters), calling_convention=CallingConvention.cutile_python_v2())
        buffer = io.BytesIO()
        export_kernel(with_hints(kernel, config), [signature], buffer, output_format="cubin", gpu_code=arch)
        _compiled[key] = resource_usage(buffer.getvalue())
    return dict(_compiled[key])


_compiled: dict[tuple, dict] = {}


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "shared_mem", "local_mem", "stack", "threads", "cubin_bytes"} as far as known:
    cuobjdump's resource usage, and the block size cuTile chose (the cubin's REQNTID attribute)."""
    return {"cubin_bytes": len(cubin), **cubin_resources(cubin)}
