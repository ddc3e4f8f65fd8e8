from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from looplm.ops import ACTIVATIONS, check_tensors


def gelu(x: Tensor) -> Tensor:
    """The exact GELU, x * Phi(x), as nn.GELU() computes it."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensors("linear", x=x, weight=weight, bias=bias, residual=residual)
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu":
        y = gelu(y)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)
