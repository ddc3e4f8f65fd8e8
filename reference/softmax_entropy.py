from __future__ import annotations

import torch
from torch import Tensor


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    x = logits.float()
    log_p = torch.log_softmax(x, dim=-1)
    p = log_p.exp()
    # 0 * log 0 is 0: where p underflows, log_p is finite (log_softmax), so the product is 0.
    entropy = -(p * log_p).sum(dim=-1)
    max_prob = p.amax(dim=-1)
    return entropy, max_prob
