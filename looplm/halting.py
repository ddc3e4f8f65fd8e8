"""Halting measures shared by the loop engine (looplm.engine) and the analysis tools."""
from __future__ import annotations

import torch
from torch import Tensor


def relative_change(h: Tensor, h_new: Tensor, eps: float = 1e-6) -> Tensor:
    """||h_new - h|| / max(||h||, ||h_new||) per token, (B, T, C) -> (B, T) float32, in [0, 2].
    The larger norm in the denominator keeps the first loop from a zero state at 1, not infinity."""
    h, h_new = h.float(), h_new.float()
    scale = torch.maximum(h.norm(dim=-1), h_new.norm(dim=-1)).clamp(min=eps)
    return (h_new - h).norm(dim=-1) / scale
