"""How a benchmark case picks its backend, times its work and records what it did.

Every case ends in `measure(benchmark, fn, info)`: one untimed warm-up call (JIT compilation,
autotuning, the caching allocator) when timing for real, then pytest-benchmark's own calibrated
rounds of `fn`, synchronised with the GPU so that a round covers the work and not just its launch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest
import torch

from bench.schema import CaseInfo
from looplm import LoopConfig, available_backends, get_backend
from looplm.backends import Backend, BackendUnavailable

KERNEL_BACKENDS = ("triton", "tile")
GPU_ONLY = "needs a CUDA device: the shapes are sized for a GPU and the kernel backends run natively only there"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_ONLY)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def backend_or_skip(name: str) -> Backend:
    """The registry backend `name` when it runs natively here; otherwise skip the case, saying why.
    Interpreted and emulated runs are correctness tools, never timed."""
    availability = available_backends().get(name)
    if availability is None:
        pytest.skip(f"backend {name!r} is not registered")
    if not availability.available:
        pytest.skip(f"backend {name!r} is unavailable: {availability.reason}")
    if availability.mode != "native":
        pytest.skip(f"backend {name!r} runs {availability.mode} here ({availability.reason}); "
                    "only native runs are benchmarked")
    try:
        return get_backend(name)
    except BackendUnavailable as error:  # anything else (a failed build, a CUDA error) fails the case
        pytest.skip(f"backend {name!r} did not load: {error}")


def assert_mixed_halting(notes: dict, config: LoopConfig) -> None:
    """A halt-on case measures a mixed batch: after calibration (bench.workloads.calibrate_halting)
    some tokens stop at min_loops and the others think to the budget, n_loops."""
    assert notes["loops_run"] == config.n_loops and config.min_loops < notes["mean_steps"] < config.n_loops, \
        f"calibrated halting did not mix early and late tokens: {notes}"


def compile_or_skip(benchmark, fn: Callable) -> Callable:
    """torch.compile(fn) when timing for real; a single untimed shot would be all compile time."""
    if not benchmark.enabled:
        pytest.skip("torch.compile cases run only when benchmarking (--benchmark-only or --benchmark-enable)")
    return torch.compile(fn)


@contextlib.contextmanager
def skip_out_of_memory() -> Iterator[None]:
    """A shape too large for this GPU (a naive baseline at T=4096, say) is a skip, not a failure."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory: {str(error).splitlines()[0]}")


def _synchronized(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def measure(benchmark, fn: Callable[[], Any], info: CaseInfo) -> Any:
    """Time `fn()` (no arguments) with pytest-benchmark and record `info` for the report."""
    benchmark.extra_info.update(info.to_extra_info())
    benchmark.group = f"{info.suite}: {info.case} {info.dtype}"
    if torch.cuda.is_available():
        fn = _synchronized(fn)
    with skip_out_of_memory():
        if benchmark.enabled:
            fn()
        return benchmark(fn)
