"""The tied pre-norm block on cuTile kernels: x + proj(attn(ln1(x))), then + mlp(ln2(x)).

What is fused:
- every bias, the exact GELU and both residual adds run in the epilogues of the linear kernel,
  on its fp32 accumulator, so no activation makes an extra round trip through memory;
- the attention kernel reads q, k and v as strided head views of the fused qkv projection
  (B, T, 3, H, D) and writes its heads straight into a (B, T, C) buffer: the split, the two
  head transposes and the merge of nanoGPT's block cost no copies;
- layer norm is its own kernel: fusing it into the next matmul's prologue would recompute each
  row's statistics once per output tile.

Seven launches per block: ln1, qkv, attention, proj(+residual), ln2, fc(+GELU), fc2(+residual).
There is no kernel of this file's own (hence no TUNING): each launch is tuned as its op.
With dropout_p > 0 (training without gradients) the residual adds move out of the epilogues so
that dropout acts on the branches, as in the Triton block; which backend runs is decided by the
model and the backend registry, never here.
"""
from torch import Tensor

from looplm.ops import BlockWeights, residual_branch
from looplm_tile.attention import attention_into
from looplm_tile.layer_norm import layer_norm
from looplm_tile.linear import linear



def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"block: dropout_p must be in [0, 1], got {dropout_p}")
    w = weights
    batch, seq, channels = x.shape
    if channels % n_head:
        raise ValueError(f"block: n_embd {channels} is not divisible by n_head {n_head}")
    head_dim = channels // n_head
    qkv = linear(layer_norm(x, w.ln1_w, w.ln1_b), w.attn_w, w.attn_b).view(batch, seq, 3, n_head, head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, no copies
    y = x.new_empty(batch, seq, n_head, head_dim)
    attention_into(q, k, v, y.transpose(1, 2), causal=True, scale=head_dim ** -0.5)
    x = residual_branch(linear, y.view(batch, seq, channels), w.proj_w, w.proj_b, x, dropout_p)
    hidden = linear(layer_norm(x, w.ln2_w, w.ln2_b), w.fc_w, w.fc_b, activation="gelu")
    return residual_branch(linear, hidden, w.fc2_w, w.fc2_b, x, dropout_p)
