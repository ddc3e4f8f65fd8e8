"""The tied pre-norm transformer block, forward, in seven launches:

    qkv = ln_1 + c_attn             layer_norm_linear: per-row statistics, then the QKV matmul
                                    normalising x as it loads it, + bias
    y   = attention(q, k, v)        flash attention reading heads straight from qkv by strides and
                                    writing (B, T, C) directly (no split, transpose or copy)
    x   = x + c_proj(y)             linear: bias and residual add in the epilogue
    hid = gelu(ln_2 + c_fc)         layer_norm_linear: statistics, then the matmul, bias + GELU
    out = x + mlp.c_proj(hid)       linear: bias and residual add in the epilogue

Neither normalised activation ever goes to memory. With dropout_p > 0 (training without
gradients) the residual adds move out of the epilogues so dropout can act on the branches.
Tuning: this module's entry is the LayerNorm + linear matmul (`layer_norm_linear`, tuned separately
from the plain linear); the statistics pass is the layer_norm kernel's, attention and linear are
tuned under their own ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from looplm.ops import BlockWeights, residual_branch, check_kernel_dtype, check_tensors
from looplm_triton.attention import attention_into
from looplm_triton.linear import LAYER_NORM_LINEAR_TUNING, layer_norm_linear, linear



def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    check_kernel_dtype("block", "x", x)
    check_tensors("block", x=x, **weights._asdict())
    if x.dim() != 3 or x.shape[2] % n_head:
        raise ValueError(f"block: x must be (B, T, C) with C divisible by n_head={n_head}, got {tuple(x.shape)}")
    w = weights
    B, T, C = x.shape
    D = C // n_head
    qkv = layer_norm_linear(x, w.ln1_w, w.ln1_b, w.attn_w, w.attn_b)  # (B, T, 3C)
    q, k, v = qkv.view(B, T, 3, n_head, D).permute(2, 0, 3, 1, 4)  # three (B, H, T, D) strided views
    y = torch.empty_like(x)
    attention_into(q, k, v, y.view(B, T, n_head, D).transpose(1, 2), True, D ** -0.5)
    x = residual_branch(linear, y, w.proj_w, w.proj_b, x, dropout_p)
    hidden = layer_norm_linear(x, w.ln2_w, w.ln2_b, w.fc_w, w.fc_b, activation="gelu")  # (B, T, 4C)
    return residual_branch(linear, hidden, w.fc2_w, w.fc2_b, x, dropout_p)


# The block has no kernel of its own; its tuning entry is the fused LayerNorm + linear it adds.
TUNING = LAYER_NORM_LINEAR_TUNING
