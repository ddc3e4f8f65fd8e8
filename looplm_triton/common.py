"""What every Triton kernel module shares: how a launch gets its configuration, how it is launched
(or recorded for an ahead-of-time compile), and device code used by several kernels.

Under Triton's interpreter (TRITON_INTERPRET=1, no GPU) a launch uses the module's one interpreter
configuration: big blocks, because each program instance costs milliseconds there, and `tl.dot`
operands are upcast to fp32 (the interpreter's bf16 dot is wrong, triton issue 11584).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

import tuning
from torch import Tensor

from looplm.kernels import MAX_GRID, capture, captured_launches, check_grid, launch_arch, most_demanding, \
    multiprocessors, persistent_programs, record, recording, recording_arch
from looplm_triton.aot import LAUNCH_KNOBS, capability, compile_launch
from tuning.spec import Config

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: pointer kernels only
    TensorDescriptor = None

__all__ = ["BACKEND", "INTERPRETED", "MAX_GRID", "Launch", "LOG2E", "LOG2E_CONST", "TMA_DTYPES", "TensorDescriptor",
           "capture", "captured_launches", "check_grid", "compile_run", "descriptor_strides", "dot_in_fp32",
           "fast_exp2", "launch", "launch_config", "make_descriptor", "multiprocessors", "persistent_programs",
           "recording", "split_config",
           "target_arch", "target_capability", "tma_addressable", "tma_compatible"]

BACKEND = "triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(kernel: str, dtype: torch.dtype, shape: tuple, default: Config, interpreted: Config) -> Config:
    """The configuration of one launch: the tuning table's (or `default`) on a GPU, `interpreted`
    in the interpreter, where timings of a GPU do not apply (but the GPU's while launches are
    recorded for an ahead-of-time compile)."""
    if INTERPRETED and not recording():
        return interpreted
    return tuning.lookup_config(BACKEND, kernel, dtype, shape, default)


def split_config(config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constexpr block sizes, launch options) of a configuration."""
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_KNOBS}
    options = {k: v for k, v in config.items() if k in LAUNCH_KNOBS}
    return constexprs, options


# ---- launching, and recording launches for an ahead-of-time compile

@dataclass
class Launch:
    """One kernel launch as the launcher made it: the kernel, its grid, every argument by name."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # num_warps, num_stages


def target_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) compute capability that launches on `device` compile for: the recording's
    architecture inside `captured_launches(arch)`, the GPU's own on CUDA, None otherwise (the
    interpreter on CPU tensors)."""
    if recording():
        arch = recording_arch()
        return None if arch is None else divmod(capability(arch), 10)
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_capability(device)
    return None


def target_arch(device: torch.device) -> Optional[str]:
    """The architecture ("sm_90") launches on `device` compile for, for a default chosen by
    architecture: `looplm.kernels.launch_arch` (the recording's, else the GPU's own), None where the
    interpreter runs them."""
    return None if INTERPRETED and not recording() else launch_arch(device)


def dot_in_fp32() -> bool:
    """Whether tl.dot operands go up to fp32: only when the interpreter really runs the kernel."""
    return INTERPRETED and not recording()


def launch(kernel, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), or its record inside `captured_launches()`."""
    check_grid(grid)
    if not recording():
        kernel[grid](*args, **kwargs)
        return
    names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    options = {k: kwargs.pop(k) for k in LAUNCH_KNOBS if k in kwargs}
    record(Launch(kernel, tuple(grid), {**dict(zip(names, args)), **kwargs}, options))


def compile_run(run: Callable[..., Any], arch: str, *args: Any, **kwargs: Any) -> dict:
    """Compile for `arch` every launch `run` makes and return the resources of the most demanding
    (`most_demanding`: local memory first, then registers, then shared memory), with "launches": how
    many kernels it compiled."""
    return most_demanding(compile_launch(launch_, arch) for launch_ in capture(run, *args, arch=arch, **kwargs))


# ---- tensor descriptors (TMA): what the copy engine can address, and the host-side descriptors

TMA_DTYPES = (torch.bfloat16, torch.float16)  # the kernels' descriptor paths; fp32 keeps pointers
TMA_ALIGNMENT = 16  # bytes: the copy engine's rule for the base address and every stride but the last
TMA_MAX_STRIDE = 2 ** 40  # bytes


def _byte_address(t: Tensor) -> int:
    # A meta tensor (an ahead-of-time compile) has no address; its allocation is taken as aligned,
    # as the compile's specialisation takes it (looplm_triton.aot.describe_argument).
    return t.storage_offset() * t.element_size() if t.is_meta else t.data_ptr()


def descriptor_strides(t: Tensor) -> list[int]:
    """The strides of `t` as its descriptor gets them: a dimension of size 1 is never stepped along,
    so its stride (which PyTorch leaves arbitrary there) becomes the extent of the dimensions inside
    it, as in a contiguous tensor."""
    strides = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    return strides


def tma_compatible(t: Tensor) -> bool:
    """Whether the copy engine can address `t` through a descriptor: a non-empty tensor with unit
    stride along its last dimension, its first element and every other stride 16-byte aligned."""
    size = t.element_size()
    strides = descriptor_strides(t)
    return (t.numel() > 0 and strides[-1] == 1 and _byte_address(t) % TMA_ALIGNMENT == 0
            and all(s * size % TMA_ALIGNMENT == 0 and 0 < s * size < TMA_MAX_STRIDE for s in strides[:-1]))


def tma_addressable(*tensors: Optional[Tensor]) -> bool:
    """Whether a kernel's descriptor path can take all of `tensors` (None: an absent operand): this
    Triton has tensor descriptors and each is a bf16/fp16 tensor that is `tma_compatible`."""
    return TensorDescriptor is not None and all(
        t is None or (t.dtype in TMA_DTYPES and tma_compatible(t)) for t in tensors)


def make_descriptor(t: Tensor, block_shape: list[int], op: str) -> "TensorDescriptor":
    """A host-side descriptor of `t` with its own strides (`descriptor_strides`), read or written in
    `block_shape` blocks (the copy engine zero-fills what lies past the edges on a load and drops it
    on a store). Passed by value as a kernel argument: a `tl.make_tensor_descriptor` in the kernel
    would need a process-wide allocator (`triton.set_allocator`) a library cannot set for its user."""
    if TensorDescriptor is None:
        raise RuntimeError(f"{op}: tensor descriptors need Triton 3.4 or newer; this is {triton.__version__}")
    return TensorDescriptor(t, list(t.shape), descriptor_strides(t), list(block_shape))


# ---- shared device code

LOG2E = 1.4426950408889634  # for the host
LOG2E_CONST = tl.constexpr(LOG2E)  # for kernels, which read only constexpr globals


@triton.jit
def fast_exp2(x, FTZ: tl.constexpr):
    """2^x for fp32 x; FTZ: one `ex2.approx.ftz.f32` instruction, denormal results flushed to zero
    (what a GPU launch uses; -inf gives 0). The interpreter, which cannot run PTX, takes exp2."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.math.exp2(x)
