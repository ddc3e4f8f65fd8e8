"""cuTile (cuda.tile) kernels for the op set of `looplm.ops`, registered as backend "tile".

Natively on a CUDA GPU of capability 8.0+. Without one, the same kernels run in the project's
CPU emulator (`looplm_tile.emulator`): the backend is available in mode "emulated" on CPU
tensors, warns once that it is slow and meant for testing, and gives the kernels' numerics,
not their speed. Each op is one module (layer_norm, linear, attention, softmax_entropy,
halt_update, block); none has a backward kernel, so training uses the "torch" backend's ops
(hybrid autograd, `looplm.backends`).
"""
from __future__ import annotations

import importlib.util

from looplm.backends import Availability, Backend, cuda_problem, kernel_ops

KERNEL_MODULES = ("layer_norm", "linear", "attention", "softmax_entropy", "halt_update")


def probe() -> Availability:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.tile") is None:
        return Availability(False, reason="package 'cuda-tile' is not installed (pip install 'cuda-tile[tileiras]')")
    problem = cuda_problem((8, 0))
    if problem is None:
        return Availability(True, "native")
    return Availability(True, "emulated", f"CPU emulator, slow, for testing ({problem})")


def load() -> Backend:
    ops = kernel_ops("looplm_tile")
    native = probe().mode == "native"
    return Backend("tile", ops, mode="native" if native else "emulated", device_type="cuda" if native else "cpu")
