from __future__ import annotations

import torch
from torch import Tensor


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    x = logits.float()
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    # 0 * log 0 is 0, also for a -inf logit, where log_p is -inf and the product would be NaN.
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)
    max_prob = p.amax(dim=-1)
    return entropy, max_prob
