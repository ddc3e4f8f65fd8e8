"""The "torch" backend: the op set of `looplm.ops` as PyTorch computes it at its best.

`F.layer_norm`, `F.linear` with the exact `F.gelu` (on a CPU, by the faster of its two kernels),
and `F.scaled_dot_product_attention` (which picks the flash, memory-efficient or math kernel for
the device). Every op keeps its input's dtype and follows autocast and `torch.compile` as the
functional ops do; the fp32 oracle that the kernels and this backend are checked against is
`reference/` (backend "reference").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from looplm.ops import ACTIVATIONS, OP_NAMES, BlockWeights, check_key_len, residual_branch


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


# PyTorch computes the exact GELU of a contiguous fp32 or bf16 CPU tensor with oneDNN, whose cost
# per call (7 us for one 512-wide row, 17 us inside a decode step) dwarfs a small tensor's work;
# ATen's own vectorised kernel is then several times faster (1 us). From about 25k elements
# oneDNN is the faster of the two (82 us against 139 for 512 x 512), so it keeps those.
ATEN_GELU_BELOW = 16384


def gelu(x: Tensor) -> Tensor:
    """The exact GELU, by the faster of PyTorch's two CPU kernels for x's size (the same function)."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.numel() >= ATEN_GELU_BELOW \
            or not torch.backends.mkldnn.enabled:
        return F.gelu(x)
    # The oneDNN switch is PyTorch's public way to choose; it is process-wide, so it is off for
    # this call only (another thread's op in that microsecond takes ATen's kernel for the same
    # function, rounded its way), and a user's own "off" is left alone above.
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(x)
    finally:
        torch.backends.mkldnn.enabled = True


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = gelu(y)
    return y if residual is None else residual + y


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                      bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    return linear(layer_norm(x, norm_weight, norm_bias, eps), weight, bias, activation)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              key_len: Optional[Tensor] = None) -> Tensor:
    Tq, Tk = q.size(-2), k.size(-2)
    if key_len is not None:  # a mask from the lengths on the device: what a compiled decode step reads
        check_key_len("attention", q, k, key_len)
        places, held = torch.arange(Tk, device=q.device), key_len.view(-1, 1, 1, 1)
        seen = places < held
        # the places past a row's keys are never read: a masked NaN score stays NaN, and 0 x inf is NaN
        k, v = (t.masked_fill(~seen.view(-1, 1, Tk, 1), 0.0) for t in (k, v))
        if causal:  # query i of row b sits at key_len[b] - Tq + i
            seen = seen & (places <= held - Tq + torch.arange(Tq, device=q.device).view(1, 1, -1, 1))
        else:
            seen = seen.expand(-1, 1, Tq, -1)  # (B, 1, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)
        return out.masked_fill(~seen.any(-1, keepdim=True), 0.0)  # a row that sees no key: zeros, not NaN
    if not causal or Tq == 1:  # a single query sits at the last position and sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq < Tk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    # Tq > Tk: the first Tq - Tk queries see no key and return zeros; the rest are square-causal.
    seen = F.scaled_dot_product_attention(q[..., Tq - Tk:, :], k, v, is_causal=True, scale=scale)
    return F.pad(seen, (0, 0, Tq - Tk, 0))


def entropy_of(log_p: Tensor, p: Tensor) -> Tensor:
    """-sum p log p over the last dim, with 0 log 0 = 0: the clamp makes a -inf log-probability
    finite (its p is 0). xlogy says the same but is 20x slower on a CPU, where it is not vectorised."""
    return -(p * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(dim=-1)


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    return entropy_of(log_p, p), p.amax(dim=-1)


def halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    # Four kernels a loop (eager on a GPU, each is a launch): a NaN score is not below its threshold,
    # so its token runs on; int32 + bool stays int32.
    if step >= max_loops:
        still_active = torch.zeros_like(active)
    elif step >= min_loops:
        still_active = torch.where(score < threshold, False, active)
    else:
        still_active = active.clone()
    return torch.where(active[:, None], h_new, h), still_active, steps + active


def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    w = weights
    B, T, C = x.shape
    qkv = layer_norm_linear(x, w.ln1_w, w.ln1_b, w.attn_w, w.attn_b)  # (B, T, 3C)
    q, k, v = qkv.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # three (B, H, T, D)
    y = attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, C)
    x = residual_branch(linear, y, w.proj_w, w.proj_b, x, dropout_p)
    hidden = layer_norm_linear(x, w.ln2_w, w.ln2_b, w.fc_w, w.fc_b, activation="gelu")  # (B, T, 4C)
    return residual_branch(linear, hidden, w.fc2_w, w.fc2_b, x, dropout_p)


OPS = {name: globals()[name] for name in OP_NAMES}  # the op set of looplm.ops, by name
