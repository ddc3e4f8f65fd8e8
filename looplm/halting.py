"""Halting measures shared by the loop engine (looplm.engine) and the analysis tools."""
from __future__ import annotations

import torch
from torch import Tensor


def relative_change(h: Tensor, h_new: Tensor, eps: float = 1e-6) -> Tensor:
    """||h_new - h|| / max(||h||, ||h_new||) per token, (B, T, C) -> (B, T) float32, in [0, 2].
    The larger norm in the denominator keeps the first loop from a zero state at 1, not infinity."""
    h, h_new = h.float(), h_new.float()
    norm = torch.linalg.vector_norm
    return norm(h_new - h, dim=-1) / torch.maximum(norm(h, dim=-1), norm(h_new, dim=-1)).clamp(min=eps)
