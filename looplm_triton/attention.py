"""Causal flash attention, forward.

Each program owns BLOCK_M queries of one (batch, head) and streams the keys and values past them in
BLOCK_N blocks, keeping the running row max, the running softmax denominator and the unnormalised
output in fp32 (online softmax in base 2: the scale, folded into log2 units, is applied once to the
block's row max and fused into the exponent), so the Tq x Tk score matrix never exists (Triton
tutorial 06). Causal masking is aligned bottom-right: query i sits at key position Tk - Tq + i.
Key blocks wholly in the past of every query of the program run unmasked; only the diagonal band
(and a ragged last block) pays for the compare and select, and blocks wholly in the future are
never loaded. A row that sees no key keeps a zero denominator and returns zeros, not 0/0.

key_len (optional, (B,) int32 on the device) serves a static decode cache: K and V hold Tk
places of which batch row b has filled its first key_len[b]. Each program loads its row's length
and takes it for Tk everywhere (the loop bounds, the masks, the causal alignment), so a row visits
only its own keys. The places past them may hold anything, NaN included: the pointer path masks
its loads at the length; the descriptor path, whose copy engine reads a block up to the cache's
end, zeroes the values past it (their scores are masked, but a zero weight times NaN is NaN). The
length never reaches the host, so a compiled or captured decode step replays one launch as it
grows. HAS_KEY_LEN is a compile-time flag and the unused pointer is None: a launch without key_len
compiles to the same PTX as before key_len existed.

fp32 inputs multiply as three TF32 products (tf32x3: fp32 accuracy on the tensor cores; exact
fp32 dots on CUDA cores spill at any useful tile). The head size is a compile-time constant
(padded to a power of two, at least 16, the dot minimum; no mask along it when it is one). On a
GPU exp2 is one `ex2.approx.ftz` instruction. Programs run on one grid axis, (query block, batch x
head) flattened (CUDA caps grid axes 1 and 2 at 65535, which B x H may exceed), in the causal order
of `looplm.kernels` (`attention_program`): heads in sections whose keys and values fit in L2
(`attention_section`), and within a section longest first: every head's heaviest (latest) query
block, then every head's next one. Head by head (each head's blocks heaviest first) leaves the
last wave ragged where B x H is small: a list-scheduling simulation on 132 SMs (`python -m
bench.roofline --causal-order`, cost = keys read) puts its makespan at 1.26x the ideal for 64
heads at T = 1024 with 128 x 128 tiles and 1.07x at T = 4096, against 1.03x and 1.01x in
sections. The sections pack within 2% of longest first across all heads at every shape of issue
20, which would keep every head's K and V live at once (384 MiB at 384 heads of T = 4096, far past
an H200's 50 MB of L2); the sections keep at most 32 MiB live.

Two load paths, one algorithm (`_online_softmax_step`), chosen per launch by
`use_tensor_descriptors(capability, q, k, v, out)`, a plain function of the GPU's compute capability
and the tensors:
- Tensor descriptors (TMA), on sm_90, for bf16/fp16 tensors whose first element and
  strides (all but the last, which must be 1) are 16-byte aligned, as tutorial 06 does on Hopper:
  the copy engine moves each Q, K, V tile into shared memory asynchronously (`cp.async.bulk.tensor`,
  pipelined over num_stages with mbarriers, no address arithmetic in the threads) and stores the
  output tile. The descriptors are 4-D, (B, H, T, D) with the views' own strides and (1, 1, rows,
  BLOCK_D) blocks, so a head read straight out of the fused QKV projection needs no copy, and the
  copy engine zero-fills rows past T and columns past D on a load and drops them on a store: no
  load or store carries a mask. They are host-side `TensorDescriptor`s, passed by value as kernel
  parameters, rather than built in the kernel with `tl.make_tensor_descriptor`: that one writes a
  128-byte descriptor to global scratch in every program and needs a process-wide allocator
  (`triton.set_allocator`), which a library cannot set without taking it from its user; the host
  encodes four descriptors per launch instead.
- Pointers everywhere else (sm_80, sm_100, sm_120, fp32, views TMA cannot address, the interpreter
  unless asked): q, k, v and the output are addressed through their strides, masked at the edges.
  sm_100 compiles the descriptor kernel but spills at some head sizes (see TMA_MAJORS).

Knobs: BLOCK_M, BLOCK_N, num_warps, num_stages (both paths take the same configuration); without
a tuning table the tiles follow the sequence length, head size and architecture (`default_config`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.kernels import attention_section, head_kv_bytes
from looplm.ops import check_kernel_dtype, check_key_len, check_tensors
from looplm_triton.common import (LOG2E, compile_run, dot_in_fp32, fast_exp2, launch, launch_config, make_descriptor,
                                  split_config, target_arch, target_capability, tma_addressable)
from tuning.spec import Config, KernelTuning

MAX_HEAD_SIZE = 256


@triton.jit
def _key_range(start_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the key blocks every query of the block sees whole, end of the keys it visits)."""
    if CAUSAL:
        # Keys 0 .. start_m + Tk - Tq are visible to every query of this block: whole blocks of them
        # run unmasked; the band up to the last query's last key is masked.
        unmasked_end = tl.maximum(tl.minimum(start_m + Tk - Tq + 1, Tk), 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(Tk, start_m + BLOCK_M + Tk - Tq), 0)
    else:
        unmasked_end = Tk // BLOCK_N * BLOCK_N
        end = Tk
    return unmasked_end, end


@triton.jit
def _keys_held(key_len_ptr, batch, Tk, HAS_KEY_LEN: tl.constexpr):
    """The keys batch row `batch` holds: its key_len, loaded on the device, else all Tk."""
    if HAS_KEY_LEN:
        return tl.load(key_len_ptr + batch)
    return Tk


@triton.jit
def _block_coordinates(n_heads, batch_heads, section, Tq, BLOCK_M: tl.constexpr):
    """(batch, head, first query) of this program. One grid axis, in `looplm.kernels`'s causal order
    (`attention_program`): heads in sections of `section`, each section's heaviest (latest) query
    blocks first across its heads."""
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(Tq, BLOCK_M)
    per_section = section * m_blocks
    first_head = pid // per_section * section
    in_section = pid % per_section
    heads_here = tl.minimum(section, batch_heads - first_head)
    batch_head = first_head + in_section % heads_here
    start_m = (m_blocks - 1 - in_section // heads_here) * BLOCK_M
    return batch_head // n_heads, batch_head % n_heads, start_m


@triton.jit
def _online_softmax_step(acc, row_max, row_sum, q, k, v, cols, key_pos, Tk, qk_scale_log2, MASKED: tl.constexpr,
                         CAUSAL: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of keys `k` and values `v` (key positions `cols`) into the running state."""
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
    return _online_softmax_step(acc, row_max, row_sum, q, k, v, cols, key_pos, Tk, qk_scale_log2, MASKED, CAUSAL,
                                DOT_IN_FP32, PRECISION)


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, key_len_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                      n_heads, batch_heads, section, Tq, Tk, qk_scale_log2,
                      CAUSAL: tl.constexpr, HAS_KEY_LEN: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    batch, head, start_m = _block_coordinates(n_heads, batch_heads, section, Tq, BLOCK_M)
    Tk = _keys_held(key_len_ptr, batch, Tk, HAS_KEY_LEN)
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
    unmasked_end, end = _key_range(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
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


@triton.jit
def _attention_tma_kernel(q_desc, k_desc, v_desc, o_desc, key_len_ptr, n_heads, batch_heads, section, Tq, Tk,
                          qk_scale_log2, CAUSAL: tl.constexpr, HAS_KEY_LEN: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # The descriptors are 4-D, (B, H, T, D) with the views' own strides, blocks (1, 1, rows, BLOCK_D):
    # the copy engine zero-fills rows past T and columns past D on a load and drops them on a store,
    # so no load or store here needs a mask.
    batch, head, start_m = _block_coordinates(n_heads, batch_heads, section, Tq, BLOCK_M)
    Tk = _keys_held(key_len_ptr, batch, Tk, HAS_KEY_LEN)
    q = q_desc.load([batch, head, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    key_pos = start_m + tl.arange(0, BLOCK_M) + (Tk - Tq)  # the last key each query may see

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    unmasked_end, end = _key_range(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, unmasked_end, BLOCK_N):
        k = k_desc.load([batch, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([batch, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, q, k, v, start_n + offs_n, key_pos, Tk,
                                                     qk_scale_log2, False, CAUSAL, DOT_IN_FP32, PRECISION)
    for start_n in range(unmasked_end, end, BLOCK_N):
        k = k_desc.load([batch, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([batch, head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        if HAS_KEY_LEN:  # the copy engine reads a cache's places up to its end, past this row's keys
            v = tl.where((start_n + offs_n < Tk)[:, None], v, 0.0)
        acc, row_max, row_sum = _online_softmax_step(acc, row_max, row_sum, q, k, v, start_n + offs_n, key_pos, Tk,
                                                     qk_scale_log2, True, CAUSAL, DOT_IN_FP32, PRECISION)

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    o_desc.store([batch, head, start_m, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))


# Tiles by sequence length and head size (`default_config`). Short sequences (the model's T = 256)
# want small query blocks: 128-row blocks leave B x H x 2 programs, fewer than two per SM of an
# H200, where 64 x 32 with 8 warps and 3 stages ran 2.7x faster than 128 x 64 (measured, bf16,
# 16x6x256x256x64). Long ones take the large tiles of Triton tutorial 06 on Hopper (8 warps only
# with 128 x 128, its rule) or, at head size 128, 128 x 64 (128 x 128 needs 230 KiB of stages);
# sm_100's pointer kernel spills 16 bytes at 128 x 64, head size 64, under Triton 3.6, so it takes
# 64 x 64 with 4 warps there. Each was compiled for its architecture under Triton 3.6 and 3.9
# without a spill.
SHORT: Config = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
# A decode step (a few queries over a static cache): a 16-row query block, the dot's minimum, so that a
# single query does not pay for 64 rows of scores. 16 x 32 with 4 warps and 2 stages compiles for
# sm_80/90/100/120 at head sizes 64 and 128 without a spill under Triton 3.6 and 3.9 (64-120
# registers); 16 x 64 spills 4 bytes on sm_120 under 3.6.
DECODE: Config = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
DECODE_T = 16
DEFAULT: Config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
LONG: dict[tuple[str, int], Config] = {  # (arch, largest head size) -> tiles for T > SHORT_T
    ("sm_90", 64): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    ("sm_90", 256): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    ("sm_100", 64): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    ("sm_100", 256): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}
SHORT_T = 512
# fp32 (tf32x3: three products per dot) needs smaller tiles to stay out of local memory.
FP32_DEFAULT: Config = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
SPACE: list[Config] = [{"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                       for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
                       if bn <= bm and not (bm == 32 and w == 8)]
SPACE += [config for config in (FP32_DEFAULT, DECODE) if config not in SPACE]


def default_config(Tq: int, D: int, dtype: torch.dtype, arch: Optional[str]) -> Config:
    """The built-in tiles of a launch with Tq queries of head size D on `arch` ("sm_90"; None:
    no GPU): DECODE up to DECODE_T queries, SHORT up to SHORT_T, else the architecture's LONG tiles
    for the head size, else DEFAULT; fp32 always FP32_DEFAULT (its tf32x3 dots spill at DECODE's
    four warps)."""
    if dtype == torch.float32:
        return FP32_DEFAULT
    if Tq <= DECODE_T:
        return DECODE
    if Tq <= SHORT_T:
        return SHORT
    for (target, max_d), config in LONG.items():
        if target == arch and D <= max_d:
            return config
    return DEFAULT


def attention_grid(batch: int, heads: int, Tq: int, block_m: int) -> tuple[int]:
    """Programs of one launch, all on grid axis 0 (up to 2^31 - 1 blocks): B x H may exceed the
    65535 of axes 1 and 2."""
    return (triton.cdiv(Tq, block_m) * batch * heads,)


def head_block(D: int) -> int:
    """The head size padded to a power of two, at least 16 (the dot minimum)."""
    return max(16, triton.next_power_of_2(D))


# ---- the load path: tensor descriptors (TMA) or pointers

# sm_90 (H100/H200). sm_80 has no TMA. sm_100 compiles the descriptor kernel, but with the default
# configuration it spills (16 to 36 bytes) at head sizes 32 and 128, where its pointer path does not;
# sm_120's small shared memory suits the pointer path's default. Both keep pointers.
TMA_MAJORS = (9,)


def use_tensor_descriptors(capability: Optional[tuple[int, int]], *tensors: Tensor) -> bool:
    """Whether a launch on a GPU of compute `capability` ((major, minor); None where no GPU runs it,
    as in the interpreter) loads and stores `tensors` through tensor descriptors (TMA): on sm_90, for
    16-bit tensors that are all `tma_compatible`; otherwise the pointer path, which takes any strides.
    fp32 keeps pointers: its tf32x3 dots spill with descriptors at its sm_90 default."""
    return capability is not None and capability[0] in TMA_MAJORS and tma_addressable(*tensors)


def attention_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, causal: bool, scale: float,
                   config: Optional[Config] = None, tensor_descriptors: Optional[bool] = None,
                   key_len: Optional[Tensor] = None) -> Tensor:
    """Attention of (B, H, T, D) views of any strides (unit stride along D), written into `out`;
    `config` defaults to the tuned one for this shape, `tensor_descriptors` (the load path) to
    `use_tensor_descriptors` for the device; `key_len` as `looplm.ops.attention` takes it."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if config is None:
        config = launch_config("attention", q.dtype, (B, H, Tq, Tk, D),
                               default_config(Tq, D, q.dtype, target_arch(q.device)), INTERPRETER_CONFIG)
    if B * H * Tq == 0:
        return out
    if tensor_descriptors is None:
        tensor_descriptors = use_tensor_descriptors(target_capability(q.device), q, k, v, out)
    block_sizes, options = split_config(config)
    block_d = head_block(D)
    grid = attention_grid(B, H, Tq, block_sizes["BLOCK_M"])
    order = (B * H, attention_section(B * H, head_kv_bytes(Tk, D, k.element_size())))  # (heads, per section)
    common = dict(CAUSAL=causal, HAS_KEY_LEN=key_len is not None, DOT_IN_FP32=dot_in_fp32(),
                  PRECISION="tf32x3" if q.dtype == torch.float32 and not dot_in_fp32() else "ieee",
                  BLOCK_D=block_d, **block_sizes, **options)
    # Without key_len its pointer is None: a constexpr the kernel never reads, no argument at all.
    key_len = key_len if key_len is None else key_len.contiguous()  # the kernel reads key_len[b] at b
    if tensor_descriptors:  # (1, 1, rows, block_d) blocks of the (B, H, T, D) views; columns past D read as zeros
        block_m, block_n = block_sizes["BLOCK_M"], block_sizes["BLOCK_N"]
        q_desc, k_desc, v_desc, o_desc = (make_descriptor(t, [1, 1, rows, block_d], "attention")
                                          for t, rows in ((q, block_m), (k, block_n), (v, block_n), (out, block_m)))
        launch(_attention_tma_kernel, grid, q_desc, k_desc, v_desc, o_desc, key_len, H, *order, Tq, Tk,
               scale * LOG2E, **common)
    else:
        launch(_attention_kernel, grid, q, k, v, out, key_len, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
               *out.stride()[:3], H, *order, Tq, Tk, scale * LOG2E, HEAD_DIM=D, **common)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              key_len: Optional[Tensor] = None) -> Tensor:
    check_tensors("attention", q=q, k=k, v=v)
    check_kernel_dtype("attention", "q", q)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q must be (B, H, Tq, D) and k, v (B, H, Tk, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_SIZE:
        raise ValueError(f"attention: head size {q.shape[3]} exceeds the {MAX_HEAD_SIZE} this kernel supports")
    check_key_len("attention", q, k, key_len)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[3] ** -0.5 if scale is None else scale
    return attention_into(q, k, v, torch.empty_like(q, memory_format=torch.contiguous_format), causal, scale,
                          key_len=key_len)


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


def compile_variant(shape: tuple, dtype: torch.dtype, config: Config, arch: str,
                    tensor_descriptors: Optional[bool] = None, key_len: bool = False) -> dict:
    """Resources of the launch at `shape` for `arch`, on the load path the launcher picks there
    (`tensor_descriptors=None`) or the one given (False: the pointer path views TMA cannot take use),
    with a key_len per batch row (a decode step over a static cache) or without."""
    q, k, v = _make_args(shape, dtype, "meta")
    lengths = torch.empty(shape[0], dtype=torch.int32, device="meta") if key_len else None
    return compile_run(attention_into, arch, q, k, v, torch.empty_like(q), True, shape[4] ** -0.5, config,
                       tensor_descriptors, lengths)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_variant(shape, dtype, config, arch)


# The tuner's yardstick is the shipped model's launch (T = 256): SHORT on every architecture.
TUNING = KernelTuning(backend="triton", kernel="attention", default=SHORT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected,
                      dtype_defaults={"float32": FP32_DEFAULT})
