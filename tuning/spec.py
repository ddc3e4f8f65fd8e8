"""What a kernel tells the tuner: its knobs, its candidates, and how to build, run and compile it.

Every kernel module of `looplm_triton/` and `looplm_tile/` defines one `TUNING = KernelTuning(...)`;
the tuner (`tuning.autotune`) and the tier-0 compile tests read them from there and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

Config = dict[str, Any]  # knob name -> value, e.g. {"BLOCK_N": 1024, "num_warps": 4}


@dataclass(frozen=True)
class KernelTuning:
    backend: str  # "triton" | "tile"
    kernel: str  # an op name of looplm.ops, or a kernel name within one
    default: Config  # used when no table entry applies
    space: Sequence[Config]  # the candidates the tuner times (the default among them)
    # shape: the kernel's shape key (a tuple of ints, documented by the kernel); returns the positional
    # args for `run`, on `device`, freshly allocated.
    make_args: Callable[[tuple, Any, Any], tuple]  # (shape, dtype, device) -> args
    run: Callable[..., Any]  # run(*args, config=config): one launch with an explicit config
    # Ahead-of-time compile for `arch` (e.g. "sm_90") without a GPU; returns resource use such as
    # {"shared_mem": bytes, "registers": n} and raises if the config cannot compile.
    compile: Callable[[tuple, Any, Config, str], dict]  # (shape, dtype, config, arch) -> resources
    shape_key: Callable[..., tuple] = None  # (*op args) -> shape tuple, to look a launch up
