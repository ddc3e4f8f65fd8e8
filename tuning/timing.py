"""GPU timers: one launch function in, its median time in milliseconds out.

Triton kernels are timed by `triton.testing.do_bench`. cuTile kernels by CUDA events in the same way
(warm-up, L2 flushed before each launch, median): `cuda.tile.tune.exhaustive_search` times a raw
kernel from its grid and arguments, while the tuner times a kernel's host launcher, the call users make.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

Timer = Callable[[Callable[[], Any]], float]

WARMUP_MS = 25
REP_MS = 100
L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of every GPU in tuning.gpus


def triton_median(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def cuda_event_median(fn: Callable[[], Any], warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS) -> float:
    fn()
    torch.cuda.synchronize()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_reps = max(1, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


TIMERS: dict[str, Timer] = {"triton": triton_median, "tile": cuda_event_median}
