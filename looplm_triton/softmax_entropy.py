"""Entropy and max probability of softmax over rows of logits, forward.

Each program owns BLOCK_M rows and walks the vocabulary in BLOCK_V chunks, so a 50k-wide row is
never held whole. It keeps, per row, the running max m, the running sum S = sum exp(x - m) and the
running W = sum exp(x - m) (x - m); when a chunk raises the max to m', both are rescaled by
exp(m - m') (W also shifts by S (m - m')). At the end, with p = exp(x - m) / S:

    entropy = -sum p log p = log S - W / S,      max probability = 1 / S.

All in fp32 whatever the logits' dtype; exp(x - m) <= 1 keeps any magnitude finite, and zero
probabilities (including -inf logits) contribute 0, never 0 * inf. The shift is the running max
itself (0 only while a row has seen nothing but -inf), so a first chunk of -inf logits changes
nothing. On a GPU each exponential is one `ex2.approx.ftz` (e^x = 2^(x log2 e)). Knobs: BLOCK_M
(one row per program by default), BLOCK_V, num_warps (BLOCK_V is capped at the vocabulary rounded
up to a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_kernel_dtype
from looplm_triton.common import LOG2E_CONST, compile_run, dot_in_fp32, fast_exp2, launch, launch_config, split_config
from tuning.spec import Config, KernelTuning


@triton.jit
def _softmax_entropy_kernel(logits_ptr, entropy_ptr, max_prob_ptr, n_rows, n_cols, stride_row,
                            FTZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)  # S
    weighted = tl.zeros((BLOCK_M,), dtype=tl.float32)  # W
    for start in range(0, n_cols, BLOCK_V):
        mask = row_mask[:, None] & ((start + cols) < n_cols)[None, :]
        x = tl.load(row_ptrs + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows of only -inf so far (or padding)
        rescale = fast_exp2((running_max - shift) * LOG2E_CONST, FTZ)
        max_change = tl.where(total > 0.0, running_max - shift, 0.0)
        weighted = rescale * (weighted + total * max_change)
        total = rescale * total
        centred = x - shift[:, None]
        e = fast_exp2(centred * LOG2E_CONST, FTZ)
        total += tl.sum(e, axis=1)
        weighted += tl.sum(e * tl.where(e > 0.0, centred, 0.0), axis=1)
        running_max = new_max

    safe_total = tl.where(total > 0.0, total, 1.0)
    tl.store(entropy_ptr + rows, tl.log(safe_total) - weighted / safe_total, mask=row_mask)
    tl.store(max_prob_ptr + rows, 1.0 / safe_total, mask=row_mask)


# One row per program, its chunks spread over all the program's warps (Liger-Kernel's layout).
DEFAULT: Config = {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 8}
INTERPRETER_CONFIG: Config = {"BLOCK_M": 16, "BLOCK_V": 8192, "num_warps": 4}
# Small vocabularies (65 characters) want many rows per program: those configs stay in the space.
SPACE: list[Config] = [{"BLOCK_M": m, "BLOCK_V": v, "num_warps": w}
                       for m in (1, 2, 4, 8, 16) for v in (128, 256, 512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16)
                       if 512 <= m * v <= 16384 and not (m > 1 and w == 16)]


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
           rows.stride(0), FTZ=not dot_in_fp32(), **block_sizes, **options)
    return entropy.view(logits.shape[:-1]), max_prob.view(logits.shape[:-1])


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    check_kernel_dtype("softmax_entropy", "logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"softmax_entropy: logits must be (..., V) with V >= 1, got {tuple(logits.shape)}")
    config = launch_config("softmax_entropy", logits.dtype, _shape_key(logits), DEFAULT, INTERPRETER_CONFIG)
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
