"""LayerNorm over the last dim, one row tile per block.

Algorithm: a block loads BLOCK_M whole rows (the row padded with zeros to BLOCK_C, the next power
of two of C, as cuTile tiles are powers of two), takes the mean, masks the padding out of the
centred values, takes the biased variance, and writes (x - mean) * rsqrt(var + eps) * w + b in
x's dtype. Statistics are fp32 whatever the input dtype; x is read once and y written once.

Tuning knobs: BLOCK_M (rows per block: more rows amortise the weight loads and keep more bytes in
flight but hold more in registers; wide rows spill at 4; without a table it follows the width,
`default_config`), occupancy (blocks resident per SM, a compiler hint).
"""
from typing import Optional

import torch
from torch import Tensor

import cuda.tile as ct

import tuning
from looplm.ops import check_kernel_dtype
from looplm_tile import runtime
from tuning.spec import KernelTuning


@ct.kernel
def layer_norm_kernel(X, W, B, Y, eps, HAS_BIAS: ct.Constant[bool], BLOCK_M: ct.Constant[int],
                      BLOCK_C: ct.Constant[int]):
    row_block = ct.bid(0)
    n_cols = X.shape[1]
    x = ct.load(X, index=(row_block, 0), shape=(BLOCK_M, BLOCK_C), padding_mode=ct.PaddingMode.ZERO)
    x = x.astype(ct.float32)
    mean = ct.sum(x, axis=1, keepdims=True) / n_cols
    in_row = ct.arange(BLOCK_C, dtype=ct.int32) < n_cols
    centered = ct.where(in_row, x - mean, 0.0)  # the zero padding would otherwise add mean^2 terms
    var = ct.sum(centered * centered, axis=1, keepdims=True) / n_cols
    y = centered * ct.rsqrt(var + eps)
    y = y * ct.load(W, index=(0,), shape=(BLOCK_C,), padding_mode=ct.PaddingMode.ZERO).astype(ct.float32)
    if HAS_BIAS:
        y = y + ct.load(B, index=(0,), shape=(BLOCK_C,), padding_mode=ct.PaddingMode.ZERO).astype(ct.float32)
    ct.store(Y, index=(row_block, 0), tile=y.astype(Y.dtype))


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, eps: float, config: dict) -> Tensor:
    n_rows, n_cols = x.shape
    block_m = min(config["BLOCK_M"], runtime.next_power_of_2(n_rows))
    args = (x, weight, weight if bias is None else bias, y, float(eps), bias is not None, block_m,
            runtime.next_power_of_2(n_cols))
    runtime.launch((runtime.cdiv(n_rows, block_m),), layer_norm_kernel, args, config)
    return y


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    check_kernel_dtype("layer_norm", "x", x)
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,) or (bias is not None and bias.shape != (n_cols,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({n_cols},), got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    rows = x.reshape(-1, n_cols).contiguous()
    y = torch.empty_like(rows)
    if rows.numel():
        config = tuning.lookup_config("tile", "layer_norm", x.dtype, rows.shape, default_config(n_cols))
        _launch(rows, weight.contiguous(), None if bias is None else bias.contiguous(), y, eps, config)
    return y.view(x.shape)


# ---- tuning: shape key (rows, C)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    n_rows, n_cols = shape
    x = torch.randn(n_rows, n_cols, dtype=dtype, device=device)
    weight, bias = torch.randn(2, n_cols, dtype=dtype, device=device)
    return x, weight, bias, torch.empty_like(x), 1e-5


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return runtime.compile_run(_launch, arch, *_make_args(shape, dtype, "meta"), config)


def _expected(x, weight, bias, y, eps) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["layer_norm"](x, weight, bias, eps)


ELEMENTS_PER_BLOCK = 4096  # 8 KiB of bf16 per block: one wide row, or several narrow ones


def default_config(n_cols: int) -> dict:
    """Rows per block for rows of n_cols, without a tuning table: whole rows (padded to a power of
    two) up to ELEMENTS_PER_BLOCK, at most 8: one row of 4096, eight of the model's 384, so a block
    of a narrow row still moves whole 16-byte vectors (one 768-byte row per block did not);
    occupancy 4. Compiled without a spill for sm_80, sm_90, sm_100 and sm_120."""
    rows = max(1, min(8, ELEMENTS_PER_BLOCK // runtime.next_power_of_2(n_cols)))
    return {"BLOCK_M": rows, "occupancy": 4}


TUNING = KernelTuning(
    backend="tile", kernel="layer_norm",
    default=default_config(384),  # the shipped model's width
    space=[{"BLOCK_M": m, "occupancy": o} for m in (1, 2, 4, 8, 16) for o in (1, 2, 4, 8)],
    make_args=_make_args,
    run=lambda x, w, b, y, eps, config: _launch(x, w, b, y, eps, config),
    compile=_compile,
    shape_key=lambda x, weight, bias=None, eps=1e-5: (x.numel() // x.shape[-1], x.shape[-1]),
    expected=_expected,
)
