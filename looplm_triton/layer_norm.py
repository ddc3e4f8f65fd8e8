"""LayerNorm over the last dimension, forward; and the per-row statistics `layer_norm_linear` uses.

Each program normalises BLOCK_M rows held whole in registers (BLOCK_C = C rounded up to a power of
two): mean, then the biased variance of the centred row, both in fp32, then scale and shift: one
read and one write of x. With STATS_ONLY the program writes each row's mean and 1/std (8 bytes a
row) instead of y, so that the linear kernel can normalise x tiles as it loads them. Row offsets
are 64-bit: N x C may exceed 2^31 elements. Knobs: BLOCK_M (rows per program), num_warps; without
a tuning table they follow the width (`default_config`): several narrow rows per program, so every
load is a 16-byte vector and a program keeps about 8 KiB in flight; one wide row over 8 warps.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype, check_tensors
from looplm_triton.common import compile_run, launch, launch_config, split_config
from tuning.spec import Config, KernelTuning

MAX_C = 16384  # rows are held whole in registers


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                       HAS_BIAS: tl.constexpr, STATS_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)

    x = tl.load(x_ptr + offsets[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    if STATS_ONLY:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    else:
        y = centred * rstd[:, None] * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offsets[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "num_warps": 4}
# Small rows (C = 64..384) do better with a few rows and few warps per program; wide ones with one.
SPACE: list[Config] = [{"BLOCK_M": m, "num_warps": w} for m in (1, 2, 4, 8) for w in (1, 2, 4, 8, 16)
                       if not (m >= 4 and w == 16)]
ELEMENTS_PER_PROGRAM = 4096  # a program's tile: 8 KiB of bf16 in flight, whatever the width
ELEMENTS_PER_THREAD = 16  # two 16-byte vectors of bf16 (four of fp32) per thread and row tile


def default_config(C: int) -> Config:
    """Rows per program and warps for rows of C channels, without a tuning table: whole rows
    (padded to a power of two) up to ELEMENTS_PER_PROGRAM per program, so that narrow rows (the
    model's 384) still move 16-byte vectors and a program has several rows in flight instead of one
    768-byte row; ELEMENTS_PER_THREAD per thread, 1 to 8 warps (a wide row, 4096, takes 8 warps as in
    Triton's layer-norm tutorial)."""
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(8, ELEMENTS_PER_PROGRAM // block_c))
    warps = max(1, min(8, rows * block_c // (32 * ELEMENTS_PER_THREAD)))
    return {"BLOCK_M": rows, "num_warps": warps}


DEFAULT: Config = default_config(384)  # the shipped model's width, the tuner's yardstick


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, config: Config,
            stats_only: bool = False):
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows = x2.shape[0]
    block_sizes, options = split_config(config)
    if stats_only:
        y = x2  # not written
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty_like(x2)
        mean = rstd = y  # not written
    launch(_layer_norm_kernel, (triton.cdiv(n_rows, block_sizes["BLOCK_M"]),),
           x2, weight, bias if bias is not None else weight, y, mean, rstd, n_rows, C, x2.stride(0), y.stride(0), eps,
           HAS_BIAS=bias is not None, STATS_ONLY=stats_only, BLOCK_C=triton.next_power_of_2(C),
           **block_sizes, **options)
    return (mean, rstd) if stats_only else y.view(x.shape)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    check_tensors("layer_norm", x=x, weight=weight, bias=bias)
    check_kernel_dtype("layer_norm", "x", x)
    C = x.shape[-1]
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({C},), got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    _check_width(C)
    shape = (x.numel() // C, C)
    return _launch(x, weight, bias, eps, launch_config("layer_norm", x.dtype, shape, default_config(C),
                                                       INTERPRETER_CONFIG))


def _check_width(C: int) -> None:
    if C > MAX_C:
        raise ValueError(f"layer_norm: rows of {C} channels exceed the {MAX_C} this kernel holds in registers")


def row_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, 1/std) of each row of x (..., C) in fp32, flattened to (rows,): 8 bytes a row."""
    C = x.shape[-1]
    _check_width(C)
    config = launch_config("layer_norm", x.dtype, (x.numel() // C, C), default_config(C), INTERPRETER_CONFIG)
    return _launch(x, x.new_empty(0), None, eps, config, stats_only=True)


# ---- tuning: shape (N rows, C channels)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    N, C = shape
    return (torch.randn(N, C, dtype=dtype, device=device), torch.randn(C, dtype=dtype, device=device),
            torch.randn(C, dtype=dtype, device=device))


def _run(x: Tensor, weight: Tensor, bias: Tensor, *, config: Config) -> Tensor:
    return _launch(x, weight, bias, 1e-5, config)


def _expected(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["layer_norm"](x, weight, bias, 1e-5)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_run(_run, arch, *_make_args(shape, dtype, "meta"), config=config)


def _shape_key(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple:
    return (x.numel() // x.shape[-1], x.shape[-1])


TUNING = KernelTuning(backend="triton", kernel="layer_norm", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected)
