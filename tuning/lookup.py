"""The launch-time answer to "which config for this call?", from the tables of this GPU.

Precedence, for (backend, kernel, dtype, bucket of the shape):
  1. an entry of a table measured on this very device (user directory first, then shipped tables);
  2. the nearest bucket of such a table;
  3. the same, from a table of another device with the same compute capability, i.e. the same
     architecture (an H100 without a table of its own runs on the H200's; one warning says so);
     a table of another architecture never applies;
  4. the kernel's built-in default (its architecture's own where it has one).
While launches are recorded for an ahead-of-time compile (`looplm.kernels.captured_launches(arch)`)
no table applies: the compile is for the architecture named there, not for this device, and takes
its defaults.
Each fallback is logged once (per-launch details at INFO). A table that is corrupt, of a newer
schema, or whose config does not have the kernel's knobs is skipped with a warning: a launch never
fails because of a table (a bug in the lookup itself is raised, not hidden). Tables are read once
per process and every answer is cached, since kernels ask on every launch. Where a table says the
PyTorch op beat every kernel configuration for a bucket, `runs_torch` says so and the kernel
backends call the PyTorch op there (`prefer_torch_where_tuned`).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from looplm.kernels import recording
from tuning import table as tables
from tuning.buckets import bucket, format_shape, nearest_bucket
from tuning.spec import TORCH_IMPL, Config, KernelTuning, is_torch

log = logging.getLogger("tuning")


@dataclass(frozen=True)
class Device:
    name: str
    capability: tuple[int, int]


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


# (backend, kernel, dtype) -> {bucket: config}, the first table listed winning a bucket. Where the
# PyTorch op won, the config is TORCH_IMPL plus, under "kernel", the fastest kernel configuration
# measured (for a launch that runs the kernel anyway, e.g. inside a fused block).
Index = dict[tuple[str, str, str], dict[tuple[int, ...], Config]]


def _winner(entry: dict) -> Config:
    best = entry["best"]["config"]
    if not is_torch(best):
        return best
    kernels = [r["config"] for r in entry.get("runners_up") or [] if not is_torch(r["config"])]
    return {**TORCH_IMPL, "kernel": kernels[0] if kernels else None}


def _index(loaded: Iterable[dict]) -> Index:
    index: Index = {}
    for table in loaded:
        for e in table["entries"]:
            if e.get("best") is not None:
                by_bucket = index.setdefault((e["backend"], e["kernel"], e["dtype"]), {})
                by_bucket.setdefault(tuple(e["bucket"]), _winner(e))
    return index


class ConfigLookup:
    """The tables that apply to `device`, indexed for lookups."""

    def __init__(self, device: Device, paths: Iterable[Path]):
        self.device = device
        own, kin = [], []
        for path in paths:
            try:
                table = tables.load(path)
            except tables.TableError as e:
                _log_once(logging.WARNING, f"{e}; ignoring it, kernels fall back to other tables or defaults")
                continue
            if table["device"]["name"] == device.name:
                own.append(table)
            elif tuple(table["device"]["capability"]) == tuple(device.capability):
                kin.append(table)
        self.own, self.kin = _index(own), _index(kin)
        # whether any bucket sends its launches to PyTorch: if none does, ops skip the question
        self.torch_wins = any(is_torch(c) for index in (self.own, self.kin) for by_bucket in index.values()
                              for c in by_bucket.values())
        self.kin_devices = sorted({t["device"]["name"] for t in kin})
        self._kin_told = not own  # without a table of its own, the warning below says it once
        if not own:
            major, minor = device.capability
            _log_once(logging.WARNING, f"no tuning table measured on {device.name}; kernels use "
                      + (f"tables of {', '.join(self.kin_devices)} (same capability {major}.{minor}) where they can, "
                         "else " if kin else "") + "built-in defaults (python -m tuning.autotune --gpu NAME tunes them)")

    def find(self, backend: str, kernel: str, dtype: str, shape: tuple, default: Optional[Config]) -> Optional[Config]:
        """The table config for this launch, or None for the default (None: configs of any knobs)."""
        want = bucket(shape)
        what = f"{backend}/{kernel} {dtype} {format_shape(shape)}"
        for index, source in ((self.own, f"the table of {self.device.name}"),
                              (self.kin, f"a table of {' / '.join(self.kin_devices)}, another GPU of the same "
                                         "compute capability")):
            by_bucket = {b: c for b, c in index.get((backend, kernel, dtype), {}).items()
                         if self._fits(c, default, what, b)}
            near = want if want in by_bucket else nearest_bucket(want, by_bucket)
            if near is None:
                continue
            if index is self.kin:
                self._warn_kin_once(source)
            if near == want:
                _log_once(logging.INFO, f"{what}: using the config from {source}")
            else:
                _log_once(logging.INFO, f"{what}: no entry for bucket {format_shape(want)}; using nearest bucket "
                          f"{format_shape(near)} from {source}")
            return by_bucket[near]
        if self.own or self.kin:
            _log_once(logging.INFO, f"{what}: not in the tuning tables; using the built-in default")
        return None

    def _warn_kin_once(self, source: str) -> None:
        """One warning per lookup when a table of another GPU of the same capability first fills a gap."""
        if not self._kin_told:
            self._kin_told = True
            _log_once(logging.WARNING, f"the table of {self.device.name} lacks some launches; they use {source}")

    @staticmethod
    def _fits(config: Config, default: Optional[Config], what: str, at: tuple) -> bool:
        if default is None or is_torch(config) or set(config) == set(default):
            return True
        _log_once(logging.WARNING, f"{what}: table config {config} for bucket {format_shape(at)} has knobs "
                  f"{sorted(config)}, but the kernel has {sorted(default)}; ignoring it (re-run the autotune)")
        return False


_cuda: Optional[bool] = None
_lookups: dict[int, Optional[ConfigLookup]] = {}
_answers: dict[tuple, Optional[Config]] = {}


def _cuda_available() -> bool:
    global _cuda
    if _cuda is None:
        _cuda = torch.cuda.is_available()
    return _cuda


def _device_info(index: int) -> Device:
    return Device(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def lookup_config(backend: str, kernel: str, dtype: Any, shape: tuple, default: Config) -> Config:
    """The launch configuration for this kernel call; `default` when no table applies.

    Without CUDA this is `default` at once. `shape` is the kernel's shape key; `dtype` a torch dtype
    or its name. Where the table says the PyTorch op wins this bucket, this is still a kernel
    configuration (the fastest one measured, else `default`): whether to launch the kernel at all is
    `runs_torch`'s answer. Do not mutate the returned dict.
    """
    config = _lookup(backend, kernel, dtype, shape, default)
    if is_torch(config):
        kernel_config = config.get("kernel")
        return kernel_config if kernel_config and set(kernel_config) == set(default) else default
    return config


def runs_torch(backend: str, kernel: str, dtype: Any, shape: tuple, device: Optional[int] = None) -> bool:
    """Whether the table of CUDA device `device` (an index; None: the current device) says the
    PyTorch op beats every configuration of the kernel for this launch's bucket (then the backend
    calls the "torch" backend's op instead)."""
    return is_torch(_lookup(backend, kernel, dtype, shape, None, device))


def _lookup(backend: str, kernel: str, dtype: Any, shape: tuple, default: Optional[Config],
            device: Optional[int] = None) -> Optional[Config]:
    """The table's config for a launch on CUDA device `device` (None: the current one; default
    None: any knobs), else `default`."""
    if not _cuda_available() or recording():
        return default
    index = torch.cuda.current_device() if device is None else device
    key = (index, backend, kernel, dtype, tuple(shape), None if default is None else tuple(sorted(default)))
    try:
        config = _answers[key]
    except KeyError:
        lookup = _device_lookup(index)
        config = None if lookup is None else lookup.find(backend, kernel, dtype_name(dtype), tuple(shape), default)
        _answers[key] = config
    return default if config is None else config


def _device_lookup(index: int) -> Optional[ConfigLookup]:
    """The tables of CUDA device `index`, loaded once; None if they cannot be read (warned once)."""
    lookup = _lookups.get(index)
    if lookup is None and index not in _lookups:
        try:
            lookup = ConfigLookup(_device_info(index), tables.table_paths())
        except (tables.TableError, OSError, RuntimeError) as e:  # an unreadable table or device: never stop a launch
            _log_once(logging.WARNING, f"tuning lookup failed ({type(e).__name__}: {e}); using built-in defaults")
        _lookups[index] = lookup
    return lookup


def reset() -> None:
    """Forget loaded tables and cached answers (after writing a table, or in tests)."""
    global _cuda
    _cuda = None
    _lookups.clear()
    _answers.clear()
    _logged.clear()


def prefer_torch_where_tuned(op: str, kernel_op: Callable, tuning: Optional[KernelTuning]) -> Callable:
    """`kernel_op` (a kernel backend's op `op`), sending each call whose bucket the table says PyTorch
    wins to the "torch" backend's op instead. The one place a backend "runs the winner". The table
    is that of the GPU the call's first tensor lives on (every op's first parameter is a tensor, and
    all of a call's tensors share its device); a call on CPU tensors runs the kernel (in its
    interpreter or emulator, which no table timed). On a machine without CUDA (or for an op without
    a tuning entry) this is `kernel_op` itself, so that a call there costs nothing more; on a GPU
    whose tables send no bucket to PyTorch, a call costs a device check and a dict lookup."""
    if tuning is None or tuning.shape_key is None or not _cuda_available():
        return kernel_op
    from looplm.ops import SIGNATURES
    from looplm.torch_ops import OPS as TORCH_OPS
    torch_op, signature = TORCH_OPS[op], SIGNATURES[op]
    first_name = next(iter(signature.parameters))

    def shape_of(args: tuple, kwargs: dict) -> tuple:
        try:  # a shape_key takes the op's own parameters, so the call's arguments as they came
            return tuning.shape_key(*args, **kwargs)
        except TypeError:  # one that needs every parameter positionally, as the tuner passes them
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return tuning.shape_key(*bound.args)

    @functools.wraps(kernel_op)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else kwargs[first_name]
        device = first.device
        if device.type == "cuda":
            lookup = _device_lookup(device.index)
            if lookup is not None and lookup.torch_wins:  # else no bucket of any kernel goes to PyTorch
                shape = tuple(int(d) for d in shape_of(args, kwargs))
                if runs_torch(tuning.backend, tuning.kernel, first.dtype, shape, device.index):
                    return torch_op(*args, **kwargs)
        return kernel_op(*args, **kwargs)
    return run
