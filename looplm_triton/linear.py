"""Linear layer with a fused epilogue, and optionally a LayerNorm applied as x is loaded, forward.

out = act(norm(x) @ W^T + bias) + residual for x (M, K), W (N, K): a tiled matmul in which each
program owns a BLOCK_M x BLOCK_N tile of the output, walks K in BLOCK_K steps accumulating in fp32,
and applies bias, exact-erf GELU and the residual add before its one store. Programs are grouped
GROUP_M tiles down the M axis (Triton tutorial 03) so that neighbouring programs reuse the same W
tiles, and the same x rows, while they are hot in L2.

norm (`layer_norm_linear`, the block's QKV and MLP-up projections): a first, bandwidth-bound pass
(`layer_norm.row_statistics`) writes each row's mean and 1/std, 8 bytes a row; the matmul loads
them once per tile and normalises each x tile on its way to the tensor cores, so the normalised
activations never go to memory and no tile recomputes a statistic.

fp32 operands are multiplied exactly (no TF32), so fp32 results match the reference closely.
Offsets of rows are 64-bit (M x K may exceed 2^31 elements).
Knobs: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import ACTIVATIONS, check_kernel_dtype, check_tensors
from looplm_triton.common import compile_run, dot_in_fp32, launch, launch_config, split_config
from looplm_triton.layer_norm import row_statistics
from tuning.spec import Config, KernelTuning


@triton.jit
def _linear_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, norm_w_ptr, norm_b_ptr, mean_ptr, rstd_ptr,
                   M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
                   HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column of W tiles while it is hot in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    if NORM:
        mean = tl.load(mean_ptr + offs_m, mask=m_mask, other=0.0)
        rstd = tl.load(rstd_ptr + offs_m, mask=m_mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + (k0 + offs_k)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if NORM:
            gamma = tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            normed = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
            if NORM_HAS_BIAS:
                normed += tl.load(norm_b_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            x = normed.to(x_ptr.dtype.element_ty)  # rounded as the LayerNorm output would be stored
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:  # exact: x * Phi(x)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask,
                           other=0.0)
        acc += residual.to(tl.float32)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# Large MMA tiles, grouped ordering (Triton tutorial 03); BLOCK_K 32 keeps three stages of bf16 or
# fp32 operands within sm_120's 99 KiB of shared memory.
DEFAULT: Config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                              "num_stages": 1}
SPACE: list[Config] = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in [
        (32, 32, 32, 2, 3), (32, 64, 32, 4, 3), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3),
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
]


def grid(M: int, N: int, config: Config) -> tuple[int]:
    """One program per output tile, on one axis (the kernel orders them in groups)."""
    return (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, residual: Optional[Tensor],
            config: Config, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
            eps: float = 1e-5) -> Tensor:
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res2 = None
    if residual is not None:
        res2 = residual.reshape(M, N)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    mean = rstd = out  # read only with a norm
    if norm_weight is not None:
        mean, rstd = row_statistics(x2, eps)
    block_sizes, options = split_config(config)
    launch(_linear_kernel, grid(M, N, config),
           x2, weight, bias if bias is not None else weight, res2 if res2 is not None else out, out,
           norm_weight if norm_weight is not None else weight, norm_bias if norm_bias is not None else weight,
           mean, rstd, M, N, K, x2.stride(0), weight.stride(0), res2.stride(0) if res2 is not None else 0,
           out.stride(0), HAS_BIAS=bias is not None, APPLY_GELU=activation == "gelu", HAS_RESIDUAL=res2 is not None,
           NORM=norm_weight is not None, NORM_HAS_BIAS=norm_bias is not None, DOT_IN_FP32=dot_in_fp32(),
           **block_sizes, **options)
    return out.view(*x.shape[:-1], N)


def _check(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
           residual: Optional[Tensor]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensors(op, x=x, weight=weight, bias=bias, residual=residual)
    check_kernel_dtype(op, "x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be (N, {x.shape[-1]}) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (*x.shape[:-1], N):
        raise ValueError(f"{op}: residual must have shape {(*x.shape[:-1], N)}, got {tuple(residual.shape)}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    _check("linear", x, weight, bias, activation, residual)
    config = launch_config("linear", x.dtype, _shape_key(x, weight), DEFAULT, INTERPRETER_CONFIG)
    return _launch(x, weight, bias, activation, residual, config)


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                      bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    """act(layer_norm(x) @ weight.T + bias): per-row statistics first, then the matmul normalises x
    as it loads it; the normalised x never goes to memory."""
    _check("layer_norm_linear", x, weight, bias, activation, None)
    check_tensors("layer_norm_linear", x=x, norm_weight=norm_weight, norm_bias=norm_bias)
    K = x.shape[-1]
    if norm_weight.shape != (K,) or (norm_bias is not None and norm_bias.shape != (K,)):
        raise ValueError(f"layer_norm_linear: norm weight and bias must have shape ({K},), got "
                         f"{tuple(norm_weight.shape)} and {None if norm_bias is None else tuple(norm_bias.shape)}")
    config = launch_config("layer_norm_linear", x.dtype, _norm_shape_key(x), DEFAULT, INTERPRETER_CONFIG)
    return _launch(x, weight, bias, activation, None, config, norm_weight, norm_bias, eps)


# ---- tuning: shape (M rows, N outputs, K inputs); timed with bias and no activation

def _shape_key(x: Tensor, weight: Tensor, *args, **kwargs) -> tuple:
    return (x.numel() // x.shape[-1], weight.shape[0], x.shape[-1])


def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    M, N, K = shape
    return (torch.randn(M, K, dtype=dtype, device=device), torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5,
            torch.randn(N, dtype=dtype, device=device))


def _run(x: Tensor, weight: Tensor, bias: Tensor, *, config: Config) -> Tensor:
    return _launch(x, weight, bias, "none", None, config)


def _expected(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["linear"](x, weight, bias)


def compile_variant(shape: tuple, dtype: torch.dtype, config: Config, arch: str, *, activation: str = "none",
                    residual: bool = False, norm: bool = False) -> dict:
    """Compile, for `arch`, the launches of one variant at shape (M, N, K) as its launcher makes them."""
    M, N, K = shape
    x, weight, bias = _make_args(shape, dtype, "meta")
    if norm:
        norm_w, norm_b = torch.empty(K, dtype=dtype, device="meta"), torch.empty(K, dtype=dtype, device="meta")
        return compile_run(_launch, arch, x, weight, bias, activation, None, config, norm_w, norm_b)
    res = torch.empty(M, N, dtype=dtype, device="meta") if residual else None
    return compile_run(_launch, arch, x, weight, bias, activation, res, config)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_variant(shape, dtype, config, arch)


TUNING = KernelTuning(backend="triton", kernel="linear", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected)


# ---- tuning of LayerNorm + linear (block.py's entry). Shape (M rows, K channels): one configuration
# serves both of the block's launches (N = 3K for QKV, 4K for the MLP); it is timed on the larger, the
# MLP's, with GELU. The key reads x only, so it takes the block's arguments too.

def _norm_shape_key(x: Tensor, *args, **kwargs) -> tuple:
    return (x.numel() // x.shape[-1], x.shape[-1])


def _make_norm_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    M, K = shape
    x, weight, bias = _make_args((M, 4 * K, K), dtype, device)
    return (x, torch.randn(K, dtype=dtype, device=device), torch.randn(K, dtype=dtype, device=device), weight,
            bias)


def _run_norm(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor, *,
              config: Config) -> Tensor:
    return _launch(x, weight, bias, "gelu", None, config, norm_weight, norm_bias)


def _expected_norm(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["layer_norm_linear"](x, norm_weight, norm_bias, weight, bias, "gelu")


def _compile_norm(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    M, K = shape
    return compile_variant((M, 4 * K, K), dtype, config, arch, activation="gelu", norm=True)


LAYER_NORM_LINEAR_TUNING = KernelTuning(backend="triton", kernel="layer_norm_linear", default=DEFAULT, space=SPACE,
                                        make_args=_make_norm_args, run=_run_norm, compile=_compile_norm,
                                        shape_key=_norm_shape_key, expected=_expected_norm)
