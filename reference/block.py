from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from looplm.ops import BlockWeights
from reference.attention import attention
from reference.layer_norm import layer_norm
from reference.linear import linear


def _residual_linear(x: Tensor, weight: Tensor, bias, residual: Tensor, dropout_p: float) -> Tensor:
    """residual + dropout(x @ weight.T + bias); without dropout the add is the linear's fused epilogue."""
    if dropout_p > 0:
        return residual + F.dropout(linear(x, weight, bias), p=dropout_p)
    return linear(x, weight, bias, residual=residual)


def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    w = weights
    B, T, C = x.shape
    qkv = linear(layer_norm(x, w.ln1_w, w.ln1_b), w.attn_w, w.attn_b)  # (B, T, 3C)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, C)
    x = _residual_linear(y, w.proj_w, w.proj_b, x, dropout_p)
    hidden = linear(layer_norm(x, w.ln2_w, w.ln2_b), w.fc_w, w.fc_b, activation="gelu")  # (B, T, 4C)
    return _residual_linear(hidden, w.fc2_w, w.fc2_b, x, dropout_p)
