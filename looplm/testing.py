"""What every parity test and check imports: tolerances per dtype (one table), and where a backend's
tests put their tensors (`device_for`), which dtypes it can be checked in here, and its skip."""
from __future__ import annotations

import torch
from torch import Tensor

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

def device_for(backend) -> torch.device:
    """The device a test puts its tensors (and models) on for `backend` (a name or a Backend): the
    one its kernels need (CUDA for a native kernel backend, the CPU for Triton's interpreter or the
    cuTile emulator); for the PyTorch backends, which run anywhere, CUDA when there is one."""
    from looplm.backends import get_backend
    device_type = get_backend(backend).device_type
    if device_type is not None:
        return torch.device(device_type)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_problem(backend, dtype: torch.dtype, matmul: bool) -> str | None:
    """Why `backend` cannot be checked in `dtype` here, or None. Triton's interpreter computes
    `tl.dot` wrongly on bf16/fp16 operands (triton issue 11584): ops with a matmul are checked in
    those dtypes natively on a GPU; loads, stores and elementwise work are checked everywhere."""
    from looplm.backends import get_backend
    b = get_backend(backend)
    if matmul and b.name == "triton" and b.mode == "interpreted" and dtype != torch.float32:
        return (f"Triton's interpreter computes tl.dot wrongly on {dtype} operands (triton issue 11584); "
                "this case runs natively on a CUDA GPU")
    return None


def backend_or_skip(name: str):
    """The backend `name`, or a pytest skip saying why it is unavailable here (its documented error);
    anything else fails the test."""
    import pytest

    from looplm.backends import BackendUnavailable, get_backend
    try:
        return get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(f"backend {name!r}: {e}")
