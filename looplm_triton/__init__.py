"""Triton kernels for the op set of `looplm.ops`, registered as backend "triton".

Natively on a CUDA GPU of capability 8.0+; on a CPU machine in Triton's interpreter when
TRITON_INTERPRET=1 was set before triton was imported.
"""
from __future__ import annotations

import importlib.util
import os

from looplm.backends import Availability, Backend, cuda_problem


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
    raise NotImplementedError("the Triton kernels are not built yet")
