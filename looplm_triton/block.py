"""The tied pre-norm transformer block, forward, in seven launches (composed by `looplm.ops.kernel_block`):

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

from torch import Tensor

from looplm.ops import BlockWeights, kernel_block
from looplm_triton.attention import attention_into
from looplm_triton.linear import LAYER_NORM_LINEAR_TUNING, layer_norm_linear, linear


def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    return kernel_block(layer_norm_linear, attention_into, linear, x, weights, n_head, dropout_p)


# The block has no kernel of its own; its tuning entry is the fused LayerNorm + linear it adds.
TUNING = LAYER_NORM_LINEAR_TUNING
