from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from looplm.ops import check_key_len, check_tensors


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              key_len: Optional[Tensor] = None) -> Tensor:
    check_tensors("attention", q=q, k=k, v=v)
    check_key_len("attention", q, k, key_len)
    B, Tq, Tk, D = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    held = torch.full((B,), Tk, device=q.device) if key_len is None else key_len.long()  # keys per batch row
    key = torch.arange(Tk, device=q.device)
    filled = key < held[:, None]  # (B, Tk): the places past a row's keys are never read
    k, v = (t.float().masked_fill(~filled[:, None, :, None], 0.0) for t in (k, v))
    scores = (q.float() @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    visible = filled[:, None, :].expand(B, Tq, Tk)  # (B, Tq, Tk)
    if causal:
        q_pos = torch.arange(Tq, device=q.device)[None, :, None] + (held[:, None, None] - Tq)
        visible = visible & (key <= q_pos)
    visible = visible[:, None]  # (B, 1, Tq, Tk)
    # A row that sees no key gets zero weights instead of softmax's 0/0.
    row_sees_a_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~row_sees_a_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * row_sees_a_key
    return (weights @ v).to(q.dtype)
