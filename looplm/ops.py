"""The op set: one signature per op, shared by the reference and every kernel backend.

A backend is a mapping from these names to callables with exactly these signatures
(`tests/test_registry.py` checks it). `FAKES` says what each op returns from its arguments' shapes
and dtypes alone (what torch.compile traces a kernel op with). Shapes use B batch, T tokens,
C channels, H heads, D head size, V vocabulary, N rows (any leading dims flattened).

Halting convention: a token halts when `score < threshold`. Criteria whose natural reading is
"higher means surer" (max probability, a learned gate) are negated by the model before they
reach `halt_update`, so every backend implements one comparison.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

ACTIVATIONS = ("none", "gelu")


class BlockWeights(NamedTuple):
    """The weights of one pre-norm transformer block, nanoGPT layout (Linear weights are (out, in))."""

    ln1_w: Tensor  # (C,)
    ln1_b: Optional[Tensor]  # (C,)
    attn_w: Tensor  # (3C, C)
    attn_b: Optional[Tensor]  # (3C,)
    proj_w: Tensor  # (C, C)
    proj_b: Optional[Tensor]  # (C,)
    ln2_w: Tensor  # (C,)
    ln2_b: Optional[Tensor]  # (C,)
    fc_w: Tensor  # (4C, C)
    fc_b: Optional[Tensor]  # (4C,)
    fc2_w: Tensor  # (C, 4C)
    fc2_b: Optional[Tensor]  # (C,)


# The signatures. Bodies are never called: they document the contract and are compared, by
# parameter names, kinds and defaults, against every registered backend's callables.

def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Normalise the last dim of x (..., C); returns x's dtype."""
    raise NotImplementedError


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    """act(x @ weight.T + bias) + residual for x (..., K), weight (N, K); activation in ACTIVATIONS
    (gelu is the exact erf form)."""
    raise NotImplementedError


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                      bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    """act(layer_norm(x) @ weight.T + bias) for x (..., K): the block's LN1 + QKV and LN2 + fc, one op so
    that a backend can fuse the normalisation into the matmul and every caller (the block, the
    loop engine's per-row path) gets the fused kernel."""
    raise NotImplementedError


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              key_len: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale) v for q (B, H, Tq, D), k and v (B, H, Tk, D); scale defaults to D**-0.5.
    Causal masking is aligned bottom-right: query i sits at position Tk - Tq + i, so a cached decode
    step (Tq=1) sees every key. A query row with no visible key (Tq > Tk) returns zeros, never NaN.

    key_len (B,) int32 on q's device, each in 0 .. Tk: batch row b holds only its first key_len[b]
    keys (a preallocated cache of Tk places, filled so far; the rest are never read, and never read
    by the host either: a compiled or captured decode step passes a length that lives on the device).
    It stands for Tk in everything above: query i of row b sits at key_len[b] - Tq + i."""
    raise NotImplementedError


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """For logits (..., V): the entropy of softmax(logits) in nats and its max probability, both
    (...,) float32."""
    raise NotImplementedError


def halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    """One halting step for N tokens after loop `step` (1-based), out of place.

    h, h_new (N, C) of one dtype (float32, float16 or bfloat16: the model's state); active (N,) bool;
    steps (N,) int32; score, threshold (N,) float32 whatever the state's dtype (a bf16 model halts on
    fp32 scores, so that rounding the score cannot move a decision). Every tensor on one device.
    Active tokens take h_new and count one more step; halted tokens keep h and their count.
    An active token halts when step >= max_loops, or when step >= min_loops and score < threshold.
    Returns (h, active, steps) as new tensors.
    """
    raise NotImplementedError


def block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    """One pre-norm block on x (B, T, C): x + proj(attn(ln1(x))), then + mlp(ln2(x)), causal.
    dropout_p applies to the two residual branches (the reference honours it; kernels run at 0)."""
    raise NotImplementedError


SIGNATURES: dict[str, inspect.Signature] = {
    fn.__name__: inspect.signature(fn)
    for fn in (layer_norm, linear, layer_norm_linear, attention, softmax_entropy, halt_update, block)
}
OP_NAMES: tuple[str, ...] = tuple(SIGNATURES)


def signature_mismatch(name: str, fn) -> Optional[str]:
    """Why `fn` does not match op `name`'s signature, or None if it does (names, kinds, defaults)."""
    want = [(p.name, p.kind, p.default) for p in SIGNATURES[name].parameters.values()]
    got = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    if want != got:
        return f"op {name!r}: expected parameters {want}, got {got}"
    return None


# ---- what each op returns, from its arguments' shapes and dtypes alone
# Under torch.compile a kernel backend's op is one opaque graph node (a torch.library custom op, built
# by `looplm.backends.kernel_ops`); the compiler learns its outputs from these "fake" implementations,
# one per op, with the op's signature, shared by every kernel backend. A kernel backend returns new
# contiguous tensors, so these are exact to the strides (`torch.library.opcheck` compares them with
# the kernels' outputs in tests/test_compile_kernels.py).

def fake_layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    return x.new_empty(x.shape)


def fake_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
                residual: Optional[Tensor] = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fake_layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                           bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fake_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
                   key_len: Optional[Tensor] = None) -> Tensor:
    return q.new_empty(q.shape)


def fake_softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    rows = logits.shape[:-1]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


def fake_halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                     step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    return h.new_empty(h.shape), active.new_empty(active.shape), steps.new_empty(steps.shape)


def fake_block(x: Tensor, weights: BlockWeights, n_head: int, dropout_p: float = 0.0) -> Tensor:
    return x.new_empty(x.shape)


FAKES: dict[str, Callable] = {name: globals()[f"fake_{name}"] for name in OP_NAMES}


def residual_branch(linear_op, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor,
                    dropout_p: float) -> Tensor:
    """residual + dropout(linear(x)): a block's two residual branches, for any backend's linear op.
    Without dropout the residual add rides in the linear's epilogue (one kernel); with dropout it
    must wait until dropout has acted on the branch."""
    if dropout_p > 0:
        return residual + torch.nn.functional.dropout(linear_op(x, weight, bias), p=dropout_p, training=True)
    return linear_op(x, weight, bias, residual=residual)


def kernel_block(layer_norm_linear_op, attention_into_op, linear_op, x: Tensor, weights: BlockWeights, n_head: int,
                 dropout_p: float = 0.0) -> Tensor:
    """`block` from a kernel backend's ops, in seven launches with no copies between them:

        qkv = ln_1 + c_attn            layer_norm_linear (+ bias)
        y   = attention(q, k, v)       q, k, v are strided head views of qkv; the heads are written
                                       straight into a (B, T, C) buffer (no split, transpose or merge)
        x   = x + c_proj(y)            linear, bias and residual in the epilogue
        hid = gelu(ln_2 + c_fc)        layer_norm_linear (+ bias, GELU)
        out = x + mlp.c_proj(hid)      linear, bias and residual in the epilogue

    `attention_into_op(q, k, v, out, causal, scale)` writes into `out`. With dropout_p > 0 (training
    without gradients) the residual adds move out of the epilogues (`residual_branch`)."""
    check_kernel_dtype("block", "x", x)
    check_tensors("block", x=x, **weights._asdict())
    if x.dim() != 3 or x.shape[2] % n_head:
        raise ValueError(f"block: x must be (B, T, C) with C divisible by n_head={n_head}, got {tuple(x.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"block: dropout_p must be in [0, 1], got {dropout_p}")
    w = weights
    B, T, C = x.shape
    D = C // n_head
    qkv = layer_norm_linear_op(x, w.ln1_w, w.ln1_b, w.attn_w, w.attn_b)  # (B, T, 3C)
    q, k, v = qkv.view(B, T, 3, n_head, D).permute(2, 0, 3, 1, 4)  # three (B, H, T, D) strided views
    y = torch.empty_like(x)
    attention_into_op(q, k, v, y.view(B, T, n_head, D).transpose(1, 2), True, D ** -0.5)
    x = residual_branch(linear_op, y, w.proj_w, w.proj_b, x, dropout_p)
    hidden = layer_norm_linear_op(x, w.ln2_w, w.ln2_b, w.fc_w, w.fc_b, activation="gelu")  # (B, T, 4C)
    return residual_branch(linear_op, hidden, w.fc2_w, w.fc2_b, x, dropout_p)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernel backends compute in


def check_kernel_dtype(op: str, name: str, t: Tensor) -> None:
    """Refuse a tensor whose dtype no kernel backend computes in, naming the allowed ones."""
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} must be one of {KERNEL_DTYPES}, got {t.dtype}")


def check_devices(op: str, **tensors: Optional[Tensor]) -> None:
    """Refuse tensors on different devices, naming them."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")


def check_tensors(op: str, **tensors: Optional[Tensor]) -> None:
    """Refuse tensors on different devices, or floating tensors of different dtypes, naming them."""
    check_devices(op, **tensors)
    given = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {name: t.dtype for name, t in given.items() if t.is_floating_point()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{op}: floating tensors must share one dtype, got {dtypes}")


def check_key_len(op: str, q: Tensor, k: Tensor, key_len: Optional[Tensor]) -> None:
    """Refuse a key_len (attention's) that is not (B,) int32 on q's device. Its values (0 .. Tk) are
    not checked: that would read the device, which a decode step must not."""
    if key_len is None:
        return
    if key_len.shape != (q.shape[0],) or key_len.dtype != torch.int32:
        raise ValueError(f"{op}: key_len must be ({q.shape[0]},) torch.int32 (one length per batch row), got "
                         f"{tuple(key_len.shape)} {key_len.dtype}")
    if key_len.device != k.device:
        raise ValueError(f"{op}: key_len must be on the keys' device {k.device}, got {key_len.device}")


def check_halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor,
                      threshold: Tensor) -> None:
    """Refuse arguments outside `halt_update`'s contract, naming what was wrong and what is allowed:
    the state pair shares one kernel dtype, the scores and thresholds are float32 beside it."""
    check_devices("halt_update", h=h, h_new=h_new, active=active, steps=steps, score=score, threshold=threshold)
    check_tensors("halt_update", h=h, h_new=h_new)  # the state pair shares one dtype; scores stay fp32
    check_kernel_dtype("halt_update", "h", h)
    if h.dim() != 2 or h_new.shape != h.shape:
        raise ValueError(f"halt_update: h and h_new must both be (N, C), got {tuple(h.shape)} and "
                         f"{tuple(h_new.shape)}")
    n_tokens = h.shape[0]
    for name, t, dtype in (("active", active, torch.bool), ("steps", steps, torch.int32),
                           ("score", score, torch.float32), ("threshold", threshold, torch.float32)):
        if t.shape != (n_tokens,) or t.dtype != dtype:
            raise ValueError(f"halt_update: {name} must be ({n_tokens},) {dtype}, got {tuple(t.shape)} {t.dtype}")
