"""cuTile (cuda.tile) kernels for the op set of `looplm.ops`, registered as backend "tile"."""
from __future__ import annotations

import importlib.util

from looplm.backends import Availability, Backend, cuda_problem


def probe() -> Availability:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.tile") is None:
        return Availability(False, reason="package 'cuda-tile' is not installed (pip install 'cuda-tile[tileiras]')")
    problem = cuda_problem((8, 0))
    if problem is None:
        return Availability(True, "native")
    return Availability(False, reason=f"{problem}")


def load() -> Backend:
    raise NotImplementedError("the cuTile kernels are not built yet")
