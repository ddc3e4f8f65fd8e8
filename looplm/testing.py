"""Tolerances per dtype, the one table every parity test and check imports."""
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
