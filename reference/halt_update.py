from __future__ import annotations

import torch
from torch import Tensor


def halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    h_out = torch.where(active[:, None], h_new, h)
    steps_out = steps + active.to(steps.dtype)
    sure = (score.float() < threshold.float()) & (step >= min_loops)
    halts = sure | (step >= max_loops)
    active_out = active & ~halts
    return h_out, active_out, steps_out
