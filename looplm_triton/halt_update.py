"""One halting step for N tokens, out of place, in one pass over memory.

Each program owns BLOCK_N tokens: it reads their active flag, step count, score and threshold,
decides who halts after this loop (step >= max_loops, or step >= min_loops and score < threshold),
writes the new flags and counts, then copies the state row by row in BLOCK_C chunks, reading for
each token only the row it keeps (h_new if active, h if halted). Every byte is read or written once.
Knobs: BLOCK_N, BLOCK_C, num_warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from looplm.ops import check_halt_update
from looplm_triton.common import compile_run, launch, launch_config, split_config
from tuning.spec import Config, KernelTuning


@triton.jit
def _halt_update_kernel(h_ptr, h_new_ptr, active_ptr, steps_ptr, score_ptr, threshold_ptr,
                        h_out_ptr, active_out_ptr, steps_out_ptr,
                        n_tokens, n_channels, stride_h, stride_h_new, stride_h_out, step, min_loops, max_loops,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_mask = tokens < n_tokens
    active = tl.load(active_ptr + tokens, mask=token_mask, other=0) != 0
    steps = tl.load(steps_ptr + tokens, mask=token_mask, other=0)
    score = tl.load(score_ptr + tokens, mask=token_mask, other=0.0).to(tl.float32)
    threshold = tl.load(threshold_ptr + tokens, mask=token_mask, other=0.0).to(tl.float32)

    sure = (score < threshold) & (step >= min_loops)
    halts = sure | (step >= max_loops)
    tl.store(steps_out_ptr + tokens, steps + active.to(tl.int32), mask=token_mask)
    tl.store(active_out_ptr + tokens, (active & ~halts).to(tl.uint8), mask=token_mask)

    rows = tokens.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, n_channels, BLOCK_C):
        mask = token_mask[:, None] & ((start + cols) < n_channels)[None, :]
        fresh = tl.load(h_new_ptr + rows * stride_h_new + start + cols[None, :], mask=mask & active[:, None])
        kept = tl.load(h_ptr + rows * stride_h + start + cols[None, :], mask=mask & ~active[:, None])
        tl.store(h_out_ptr + rows * stride_h_out + start + cols[None, :], tl.where(active[:, None], fresh, kept),
                 mask=mask)


# 16 rows x 512 columns over 8 warps: compiles without a spill for sm_80/90/100/120 in fp32, bf16
# and fp16 on every Triton of the supported range (8 rows over 4 warps spilled in fp32 on sm_80/90).
DEFAULT: Config = {"BLOCK_N": 16, "BLOCK_C": 512, "num_warps": 8}
INTERPRETER_CONFIG: Config = {"BLOCK_N": 128, "BLOCK_C": 1024, "num_warps": 4}
SPACE: list[Config] = [{"BLOCK_N": n, "BLOCK_C": c, "num_warps": w}
                       for n in (1, 2, 4, 8, 16, 32) for c in (128, 256, 512, 1024) for w in (1, 2, 4, 8)
                       if 512 <= n * c <= 16384]


def _launch(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor, step: int,
            min_loops: int, max_loops: int, config: Config) -> tuple[Tensor, Tensor, Tensor]:
    N, C = h.shape
    h, h_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (h, h_new))
    h_out = torch.empty((N, C), dtype=h.dtype, device=h.device)
    active_out = torch.empty(N, dtype=torch.bool, device=h.device)
    steps_out = torch.empty_like(steps)
    block_sizes, options = split_config(config)
    block_sizes["BLOCK_C"] = min(block_sizes["BLOCK_C"], triton.next_power_of_2(C))
    # bool tensors travel as bytes: one element type on every Triton version and in the interpreter
    launch(_halt_update_kernel, (triton.cdiv(N, block_sizes["BLOCK_N"]),), h, h_new,
           active.contiguous().view(torch.uint8), steps.contiguous(), score.contiguous(), threshold.contiguous(), h_out,
           active_out.view(torch.uint8), steps_out, N, C, h.stride(0), h_new.stride(0), h_out.stride(0), step,
           min_loops, max_loops, **block_sizes, **options)
    return h_out, active_out, steps_out


def halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    check_halt_update(h, h_new, active, steps, score, threshold)
    config = launch_config("halt_update", h.dtype, tuple(h.shape), DEFAULT, INTERPRETER_CONFIG)
    return _launch(h, h_new, active, steps, score, threshold, int(step), int(min_loops),
                   int(max_loops), config)


# ---- tuning: shape (N tokens, C channels)

def _shape_key(h: Tensor, *args, **kwargs) -> tuple:
    return tuple(h.shape)


def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    N, C = shape
    return (torch.randn(N, C, dtype=dtype, device=device), torch.randn(N, C, dtype=dtype, device=device),
            torch.rand(N, device=device) < 0.5, torch.randint(0, 4, (N,), dtype=torch.int32, device=device),
            torch.rand(N, device=device), torch.full((N,), 0.5, device=device))


def _run(h, h_new, active, steps, score, threshold, *, config: Config) -> tuple[Tensor, Tensor, Tensor]:
    return _launch(h, h_new, active, steps, score, threshold, 3, 1, 12, config)


def _expected(h, h_new, active, steps, score, threshold) -> tuple[Tensor, Tensor, Tensor]:
    from looplm import get_backend
    return get_backend("reference").ops["halt_update"](h, h_new, active, steps, score, threshold, 3, 1, 12)


def _compile(shape: tuple, dtype: torch.dtype, config: Config, arch: str) -> dict:
    return compile_run(_run, arch, *_make_args(shape, dtype, "meta"), config=config)


TUNING = KernelTuning(backend="triton", kernel="halt_update", default=DEFAULT, space=SPACE, make_args=_make_args,
                      run=_run, compile=_compile, shape_key=_shape_key, expected=_expected)
