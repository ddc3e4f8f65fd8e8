"""The tied pre-norm block on cuTile kernels: x + proj(attn(ln1(x))), then + mlp(ln2(x)).

What is fused:
- every bias, the exact GELU and both residual adds run in the epilogues of the linear kernel,
  on its fp32 accumulator, so no activation makes an extra round trip through memory;
- the attention kernel reads q, k and v as strided head views of the fused qkv projection
  (B, T, 3, H, D) and writes its heads straight into a (B, T, C) buffer: the split, the two
  head transposes and the merge of nanoGPT's block cost no copies;
- layer norm is its own kernel: fusing it into the next matmul's prologue would recompute each
  row's statistics once per output tile.

Seven launches per block: ln1, qkv, attention, proj(+residual), ln2, fc(+GELU), fc2(+residual),
composed by `looplm.ops.kernel_block` as the Triton block is.
There is no kernel of this file's own (hence no TUNING): each launch is tuned as its op.
With dropout_p > 0 (training without gradients) the residual adds move out of the epilogues so
that dropout acts on the branches, as in the Triton block; which backend runs is decided by the
model and the backend registry, never here.
"""
from torch import Tensor

from looplm.ops import BlockWeights, kernel_block
from looplm_tile.attention import attention_into
from looplm_tile.linear import layer_norm_linear, linear


def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    return kernel_block(layer_norm_linear, attention_into, linear, x, weights, n_head, dropout_p)
