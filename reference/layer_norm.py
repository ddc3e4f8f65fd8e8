from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from looplm.ops import check_tensors


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    check_tensors("layer_norm", x=x, weight=weight, bias=bias)
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
