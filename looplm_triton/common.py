"""What every Triton kernel module shares: how a launch gets its configuration, and the dtype
names Triton uses.

Under Triton's interpreter (TRITON_INTERPRET=1, no GPU) a launch uses the module's one interpreter
configuration: big blocks, because each program instance costs milliseconds there, and `tl.dot`
operands are upcast to fp32 (the interpreter's bf16 dot is wrong, triton issue 11584).
"""
from __future__ import annotations

import os
from typing import Any

import torch

import tuning
from looplm_triton.aot import LAUNCH_KNOBS
from tuning.spec import Config

BACKEND = "triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.uint8: "u8", torch.int64: "i64"}


def pointer(dtype: torch.dtype) -> str:
    """Triton's signature type of a pointer to `dtype` elements, e.g. '*bf16'."""
    return "*" + _TRITON_TYPES[dtype]


def launch_config(kernel: str, dtype: torch.dtype, shape: tuple, default: Config, interpreted: Config) -> Config:
    """The configuration of one launch: the tuning table's (or `default`) on a GPU, `interpreted`
    in the interpreter, where timings of a GPU do not apply."""
    if INTERPRETED:
        return interpreted
    return tuning.lookup_config(BACKEND, kernel, dtype, shape, default)


def split_config(config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constexpr block sizes, launch options) of a configuration."""
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_KNOBS}
    options = {k: v for k, v in config.items() if k in LAUNCH_KNOBS}
    return constexprs, options
