"""LayerNorm over the last dimension, forward.

Each program normalises BLOCK_M rows held whole in registers (BLOCK_C = C rounded up to a power of
two): mean, then the biased variance of the centred row, both in fp32, then scale and shift, one
read and one write of x. Knobs: BLOCK_M (rows per program), num_warps.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype, check_tensors
from looplm_triton.aot import compile_for
from looplm_triton.common import launch_config, pointer, split_config
from tuning.spec import Config, KernelTuning

MAX_C = 16384  # rows are held whole in registers


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    y = centred * rstd[:, None] * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


DEFAULT: Config = {"BLOCK_M": 4, "num_warps": 4}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "num_warps": 4}
SPACE: list[Config] = [{"BLOCK_M": m, "num_warps": w} for m in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, config: Config) -> Tensor:
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    block_sizes, options = split_config(config)
    grid = (triton.cdiv(x2.shape[0], block_sizes["BLOCK_M"]),)
    _layer_norm_kernel[grid](x2, weight, bias if bias is not None else weight, y, x2.shape[0], C, x2.stride(0),
                             y.stride(0), eps, HAS_BIAS=bias is not None, BLOCK_C=triton.next_power_of_2(C),
                             **block_sizes, **options)
    return y.view(x.shape)


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    check_tensors("layer_norm", x=x, weight=weight, bias=bias)
    check_kernel_dtype("layer_norm", "x", x)
    C = x.shape[-1]
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({C},), got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if C > MAX_C:
        raise ValueError(f"layer_norm: rows of {C} channels exceed the {MAX_C} this kernel holds in registers")
    shape = (x.numel() // C, C)
    return _launch(x, weight, bias, eps, launch_config("layer_norm", x.dtype, shape, DEFAULT, INTERPRETER_CONFIG))


# ---- tuning: shape (N rows, C channels)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    N, C = shape
    return (torch.randn(N, C, dtype=dtype, device=device), torch.randn(C, dtype=dtype, device=device),
            torch.randn(C, dtype=dtype, device=device))


def _run(x: Tensor, weight: Tensor, bias: Tensor, *, config: Config) -> Tensor:
    return _launch(x, weight, bias, 1e-5, config)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    _, C = shape
    types = dict(x_ptr=pointer(dtype), w_ptr=pointer(dtype), b_ptr=pointer(dtype), y_ptr=pointer(dtype),
                 n_rows="i32", n_cols="i32", stride_x="i32", stride_y="i32", eps="fp32")
    return compile_for(_layer_norm_kernel, arch, types, dict(HAS_BIAS=True, BLOCK_C=triton.next_power_of_2(C)),
                       config)


def _shape_key(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple:
    return (x.numel() // x.shape[-1], x.shape[-1])


TUNING = KernelTuning(backend="triton", kernel="layer_norm", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key)
