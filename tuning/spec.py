"""What a kernel tells the tuner: its knobs, its candidates, and how to build, run and compile it.

Every kernel module of `looplm_triton/` and `looplm_tile/` defines one `TUNING = KernelTuning(...)`;
the tuner (`tuning.autotune`) and the tier-0 compile tests read them from there and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

Config = dict[str, Any]  # knob name -> value, e.g. {"BLOCK_N": 1024, "num_warps": 4}

# The candidate "run the PyTorch op instead" (the "torch" backend's, looplm.torch_ops): the tuner times
# it beside every kernel's configurations, and a table entry it wins sends that bucket's launches to
# PyTorch, so that a tuned GPU never runs a kernel slower than PyTorch there.
TORCH_IMPL: Config = {"impl": "torch"}


def is_torch(config: Optional[Config]) -> bool:
    """Whether `config` is the PyTorch-op candidate rather than a kernel configuration."""
    return bool(config) and config.get("impl") == "torch"


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
    # Ahead-of-time compile for `arch` (e.g. "sm_90") without a GPU, specialised as a launch at `shape`
    # would be; returns resource use such as {"shared_mem": bytes, "registers": n, "stack": bytes,
    # "local_mem": bytes, "spill_stores": bytes} and raises if the config cannot compile. Optional
    # "threads" (per block; else 32 * config["num_warps"] when known) lets the tuner check registers
    # per block and compute occupancy (tuning.gpus).
    compile: Callable[[tuple, Any, Config, str], dict]  # (shape, dtype, config, arch) -> resources
    # (*op args) -> shape tuple, to look a launch up. The tuner calls it with the op's arguments as meta
    # tensors (shapes only, no data), all positional, to learn the shapes the shipped models launch.
    shape_key: Callable[..., tuple] = None
    # expected(*args): the "reference" backend's output for `run`'s arguments, what every candidate's
    # output is checked against before it is timed. A kernel without one cannot be tuned.
    expected: Callable[..., Any] = None
    # Defaults of their own for some dtypes, by name ("float32": {...}), and for some architectures, by
    # compile target ("sm_90": {...}; these win); the rest take `default`.
    dtype_defaults: Mapping[str, Config] = None
    arch_defaults: Mapping[str, Config] = None

    def default_for(self, dtype: Any, arch: Optional[str] = None) -> Config:
        """The built-in configuration of launches in `dtype` (a torch dtype or its name) on `arch`."""
        if arch is not None and arch in (self.arch_defaults or {}):
            return self.arch_defaults[arch]
        name = str(dtype).removeprefix("torch.")
        return (self.dtype_defaults or {}).get(name, self.default)

    def defaults(self) -> list[Config]:
        """Every built-in default, the general one first."""
        out = [self.default]
        for config in [*(self.dtype_defaults or {}).values(), *(self.arch_defaults or {}).values()]:
            if config not in out:
                out.append(config)
        return out


def candidate_errors() -> tuple[type[BaseException], ...]:
    """What compiling or running one candidate config may legitimately raise, so that the tuner
    records it as that candidate's failure: the toolchains' own errors (Triton's TritonError,
    cuTile's TileError), RuntimeError (CUDA errors, out of memory, the compile worker) and
    ValueError (a shape the config cannot take). Anything else is a bug and is raised."""
    errors: list[type[BaseException]] = [RuntimeError, ValueError, MemoryError]
    try:
        from triton.errors import TritonError
        errors.append(TritonError)
    except ImportError:
        pass
    try:
        from cuda.tile import TileError
        errors.append(TileError)
    except ImportError:
        pass
    return tuple(errors)
