"""Causal flash attention, forward.

Each program owns BLOCK_M queries of one (batch, head) and streams the keys and values past them in
BLOCK_N blocks, keeping the running row max, the running softmax denominator and the unnormalised
output in fp32 (online softmax, exp2 with the scale folded into log2 units), so the Tq x Tk score
matrix never exists. Causal masking is aligned bottom-right: query i sits at key position
Tk - Tq + i, and key blocks wholly in a query block's future are never loaded. A row that sees no
key keeps a zero denominator and returns zeros, not 0/0.

q, k, v and the output are addressed through their strides, so the block reads heads straight out
of the fused QKV projection and writes (B, T, C) without transposes. Knobs: BLOCK_M, BLOCK_N,
num_warps, num_stages. The head size is padded to a power of two (at least 16, the dot minimum).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype, check_tensors
from looplm_triton.aot import compile_for
from looplm_triton.common import INTERPRETED, launch_config, pointer, split_config
from tuning.spec import Config, KernelTuning

LOG2E = 1.4426950408889634
MAX_HEAD_SIZE = 256


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                      n_heads, Tq, Tk, head_size, qk_scale_log2,
                      CAUSAL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    q_ptr += batch.to(tl.int64) * stride_qb + head * stride_qh
    k_ptr += batch.to(tl.int64) * stride_kb + head * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + head * stride_vh
    o_ptr += batch.to(tl.int64) * stride_ob + head * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_size
    q_mask = (offs_m < Tq)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    key_pos = offs_m + (Tk - Tq)  # the last key each query may see

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq) if CAUSAL else Tk
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < Tk)[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        visible = (cols < Tk)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= key_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row that has seen no key yet has max -inf; shift by 0 there so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(scores - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(o_ptr + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


DEFAULT: Config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
SPACE: list[Config] = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                       for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
                       if bn <= bm and not (bm == 32 and w == 8)]


def attention_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, causal: bool, scale: float,
                   config: Optional[Config] = None) -> Tensor:
    """Attention of (B, H, T, D) views of any strides (unit stride along D), written into `out`;
    `config` defaults to the tuned one for this shape."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if config is None:
        config = launch_config("attention", q.dtype, (B, H, Tq, Tk, D), DEFAULT, INTERPRETER_CONFIG)
    block_sizes, options = split_config(config)
    grid = (triton.cdiv(Tq, block_sizes["BLOCK_M"]), B * H)
    _attention_kernel[grid](q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                            H, Tq, Tk, D, scale * LOG2E, CAUSAL=causal, DOT_IN_FP32=INTERPRETED,
                            BLOCK_D=max(16, triton.next_power_of_2(D)), **block_sizes, **options)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None) -> Tensor:
    check_tensors("attention", q=q, k=k, v=v)
    check_kernel_dtype("attention", "q", q)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q must be (B, H, Tq, D) and k, v (B, H, Tk, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_SIZE:
        raise ValueError(f"attention: head size {q.shape[3]} exceeds the {MAX_HEAD_SIZE} this kernel supports")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[3] ** -0.5 if scale is None else scale
    return attention_into(q, k, v, torch.empty_like(q, memory_format=torch.contiguous_format), causal, scale)


# ---- tuning: shape (B, H, Tq, Tk, D), causal

def _shape_key(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> tuple:
    B, H, Tq, D = q.shape
    return (B, H, Tq, k.shape[2], D)


def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    B, H, Tq, Tk, D = shape
    return (torch.randn(B, H, Tq, D, dtype=dtype, device=device), torch.randn(B, H, Tk, D, dtype=dtype, device=device),
            torch.randn(B, H, Tk, D, dtype=dtype, device=device))


def _run(q: Tensor, k: Tensor, v: Tensor, *, config: Config) -> Tensor:
    return attention_into(q, k, v, torch.empty_like(q), True, q.shape[3] ** -0.5, config)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    D = shape[4]
    ptr = pointer(dtype)
    strides = [f"stride_{t}{d}" for t in "qkvo" for d in "bht"]
    types = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=ptr, n_heads="i32", Tq="i32", Tk="i32", head_size="i32",
                 qk_scale_log2="fp32", **{s: "i32" for s in strides})
    constexprs = dict(CAUSAL=True, DOT_IN_FP32=False, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return compile_for(_attention_kernel, arch, types, constexprs, config)


TUNING = KernelTuning(backend="triton", kernel="attention", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key)
