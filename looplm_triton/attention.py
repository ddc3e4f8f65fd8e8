"""Causal flash attention, forward.

Each program owns BLOCK_M queries of one (batch, head) and streams the keys and values past them in
BLOCK_N blocks, keeping the running row max, the running softmax denominator and the unnormalised
output in fp32 (online softmax in base 2: the scale, folded into log2 units, is applied once to the
block's row max and fused into the exponent), so the Tq x Tk score matrix never exists (Triton
tutorial 06). Causal masking is aligned bottom-right: query i sits at key position Tk - Tq + i.
Key blocks wholly in the past of every query of the program run unmasked; only the diagonal band
(and a ragged last block) pays for the compare and select, and blocks wholly in the future are
never loaded. A row that sees no key keeps a zero denominator and returns zeros, not 0/0.

fp32 inputs multiply as three TF32 products (tf32x3: fp32 accuracy on the tensor cores; exact
fp32 dots on CUDA cores spill at any useful tile). The head size is a compile-time constant
(padded to a power of two, at least 16, the dot minimum; no mask along it when it is one). On a
GPU exp2 is one `ex2.approx.ftz` instruction. Programs run on one grid axis, (query block, batch x head) flattened, heaviest query blocks first:
CUDA caps grid axes 1 and 2 at 65535, which B x H may exceed.

q, k, v and the output are addressed through their strides, so the block reads heads straight out
of the fused QKV projection and writes (B, T, C) without transposes. Knobs: BLOCK_M, BLOCK_N,
num_warps, num_stages.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype, check_tensors
from looplm_triton.common import LOG2E, compile_run, dot_in_fp32, fast_exp2, launch, launch_config, split_config
from tuning.spec import Config, KernelTuning

MAX_HEAD_SIZE = 256


@triton.jit
def _key_block(acc, row_max, row_sum, q, k_ptr, v_ptr, start_n, offs_n, offs_d, key_pos, stride_kt, stride_vt, Tk,
               qk_scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    k_ptrs = k_ptr + cols[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_ptr + cols[:, None] * stride_vt + offs_d[None, :]
    if MASKED or HEAD_DIM != BLOCK_D:
        kv_mask = (cols < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        visible = (cols < Tk)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= key_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1) * qk_scale_log2)
        # A row that has seen no key yet has max -inf; shift by 0 there so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max = tl.maximum(row_max, tl.max(scores, axis=1) * qk_scale_log2)
        shift = new_max
    p = fast_exp2(scores * qk_scale_log2 - shift[:, None], not DOT_IN_FP32)
    rescale = fast_exp2(row_max - shift, not DOT_IN_FP32)
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                      n_heads, Tq, Tk, qk_scale_log2,
                      CAUSAL: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One grid axis: pid -> (query block, batch x head); heaviest (latest) query blocks first.
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(Tq, BLOCK_M)
    batch_head = pid // m_blocks
    start_m = (m_blocks - 1 - pid % m_blocks) * BLOCK_M
    batch = batch_head // n_heads
    head = batch_head % n_heads
    q_ptr += batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_ptr += batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_ptr += batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    o_ptr += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    key_pos = offs_m + (Tk - Tq)  # the last key each query may see

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        # Keys 0 .. start_m + Tk - Tq are visible to every query of this block: whole blocks of them
        # run unmasked; the band up to the last query's last key is masked.
        unmasked_end = tl.maximum(tl.minimum(start_m + Tk - Tq + 1, Tk), 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq), 0)
    else:
        unmasked_end = Tk // BLOCK_N * BLOCK_N
        end = Tk
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, row_max, row_sum = _key_block(acc, row_max, row_sum, q, k_ptr, v_ptr, start_n, offs_n, offs_d, key_pos,
                                           stride_kt, stride_vt, Tk, qk_scale_log2, False, CAUSAL, HEAD_DIM,
                                           BLOCK_D, DOT_IN_FP32, PRECISION)
    for start_n in range(unmasked_end, end, BLOCK_N):
        acc, row_max, row_sum = _key_block(acc, row_max, row_sum, q, k_ptr, v_ptr, start_n, offs_n, offs_d, key_pos,
                                           stride_kt, stride_vt, Tk, qk_scale_log2, True, CAUSAL, HEAD_DIM,
                                           BLOCK_D, DOT_IN_FP32, PRECISION)

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(o_ptr + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


DEFAULT: Config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
# fp32 (tf32x3: three products per dot) needs smaller tiles to stay out of local memory.
FP32_DEFAULT: Config = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
SPACE: list[Config] = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                       for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
                       if bn <= bm and not (bm == 32 and w == 8)]
SPACE += [FP32_DEFAULT] if FP32_DEFAULT not in SPACE else []


def attention_grid(batch: int, heads: int, Tq: int, block_m: int) -> tuple[int]:
    """Programs of one launch, all on grid axis 0 (up to 2^31 - 1 blocks): B x H may exceed the
    65535 of axes 1 and 2."""
    return (triton.cdiv(Tq, block_m) * batch * heads,)


def head_block(D: int) -> int:
    """The head size padded to a power of two, at least 16 (the dot minimum)."""
    return max(16, triton.next_power_of_2(D))


def attention_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, causal: bool, scale: float,
                   config: Optional[Config] = None) -> Tensor:
    """Attention of (B, H, T, D) views of any strides (unit stride along D), written into `out`;
    `config` defaults to the tuned one for this shape."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if config is None:
        default = FP32_DEFAULT if q.dtype == torch.float32 else DEFAULT
        config = launch_config("attention", q.dtype, (B, H, Tq, Tk, D), default, INTERPRETER_CONFIG)
    if B * H * Tq == 0:
        return out
    block_sizes, options = split_config(config)
    launch(_attention_kernel, attention_grid(B, H, Tq, block_sizes["BLOCK_M"]),
           q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
           H, Tq, Tk, scale * LOG2E, CAUSAL=causal, DOT_IN_FP32=dot_in_fp32(),
           PRECISION="tf32x3" if q.dtype == torch.float32 and not dot_in_fp32() else "ieee", HEAD_DIM=D,
           BLOCK_D=head_block(D),
           **block_sizes, **options)
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


def _expected(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["attention"](q, k, v, True, q.shape[3] ** -0.5)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_run(_run, arch, *_make_args(shape, dtype, "meta"), config=config)


TUNING = KernelTuning(backend="triton", kernel="attention", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected,
                      dtype_defaults={"float32": FP32_DEFAULT})
