"""Linear layer with a fused epilogue, and optionally a LayerNorm applied as x is loaded, forward.

out = act(norm(x) @ W^T + bias) + residual for x (M, K), W (N, K), in BLOCK_M x BLOCK_N output
tiles, each accumulated in fp32 over K in BLOCK_K steps, then bias, exact-erf GELU and the residual
add applied before the tile's one store. Tiles are visited in groups of GROUP_M down the M axis
(Triton tutorial 03) so that tiles computed at the same time share W tiles, and x rows, in L2.

Two kernels, one algorithm, chosen per launch by `use_tensor_descriptors(capability, ...)`:
- Persistent, with tensor descriptors (TMA), on sm_90 and sm_100, for bf16/fp16 tensors the copy
  engine can address (Triton tutorial 09): one program per SM (`persistent_programs`) walks the
  tiles `num_programs` apart in the grouped order, so the next tile's loads overlap this tile's
  epilogue and no launch tail of short-lived programs is left; the copy engine moves x and W tiles
  into shared memory (pipelined over num_stages, no address arithmetic or masks in the threads:
  rows and columns past the edge read as zeros and are dropped on store), the tensor cores read
  them from there (wgmma on sm_90, tcgen05 on sm_100). The epilogue runs on EPILOGUE_SUBTILE
  column slices of the accumulator, each stored through its own descriptor: half the registers and
  half the shared staging buffer of a whole-tile epilogue, so the stages stay deep.
- One program per tile, by pointers, everywhere else (sm_80, sm_120, fp32, views TMA cannot
  address, the interpreter unless asked): masked loads and stores through the strides.
The descriptors are host-side `TensorDescriptor`s passed by value, as attention's are: a
`tl.make_tensor_descriptor` in the kernel would need a process-wide allocator
(`triton.set_allocator`) that a library cannot set without taking it from its user.

norm (`layer_norm_linear`, the block's QKV and MLP-up projections): a first, bandwidth-bound pass
(`layer_norm.row_statistics`) writes each row's mean and 1/std, 8 bytes a row; the matmul loads
them once per tile and normalises each x tile on its way to the tensor cores, so the normalised
activations never go to memory and no tile recomputes a statistic.

fp32 operands are multiplied exactly (no TF32), so fp32 results match the reference closely.
Offsets of rows are 64-bit (M x K may exceed 2^31 elements).
Knobs: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (the tuning table's, for both
kernels); the launcher also takes EPILOGUE_SUBTILE (column slices of the epilogue, persistent
kernel only; default 2 when BLOCK_N >= 128, else 1) when a config names it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import ACTIVATIONS, check_kernel_dtype, check_tensors
from looplm_triton.common import (compile_run, dot_in_fp32, launch, launch_config, make_descriptor,
                                  persistent_programs, split_config, target_arch, target_capability, tma_addressable)
from looplm_triton.layer_norm import row_statistics
from tuning.spec import Config, KernelTuning


@triton.jit
def _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the tile-th output tile in grouped order: GROUP_M row tiles walk
    each column of W tiles together while it is hot in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def _gelu(x):
    """Exact GELU, x * Phi(x), of an fp32 tile."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _normalise(x, mean, rstd, norm_w_ptr, norm_b_ptr, offs_k, K, NORM_HAS_BIAS: tl.constexpr):
    """LayerNorm of an x tile (rows' mean and 1/std given), rounded to x's dtype as the LayerNorm
    output would be stored."""
    k_mask = offs_k < K
    gamma = tl.load(norm_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    normed = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
    if NORM_HAS_BIAS:
        normed += tl.load(norm_b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return normed.to(x.dtype)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, norm_w_ptr, norm_b_ptr, mean_ptr, rstd_ptr,
                   M, N, K, stride_xm, stride_wn, stride_rm, stride_om,
                   HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coordinates(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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
            x = _normalise(x, mean, rstd, norm_w_ptr, norm_b_ptr, k0 + offs_k, K, NORM_HAS_BIAS)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:
        acc = _gelu(acc)
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=mask,
                           other=0.0)
        acc += residual.to(tl.float32)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _epilogue_slice(acc, off_m, off_n, bias_ptr, residual_desc, out_desc, N, HAS_BIAS: tl.constexpr,
                    APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SLICE_N: tl.constexpr):
    """Bias, GELU and residual on one (BLOCK_M, SLICE_N) slice of the accumulator, then its store."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, SLICE_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if APPLY_GELU:
        acc = _gelu(acc)
    if HAS_RESIDUAL:
        acc += residual_desc.load([off_m, off_n]).to(tl.float32)
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _linear_persistent_kernel(x_desc, w_desc, bias_ptr, residual_desc, out_desc, norm_w_ptr, norm_b_ptr, mean_ptr,
                              rstd_ptr, M, N, K,
                              HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                              NORM: tl.constexpr, NORM_HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr, FLATTEN: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    first = tl.program_id(0)
    stride = tl.num_programs(0)
    # The epilogue recomputes its tile's coordinates from a counter of its own (tutorial 09): the
    # software pipeliner then need not carry the main loop's values across into the epilogue.
    epilogue_tile = first - stride
    for tile in tl.range(first, tiles_m * tiles_n, stride, flatten=FLATTEN):
        pid_m, pid_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if NORM:
            offs_m = off_m + tl.arange(0, BLOCK_M)
            mean = tl.load(mean_ptr + offs_m, mask=offs_m < M, other=0.0)
            rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(k_steps):
            off_k = k_step * BLOCK_K
            x = x_desc.load([off_m, off_k])
            w = w_desc.load([off_n, off_k])
            if NORM:
                x = _normalise(x, mean, rstd, norm_w_ptr, norm_b_ptr, off_k + tl.arange(0, BLOCK_K), K,
                               NORM_HAS_BIAS)
            if DOT_IN_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w.T, acc, input_precision="ieee")

        epilogue_tile += stride
        pid_m, pid_n = _tile_coordinates(epilogue_tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        SLICE_N: tl.constexpr = BLOCK_N // EPILOGUE_SUBTILE
        if EPILOGUE_SUBTILE == 2:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SLICE_N)), (0, 2, 1)))
            _epilogue_slice(left, off_m, off_n, bias_ptr, residual_desc, out_desc, N, HAS_BIAS, APPLY_GELU,
                            HAS_RESIDUAL, SLICE_N)
            _epilogue_slice(right, off_m, off_n + SLICE_N, bias_ptr, residual_desc, out_desc, N, HAS_BIAS,
                            APPLY_GELU, HAS_RESIDUAL, SLICE_N)
        else:
            _epilogue_slice(acc, off_m, off_n, bias_ptr, residual_desc, out_desc, N, HAS_BIAS, APPLY_GELU,
                            HAS_RESIDUAL, SLICE_N)


# The pointer kernel's default (sm_80, sm_120, fp32): large MMA tiles, grouped ordering; BLOCK_K 32
# keeps three stages of bf16 or fp32 operands within sm_120's 99 KiB of shared memory.
DEFAULT: Config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# The persistent TMA kernel's on Hopper and Blackwell: tutorial 09's published fp16/bf16 Hopper
# configuration (128 x 256 x 64, two warpgroups, three stages: 144 KiB of operand stages plus a
# 32 KiB epilogue slice), which the H200 measurements also crowned at 4096x384x384.
PERSISTENT_DEFAULT: Config = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                              "num_stages": 3}
ARCH_DEFAULTS: dict[str, Config] = {"sm_90": PERSISTENT_DEFAULT, "sm_100": PERSISTENT_DEFAULT}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                              "num_stages": 1}
# The tuning space: the H200 measurements' candidates (tutorial 03's shapes) and those of tutorial
# 09's Hopper space (BLOCK_M 128, BLOCK_N 128/256, BLOCK_K 64/128, 3-4 stages, 4 or 8 warps) that fit
# sm_90's 227 KiB with the persistent kernel's stages and epilogue slices (128x256x64 at 4 stages
# and 128x256x128 need 256 to 352 KiB).
SPACE: list[Config] = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm, bn, bk, w, s in [
        (32, 32, 32, 2, 3), (32, 64, 32, 4, 3), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
        (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 3),
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
    ]
]

# Which launches take the persistent TMA kernel: sm_90 (wgmma) and sm_100 (tcgen05), both with 227
# KiB of shared memory for deep stages. sm_120 keeps the pointer kernel: its 99 KiB hold no more
# than two stages of the tiles the persistent kernel wants.
TMA_MAJORS = (9, 10)


def use_tensor_descriptors(capability: Optional[tuple[int, int]], *tensors: Optional[Tensor]) -> bool:
    """Whether a launch on a GPU of compute `capability` (None: no GPU, as in the interpreter)
    takes the persistent kernel with tensor descriptors: on sm_90 and sm_100, for bf16/fp16
    tensors (None: absent) the copy engine can address (16-byte aligned base and row stride)."""
    return capability is not None and capability[0] in TMA_MAJORS and tma_addressable(*tensors)


def grid(M: int, N: int, config: Config) -> tuple[int]:
    """One program per output tile, on one axis (the kernel orders them in groups)."""
    return (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)


def default_config(device: torch.device, dtype: torch.dtype) -> Config:
    """The built-in configuration of a launch on `device`: its architecture's (ARCH_DEFAULTS, the
    persistent kernel's tiles) or the pointer kernel's DEFAULT. A launch that takes the pointer
    kernel with an architecture's default takes DEFAULT instead (`_launch`)."""
    arch = target_arch(device)
    return DEFAULT if arch is None else TUNING.default_for(dtype, arch)


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, residual: Optional[Tensor],
            config: Config, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
            eps: float = 1e-5, tensor_descriptors: Optional[bool] = None) -> Tensor:
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
    if tensor_descriptors is None:
        tensor_descriptors = use_tensor_descriptors(target_capability(x.device), x2, weight, res2, out)
    if not tensor_descriptors and config in ARCH_DEFAULTS.values():
        config = DEFAULT  # those tiles are the persistent kernel's; the pointer kernel would spill with them
    block_sizes, options = split_config(config)
    subtile = block_sizes.pop("EPILOGUE_SUBTILE", 2 if block_sizes["BLOCK_N"] >= 128 else 1)
    flags = dict(HAS_BIAS=bias is not None, APPLY_GELU=activation == "gelu", HAS_RESIDUAL=res2 is not None,
                 NORM=norm_weight is not None, NORM_HAS_BIAS=norm_bias is not None, DOT_IN_FP32=dot_in_fp32())
    bias_arg = bias if bias is not None else weight
    norm_w_arg = norm_weight if norm_weight is not None else weight
    norm_b_arg = norm_bias if norm_bias is not None else weight
    if tensor_descriptors:
        bm, bn, bk = block_sizes["BLOCK_M"], block_sizes["BLOCK_N"], block_sizes["BLOCK_K"]
        out_desc = make_descriptor(out, [bm, bn // subtile], "linear")
        residual_desc = make_descriptor(res2, [bm, bn // subtile], "linear") if res2 is not None else out_desc
        programs = persistent_programs(x.device, grid(M, N, config)[0])  # one per SM: its stages fill 227 KiB
        launch(_linear_persistent_kernel, (programs,), make_descriptor(x2, [bm, bk], "linear"),
               make_descriptor(weight, [bn, bk], "linear"), bias_arg, residual_desc, out_desc, norm_w_arg, norm_b_arg,
               mean, rstd, M, N, K, **flags, EPILOGUE_SUBTILE=subtile, FLATTEN=True, **block_sizes, **options)
    else:
        launch(_linear_kernel, grid(M, N, config), x2, weight, bias_arg, res2 if res2 is not None else out, out,
               norm_w_arg, norm_b_arg, mean, rstd, M, N, K, x2.stride(0), weight.stride(0),
               res2.stride(0) if res2 is not None else 0, out.stride(0), **flags, **block_sizes, **options)
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
    config = launch_config("linear", x.dtype, _shape_key(x, weight), default_config(x.device, x.dtype),
                           INTERPRETER_CONFIG)
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
    config = launch_config("layer_norm_linear", x.dtype, _norm_shape_key(x), default_config(x.device, x.dtype),
                           INTERPRETER_CONFIG)
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
                    residual: bool = False, bias: bool = True, norm: bool = False) -> dict:
    """Compile, for `arch`, the launches of one variant at shape (M, N, K) as its launcher makes them."""
    M, N, K = shape
    x, weight, bias_tensor = _make_args(shape, dtype, "meta")
    bias_arg = bias_tensor if bias else None
    if norm:
        norm_w, norm_b = torch.empty(K, dtype=dtype, device="meta"), torch.empty(K, dtype=dtype, device="meta")
        return compile_run(_launch, arch, x, weight, bias_arg, activation, None, config, norm_w, norm_b)
    res = torch.empty(M, N, dtype=dtype, device="meta") if residual else None
    return compile_run(_launch, arch, x, weight, bias_arg, activation, res, config)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_variant(shape, dtype, config, arch)


TUNING = KernelTuning(backend="triton", kernel="linear", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected,
                      arch_defaults=ARCH_DEFAULTS)


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
                                        shape_key=_norm_shape_key, expected=_expected_norm,
                                        arch_defaults=ARCH_DEFAULTS)
