"""The backend registry: where each op of `looplm.ops` runs.

A backend is registered with two callables: `probe()`, cheap and import-free, says whether it can
run here and how (native on a GPU, interpreted or emulated on the CPU) or why not; `load()` imports
its kernels and returns a `Backend`. `get_backend(name)` probes, loads once and caches.

Two backends need no GPU: "torch" (`looplm.torch_ops`, PyTorch's own fast ops; the default) and
"reference" (`reference/`, the fp32 oracle every other backend is checked against).

The kernel backends' ops are built here too (`kernel_ops`): each is its launcher when called and a
`torch.library` custom op when torch.compile traces it (`compilable`).

Hybrid autograd is decided here and nowhere else: `Backend.op(name)` hands out the kernel unless
gradients are being recorded and the backend has no backward for that op, in which case it hands
out the "torch" backend's op, so training differentiates every loop at PyTorch's speed whatever
the backend.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from looplm import ops as contract
from looplm.ops import FAKES, OP_NAMES, SIGNATURES

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
        """Op `name` as it runs now: the "torch" backend's while gradients are recorded and this
        backend has no backward for it (hybrid autograd), else this backend's. torch.compile traces
        this choice too (guarded on the grad mode): a compiled training step runs PyTorch's ops, a
        compiled forward under no_grad or inference_mode the kernels (`compilable`)."""
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
    GPU's tuning table says PyTorch wins its bucket (`tuning.lookup.prefer_torch_where_tuned`).
    Every op is `compilable`: its launcher when called, the custom op `<package>::<name>` when traced
    by torch.compile."""
    from tuning.lookup import prefer_torch_where_tuned
    from tuning.spec import KernelTuning

    ops = {}
    for name in OP_NAMES:
        module = importlib.import_module(f"{package}.{KERNEL_MODULE_OF.get(name, name)}")
        tuning = next((v for v in vars(module).values() if isinstance(v, KernelTuning) and v.kernel == name), None)
        ops[name] = compilable(package, name, prefer_torch_where_tuned(name, getattr(module, name), tuning))
    return ops


# ---- kernel ops under torch.compile

_LAUNCHERS: dict[str, Callable] = {}  # "looplm_triton::linear" -> the launcher its custom op runs


def compilable(namespace: str, name: str, launcher: Callable) -> Callable:
    """Op `name` of `looplm.ops` run by `launcher` (a kernel backend's host code), made traceable.

    Called eagerly it is `launcher` (one `torch.compiler.is_compiling()` check in front): the kernels
    are launch-latency bound, so an eager call pays no dispatcher. Traced by torch.compile it calls
    the custom op `namespace::name` instead (`torch.library.custom_op`; its fake implementation is
    the op's in `looplm.ops.FAKES`), so Dynamo and AOTAutograd see each kernel op as one graph node
    and never step into the launcher's Python, and on a GPU `mode="reduce-overhead"` can capture the
    launches in a CUDA graph. A `BlockWeights` argument (`block`) travels spread into its tensors.

    Inference only: no autograd formula is registered. With gradients enabled `Backend.op` hands out
    the "torch" backend's op for every op outside `Backend.differentiable` (all of them, for both
    kernel backends), so a compiled training step traces PyTorch's ops and never reaches these. A
    kernel that gains a backward must register it on its custom op (`register_autograd`) before it
    joins `differentiable`; until then its backward would fail.

    A custom op is defined once a process; building the op again (a test that replaces a launcher)
    points the custom op at the new launcher."""
    qualname = f"{namespace}::{name}"
    spread = _Spread(name)
    if qualname not in _LAUNCHERS:
        custom = torch.library.custom_op(qualname, lambda *flat: _LAUNCHERS[qualname](*spread.gather(flat)),
                                         mutates_args=(), schema=spread.schema())
        fake = FAKES[name]
        custom.register_fake(lambda *flat: fake(*spread.gather(flat)))
    _LAUNCHERS[qualname] = launcher
    traced_op = getattr(getattr(torch.ops, namespace), name)

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return traced_op(*spread.spread(args, kwargs))
        return launcher(*args, **kwargs)
    return run


class _Spread:
    """Op `name`'s arguments as a custom op takes them (tensors, optional tensors and scalars): every
    NamedTuple parameter (`BlockWeights`) spread into its fields, in place."""

    def __init__(self, name: str):
        self.name = name
        signature = SIGNATURES[name]
        hints = typing.get_type_hints(getattr(contract, name))
        self.parameters = [(p.name, p.default) for p in signature.parameters.values()]
        self.tuples = {p: hints[p] for p, _ in self.parameters if hasattr(hints[p], "_fields")}
        flat = []
        for p, default in self.parameters:
            if p in self.tuples:
                fields = typing.get_type_hints(self.tuples[p])
                flat += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=fields[f])
                         for f in self.tuples[p]._fields]
            else:
                flat.append(inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                              annotation=hints[p]))
        self.signature = inspect.Signature(flat, return_annotation=hints["return"])
        self.flat_defaults = [p.default for p in flat]

    def schema(self) -> str:
        def prototype(*args):
            raise NotImplementedError
        prototype.__signature__ = self.signature
        return torch.library.infer_schema(prototype, mutates_args=())

    def spread(self, args: tuple, kwargs: dict) -> list:
        """The call's arguments, positional, defaults filled in, tuples spread (written for Dynamo to
        trace: no `inspect` at call time)."""
        flat = list(args)
        for p, default in self.parameters[len(args):]:
            if p not in kwargs and default is inspect.Parameter.empty:
                raise TypeError(f"{self.name}: missing argument {p!r}")
            flat.append(kwargs.pop(p, default))
        if kwargs:
            raise TypeError(f"{self.name}: unexpected arguments {sorted(kwargs)}")
        for i in reversed(range(len(self.parameters))):
            if self.parameters[i][0] in self.tuples:
                flat[i:i + 1] = flat[i]
        return flat

    def gather(self, flat: tuple) -> list:
        """The inverse of `spread`: the op's own positional arguments. (The dispatcher leaves out
        trailing arguments that equal their defaults.)"""
        flat = (*flat, *self.flat_defaults[len(flat):])
        args, i = [], 0
        for p, _ in self.parameters:
            if p in self.tuples:
                n = len(self.tuples[p]._fields)
                args.append(self.tuples[p](*flat[i:i + n]))
                i += n
            else:
                args.append(flat[i])
                i += 1
        return args


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

