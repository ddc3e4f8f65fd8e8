"""The backend registry: where each op of `looplm.ops` runs.

A backend is registered with two callables: `probe()`, cheap and import-free, says whether it can
run here and how (native on a GPU, interpreted or emulated on the CPU) or why not; `load()` imports
its kernels and returns a `Backend`. `get_backend(name)` probes, loads once and caches.

Two backends need no GPU: "torch" (`looplm.torch_ops`, PyTorch's own fast ops; the default) and
"reference" (`reference/`, the fp32 oracle every other backend is checked against).

Hybrid autograd is decided here and nowhere else: `Backend.op(name)` hands out the kernel unless
gradients are being recorded and the backend has no backward for that op, in which case it hands
out the "torch" backend's op, so training differentiates every loop at PyTorch's speed whatever
the backend.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from looplm.ops import OP_NAMES

MODES = ("native", "interpreted", "emulated")


@dataclass(frozen=True)
class Availability:
    available: bool
    mode: Optional[str] = None  # one of MODES when available
    reason: str = ""  # why not, when unavailable; a note (e.g. "CPU emulator") otherwise


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Mapping[str, Callable]
    mode: str = "native"
    device_type: Optional[str] = None  # the tensors' device type its kernels need; None: any
    differentiable: frozenset = field(default_factory=frozenset)  # ops with backward kernels

    def op(self, name: str) -> Callable:
        if torch.is_grad_enabled() and name not in self.differentiable:
            return _torch_ops()[name]
        return self.ops[name]

    def check_device(self, device: torch.device) -> None:
        if self.device_type is not None and device.type != self.device_type:
            raise BackendUnavailable(
                f"backend {self.name!r} runs {self.mode} on {self.device_type} tensors, but the model is on "
                f"{device}; move it with model.to({self.device_type!r}) or pick another backend")


class BackendUnavailable(RuntimeError):
    pass


_WARNED_HYBRID: set[str] = set()  # backends already warned about, once per process


def hybrid_ops(backend: Backend, context: str) -> list[str]:
    """The ops of `backend` that run on the "torch" backend now because gradients are enabled and it
    has no backward for them. Where that is a surprise (`context` says why: e.g. an eval-mode
    forward), warn once per backend, saying how to run its own kernels."""
    if not torch.is_grad_enabled():
        return []
    fallen = [name for name in OP_NAMES if name not in backend.differentiable]
    if fallen and backend.name not in _WARNED_HYBRID:
        _WARNED_HYBRID.add(backend.name)
        warnings.warn(f"backend {backend.name!r}: {context} but gradients are enabled, so its ops {fallen} run on "
                      "the 'torch' backend (hybrid autograd: the kernels have no backward); run inference under "
                      "torch.no_grad() or torch.inference_mode() to use its kernels", UserWarning, stacklevel=3)
    return fallen


@dataclass
class _Entry:
    probe: Callable[[], Availability]
    load: Callable[[], Backend]
    loaded: Optional[Backend] = None


_REGISTRY: dict[str, _Entry] = {}


def register_backend(name: str, probe: Callable[[], Availability], load: Callable[[], Backend]) -> None:
    """Register (or replace) a backend under `name`."""
    _REGISTRY[name] = _Entry(probe, load)


def available_backends() -> dict[str, Availability]:
    """Every registered backend with its availability here; never raises."""
    out = {}
    for name, entry in _REGISTRY.items():
        try:
            out[name] = entry.probe()
        except Exception as e:  # a broken probe must not hide the other backends
            out[name] = Availability(False, reason=f"probe failed: {type(e).__name__}: {e}")
    return out


def describe_backends() -> str:
    lines = []
    for name, a in available_backends().items():
        state = f"available ({a.mode}{': ' + a.reason if a.reason else ''})" if a.available else f"unavailable: {a.reason}"
        lines.append(f"  {name}: {state}")
    return "\n".join(lines)


def get_backend(name: str) -> Backend:
    """The loaded backend `name`; a clear error if it is unknown or cannot run here."""
    if isinstance(name, Backend):
        return name
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; registered backends:\n{describe_backends()}")
    entry = _REGISTRY[name]
    if entry.loaded is None:
        availability = entry.probe()
        if not availability.available:
            raise BackendUnavailable(
                f"backend {name!r} is unavailable here: {availability.reason}\nregistered backends:\n"
                f"{describe_backends()}")
        backend = entry.load()
        missing = [op for op in OP_NAMES if op not in backend.ops]
        if missing:
            raise BackendUnavailable(f"backend {name!r} does not implement ops {missing}")
        entry.loaded = backend
    return entry.loaded


def _reference_ops() -> Mapping[str, Callable]:
    from reference import OPS
    return OPS


def _torch_ops() -> Mapping[str, Callable]:
    from looplm.torch_ops import OPS
    return OPS


def _load_reference() -> Backend:
    return Backend("reference", _reference_ops(), mode="native", device_type=None, differentiable=frozenset(OP_NAMES))


def _load_torch() -> Backend:
    return Backend("torch", _torch_ops(), mode="native", device_type=None, differentiable=frozenset(OP_NAMES))


def _from_module(module: str, attr: str) -> Callable:
    """A callable that imports `module` only when called, so probing stays cheap."""
    def call():
        return getattr(importlib.import_module(module), attr)()
    return call


# The kernel backends and the packages that hold their kernels, one module per op (the tuner and the
# tier-0 resource table find each op's kernel and tuning there).
KERNEL_PACKAGES = {"triton": "looplm_triton", "tile": "looplm_tile"}
# Ops whose kernel lives in another op's module (it shares that module's tiles and epilogue).
KERNEL_MODULE_OF = {"layer_norm_linear": "linear"}


def kernel_ops(package: str) -> dict[str, Callable]:
    """The op set of a kernel package ("looplm_triton", "looplm_tile"): op `name` is
    `<package>.<module>.<name>` (the module is the op's own but for KERNEL_MODULE_OF). Each op whose
    module tunes it (a `KernelTuning` of that kernel name) runs the PyTorch op instead wherever this
    GPU's tuning table says PyTorch wins its bucket (`tuning.lookup.prefer_torch_where_tuned`)."""
    from tuning.lookup import prefer_torch_where_tuned
    from tuning.spec import KernelTuning

    ops = {}
    for name in OP_NAMES:
        module = importlib.import_module(f"{package}.{KERNEL_MODULE_OF.get(name, name)}")
        tuning = next((v for v in vars(module).values() if isinstance(v, KernelTuning) and v.kernel == name), None)
        ops[name] = prefer_torch_where_tuned(name, getattr(module, name), tuning)
    return ops


def cuda_problem(min_capability: tuple[int, int] = (8, 0)) -> Optional[str]:
    """Why kernels cannot run natively on this machine's GPU, or None if they can (for probes)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < min_capability:
        name = torch.cuda.get_device_name()
        return (f"{name} has compute capability {capability[0]}.{capability[1]}, "
                f"below the {min_capability[0]}.{min_capability[1]} needed")
    return None


register_backend("torch", probe=lambda: Availability(True, "native", "PyTorch ops"), load=_load_torch)
register_backend("reference", probe=lambda: Availability(True, "native", "fp32 oracle"), load=_load_reference)
for _name, _package in KERNEL_PACKAGES.items():
    register_backend(_name, probe=_from_module(_package, "probe"), load=_from_module(_package, "load"))

