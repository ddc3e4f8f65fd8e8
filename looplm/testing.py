"""What the tests share: tolerances per dtype (the one table every parity test and check imports),
where a backend's tests put their tensors (`device_for`), which dtypes it can be checked in here and
its skip, a counter of the host synchronisations a piece of code makes, and a torch.compile backend
that holds compiled code to a CUDA graph's rules on the CPU."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from looplm.backends import Backend, BackendUnavailable, get_backend

# (atol, rtol) for one op against the fp32 reference, inputs of unit scale.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Many ops in a row (a block, a loop, a model) compound rounding: this factor widens the table.
COMPOSED_FACTOR = 10.0


def tolerance(dtype: torch.dtype, composed: bool = False) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    scale = COMPOSED_FACTOR if composed else 1.0
    return dict(atol=atol * scale, rtol=rtol * scale)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, composed: bool = False,
                 msg: str = "") -> None:
    """Compare in fp32 with the tolerance of `dtype` (default: actual's dtype); NaN never passes."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.float(), expected.float(), equal_nan=False, msg=(lambda m: f"{msg}\n{m}") if msg
                               else None, **tolerance(dtype, composed))


# ---- where a backend's tests run

def device_for(backend: str | Backend) -> torch.device:
    """The device a test puts its tensors (and models) on for `backend` (a name or a Backend): the
    one its kernels need (CUDA for a native kernel backend, the CPU for Triton's interpreter or the
    cuTile emulator); for the PyTorch backends, which run anywhere, CUDA when there is one."""
    device_type = get_backend(backend).device_type
    if device_type is not None:
        return torch.device(device_type)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_problem(backend: str | Backend, dtype: torch.dtype, matmul: bool) -> str | None:
    """Why `backend` cannot be checked in `dtype` here, or None. Triton's interpreter computes
    `tl.dot` wrongly on bf16/fp16 operands (triton issue 11584): ops with a matmul are checked in
    those dtypes natively on a GPU; loads, stores and elementwise work are checked everywhere."""
    b = get_backend(backend)
    if matmul and b.name == "triton" and b.mode == "interpreted" and dtype != torch.float32:
        return (f"Triton's interpreter computes tl.dot wrongly on {dtype} operands (triton issue 11584); "
                "this case runs natively on a CUDA GPU")
    return None


def backend_or_skip(name: str) -> Backend:
    """The backend `name`, or a pytest skip saying why it is unavailable here (its documented error);
    anything else fails the test."""
    import pytest  # a test helper: the library itself does not need pytest

    try:
        return get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(f"backend {name!r}: {e}")


# ---- host synchronisation

def _sync_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
             "unique_dim", "unique_dim_consecutive", "item", "is_nonzero", "equal", "allclose")
    ops = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


class HostSyncCounter(TorchDispatchMode):
    """Records every op that reads device data on the host: a scalar read (`.item()`, `bool(t)`,
    `int(t)`), an op whose output shape depends on the data (`nonzero`, `masked_select`, `unique`,
    indexing with a boolean mask),
    and a copy of a tensor to host memory (`.cpu()`, `.tolist()`, `.numpy()`, whose data the host
    then reads). On a CUDA device each of these makes the host wait for the GPU; on the CPU the
    same calls are counted, so that a test on a CPU says where a GPU would wait.

        with HostSyncCounter() as syncs:
            model(idx)
        assert syncs.count == 0, syncs.ops

    Reads made by a kernel backend's own code (files under `looplm_triton/`, `looplm_tile/` or the
    `triton` package) are not counted: the Triton interpreter and the cuTile emulator read their
    tensors on the host by design, which the kernels on a GPU do not; so are reads inside
    `exclude()`. `nonzero_static` (a static shape) is not a read."""

    KERNEL_CODE = (f"{os.sep}looplm_triton{os.sep}", f"{os.sep}looplm_tile{os.sep}", f"{os.sep}triton{os.sep}")

    SYNC_OPS = _sync_ops()

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._excluded = 0
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return len(self.ops)

    def _record(self, name: str) -> None:
        if self._excluded or self._in_kernel_code():
            return
        self.ops.append(name)

    def _in_kernel_code(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in self.KERNEL_CODE):
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNC_OPS:
            self._record(str(func.overloadpacket.__name__))
        elif func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_) \
                and any(isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            self._record(f"{func.overloadpacket.__name__} with a boolean mask")  # x[mask]: a nonzero inside
        elif func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
            source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            target = kwargs.get("device") if func.overloadpacket is torch.ops.aten._to_copy else args[0].device
            if isinstance(source, Tensor) and source.device.type != "cpu" and target is not None \
                    and torch.device(target).type == "cpu":
                self._record(f"{func.overloadpacket.__name__} to host")
        return func(*args, **kwargs)

    def __enter__(self) -> "HostSyncCounter":
        # .numpy() and .tolist() hand the data to Python without an aten op (and .cpu() of a CPU
        # tensor is no copy): count them where they are called.
        for name in ("numpy", "tolist"):
            original = getattr(Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(_name)
                with self.exclude():
                    return _original(tensor, *args, **kwargs)
            setattr(Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def exclude(self) -> Iterator[None]:
        """Reads made inside this block are not counted."""
        self._excluded += 1
        try:
            yield
        finally:
            self._excluded -= 1


def count_host_syncs() -> HostSyncCounter:
    """A fresh HostSyncCounter, to use as a context manager."""
    return HostSyncCounter()


# ---- a CUDA graph's rules, on the CPU

class CudaGraphRuleBroken(AssertionError):
    """Compiled code broke a rule that a replayed CUDA graph imposes (see `cuda_graph_rules`)."""


def is_static_input(t: Tensor) -> bool:
    """Whether torch.compile takes t's address as fixed: a parameter, or a tensor that Dynamo marked
    (a module's buffers) or that `torch._dynamo.mark_static_address` marked (where it records it)."""
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


def cuda_graph_rules(graph: torch.fx.GraphModule, example_inputs: list) -> Callable[..., object]:
    """A torch.compile backend (`torch.compile(fn, backend=cuda_graph_rules)`) that runs the graph
    eagerly under the two rules a captured and replayed CUDA graph (`mode="reduce-overhead"`) sets
    for the code around it, so that code meant for one is checked on a machine without a GPU:

    - The outputs live at fixed addresses. Every call returns its new outputs in the same tensors,
      overwritten by the next call: a replay writes where the capture allocated, and cudagraph trees
      free a call's outputs when the next call begins. A caller that keeps an output past the next
      call must copy it out. (Outputs that alias an input are returned as they are.)
    - An input the graph writes to must be static (`is_static_input`). Inductor does not capture a
      graph that mutates any other input (`check_for_mutation` in torch._inductor.cudagraph_utils):
      it silently launches every kernel instead. Here the call raises `CudaGraphRuleBroken`. (A
      tensor made under torch.inference_mode keeps no version count: its writes are not seen.)
    """
    held: list[Tensor | None] = []

    def run(*args):
        versions = [a._version if isinstance(a, Tensor) and not a.is_inference() else None for a in args]
        outputs = graph(*args)
        for i, (a, version) in enumerate(zip(args, versions)):
            if version is not None and a._version != version and not is_static_input(a):
                raise CudaGraphRuleBroken(
                    f"the compiled graph writes to its input {i} ({tuple(a.shape)}, {a.dtype}), which is not "
                    "static: inductor would not capture it in a CUDA graph; mark it with "
                    "torch._dynamo.mark_static_address (or make it a buffer)")
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, Tensor)}
        single = isinstance(outputs, Tensor)
        fresh = [outputs] if single else list(outputs)
        if not held:
            held.extend(o.clone() if isinstance(o, Tensor) and o.untyped_storage().data_ptr() not in inputs else None
                        for o in fresh)
        for i, o in enumerate(fresh):
            if held[i] is not None:
                fresh[i] = held[i].copy_(o)
        return fresh[0] if single else type(outputs)(fresh)
    return run
