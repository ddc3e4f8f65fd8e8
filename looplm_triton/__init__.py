"""Triton kernels for the op set of `looplm.ops`, registered as backend "triton".

Natively on a CUDA GPU of capability 8.0+; on a CPU machine in Triton's interpreter when
TRITON_INTERPRET=1 was set before triton was imported.
"""
from __future__ import annotations

import importlib.util
import os

from looplm.backends import Availability, Backend, cuda_problem, kernel_ops


def probe() -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, reason="package 'triton' is not installed (pip install triton)")
    problem = cuda_problem((8, 0))
    if problem is None:
        return Availability(True, "native")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return Availability(True, "interpreted", f"Triton interpreter on the CPU ({problem})")
    return Availability(False, reason=f"{problem}; set TRITON_INTERPRET=1 before importing triton to run "
                                      "the kernels in Triton's CPU interpreter")


def load() -> Backend:
    """The kernels, one module per op of `looplm.ops`. None has a backward kernel yet, so training
    differentiates through the "torch" backend's ops (see `looplm.backends`)."""
    ops = kernel_ops("looplm_triton")
    mode = probe().mode
    return Backend(name="triton", ops=ops, mode=mode, device_type="cuda" if mode == "native" else "cpu",
                   differentiable=frozenset())


# Every kernel module, for the tuner and the tier-0 compile tests: each defines TUNING.
KERNEL_MODULES = tuple(f"looplm_triton.{name}" for name in
                       ("layer_norm", "linear", "attention", "softmax_entropy", "halt_update", "block"))
