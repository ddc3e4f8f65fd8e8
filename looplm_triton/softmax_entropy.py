"""Entropy and max probability of softmax over rows of logits, forward, in one pass.

Each program owns BLOCK_M rows and walks the vocabulary in BLOCK_V chunks, so a 50k-wide row is
never held whole. The online softmax runs element-wise: every lane (column of the chunk) keeps its
own running max m, sum S = sum e^(y - m) and W = sum e^(y - m) (y - m) over the logits y it has
seen, and folds a new logit in with one exponential and no communication:

    y > m:  d = m - y,  S <- e^d S + 1,   W <- e^d (W + S d),   m <- y
    else:   d = y - m,  S <- S + e^d,     W <- W + e^d d

so the loop over the vocabulary is loads and arithmetic only, with no cross-thread reduction (and
no barrier) between one chunk's loads and the next. After the loop the lanes of a row are combined
once, shifted to the row's max M: S = sum_lanes e^(m - M) S_lane, W = sum_lanes e^(m - M) (W_lane +
S_lane (m - M)); then, with p = e^(y - M) / S,

    entropy = -sum p ln p = ln S - W / S,      max probability = 1 / S.

The differences y - m are taken in the logits' own units before the exponential's scale (e^d =
2^(d log2 e)), so logits far from 0 (1e4) lose nothing to rounding. All in fp32 whatever the
logits' dtype; e^(y - m) <= 1 keeps any magnitude finite, and zero probabilities (including -inf
logits and padding) contribute 0, never 0 * inf: a -inf logit is skipped (its d is -inf, its
weight 0), and a lane that has seen only -inf keeps m = -inf and S = 0. On a GPU each exponential
is one `ex2.approx.ftz`. Loads are 16-byte vectors (8 bf16 logits) per thread. Knobs: BLOCK_M,
BLOCK_V, num_warps (BLOCK_V is capped at the vocabulary rounded up to a power of two); without a
tuning table they follow the vocabulary (`default_config`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype
from looplm_triton.common import (LOG2E_CONST, compile_run, dot_in_fp32, fast_exp2, launch, launch_config, split_config,
                                  target_capability)
from tuning.spec import Config, KernelTuning


@triton.jit
def _softmax_entropy_kernel(logits_ptr, entropy_ptr, max_prob_ptr, n_rows, n_cols, stride_row,
                            FTZ: tl.constexpr, LOAD_STAGES: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)

    # Per lane: running max m, S = sum e^(y - m), W = sum e^(y - m) (y - m).
    lane_max = tl.full((BLOCK_M, BLOCK_V), float("-inf"), dtype=tl.float32)
    lane_sum = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    lane_weighted = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for start in tl.range(0, n_cols, BLOCK_V, num_stages=LOAD_STAGES):
        mask = row_mask[:, None] & ((start + cols) < n_cols)[None, :]
        y = tl.load(row_ptrs + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        grows = y > lane_max
        # d <= 0: the new max's distance below the old one, or the logit's below the max; -inf for
        # a -inf logit (whose weight is then 0), also where the lane's max is still -inf.
        d = tl.where(y == float("-inf"), float("-inf"), tl.where(grows, lane_max - y, y - lane_max))
        e = fast_exp2(d * LOG2E_CONST, FTZ)
        e_d = tl.where(e > 0.0, e * d, 0.0)
        s_d = tl.where(lane_sum > 0.0, lane_sum * d, 0.0)
        lane_weighted = tl.where(grows, e * (lane_weighted + s_d), lane_weighted + e_d)
        lane_sum = tl.where(grows, e * lane_sum + 1.0, lane_sum + e)
        lane_max = tl.where(grows, y, lane_max)

    # Combine each row's lanes once, shifted to the row's max (0 for a row of only -inf).
    row_max = tl.max(lane_max, axis=1)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    offset = lane_max - shift[:, None]  # <= 0, -inf for an empty lane
    scale = fast_exp2(offset * LOG2E_CONST, FTZ)
    total = tl.sum(scale * lane_sum, axis=1)
    weighted = tl.sum(scale * (lane_weighted + tl.where(lane_sum > 0.0, lane_sum * offset, 0.0)), axis=1)

    safe_total = tl.where(total > 0.0, total, 1.0)
    tl.store(entropy_ptr + rows, tl.log(safe_total) - weighted / safe_total, mask=row_mask)
    tl.store(max_prob_ptr + rows, 1.0 / safe_total, mask=row_mask)


# Small vocabularies (65 characters) want many rows per program: those configs stay in the space.
SPACE: list[Config] = [{"BLOCK_M": m, "BLOCK_V": v, "num_warps": w}
                       for m in (1, 2, 4, 8, 16) for v in (128, 256, 512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16)
                       if 512 <= m * v <= 16384 and not (m > 1 and w == 16)]
INTERPRETER_CONFIG: Config = {"BLOCK_M": 16, "BLOCK_V": 8192, "num_warps": 4}
# Chunks fetched ahead into shared memory (cp.async) while the lanes fold in the current one, so
# the bytes in flight live in shared memory rather than registers: on sm_90 and sm_100 (2: one chunk
# ahead). Elsewhere plain loads: sm_120's code spills 8 bytes with the prefetch under Triton 3.6.
LOAD_STAGES = {9: 2, 10: 2}
ELEMENTS_PER_PROGRAM = 4096  # a chunk: 8 KiB of bf16 logits in flight per program
ELEMENTS_PER_THREAD = 16  # two 16-byte vectors of bf16 per thread and chunk; 3 x 16 fp32 of lane state


def default_config(V: int) -> Config:
    """Rows, chunk and warps for a vocabulary of V, without a tuning table: chunks of up to
    ELEMENTS_PER_PROGRAM logits (one row's, 4096 of 50304; or 16 rows of a 65-wide vocabulary, so a
    small vocabulary still fills whole 16-byte vectors and several rows are in flight), spread
    ELEMENTS_PER_THREAD to a thread over 1 to 8 warps."""
    block_v = min(ELEMENTS_PER_PROGRAM, triton.next_power_of_2(V))
    rows = max(1, min(16, ELEMENTS_PER_PROGRAM // block_v))
    warps = max(2, min(8, rows * block_v // (32 * ELEMENTS_PER_THREAD)))
    return {"BLOCK_M": rows, "BLOCK_V": block_v, "num_warps": warps}


DEFAULT: Config = default_config(50304)  # the GPT-2 vocabulary: one row per program, 4096-wide chunks


def load_stages(device: torch.device) -> int:
    """LOAD_STAGES of the GPU a launch on `device` compiles for (1: no prefetch; also without a GPU)."""
    capability = target_capability(device)
    return 1 if capability is None else LOAD_STAGES.get(capability[0], 1)


def _launch(logits: Tensor, config: Config) -> tuple[Tensor, Tensor]:
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    N = rows.shape[0]
    entropy = torch.empty(N, dtype=torch.float32, device=logits.device)
    max_prob = torch.empty(N, dtype=torch.float32, device=logits.device)
    block_sizes, options = split_config(config)
    block_sizes["BLOCK_V"] = min(block_sizes["BLOCK_V"], triton.next_power_of_2(V))
    launch(_softmax_entropy_kernel, (triton.cdiv(N, block_sizes["BLOCK_M"]),), rows, entropy, max_prob, N, V,
           rows.stride(0), FTZ=not dot_in_fp32(), LOAD_STAGES=load_stages(logits.device), **block_sizes, **options)
    return entropy.view(logits.shape[:-1]), max_prob.view(logits.shape[:-1])


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    check_kernel_dtype("softmax_entropy", "logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"softmax_entropy: logits must be (..., V) with V >= 1, got {tuple(logits.shape)}")
    config = launch_config("softmax_entropy", logits.dtype, _shape_key(logits), default_config(logits.shape[-1]),
                           INTERPRETER_CONFIG)
    return _launch(logits, config)


# ---- tuning: shape (N rows, V vocabulary)

def _shape_key(logits: Tensor) -> tuple:
    return (logits.numel() // logits.shape[-1], logits.shape[-1])


def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    N, V = shape
    return (torch.randn(N, V, dtype=dtype, device=device) * 4,)


def _run(logits: Tensor, *, config: Config) -> tuple[Tensor, Tensor]:
    return _launch(logits, config)


def _expected(logits: Tensor) -> tuple[Tensor, Tensor]:
    from looplm import get_backend
    return get_backend("reference").ops["softmax_entropy"](logits)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_run(_run, arch, *_make_args(shape, dtype, "meta"), config=config)


TUNING = KernelTuning(backend="triton", kernel="softmax_entropy", default=DEFAULT, space=SPACE,
                      make_args=_make_args, run=_run, compile=_compile, shape_key=_shape_key, expected=_expected)
