from __future__ import annotations

from typing import Optional

from torch import Tensor

from reference.layer_norm import layer_norm
from reference.linear import linear


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                      bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    """The composition itself: the oracle keeps the normalised x at full precision in between."""
    return linear(layer_norm(x.float(), norm_weight.float(), None if norm_bias is None else norm_bias.float(), eps),
                  weight.float(), None if bias is None else bias.float(), activation).to(x.dtype)
