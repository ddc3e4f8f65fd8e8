"""Halting that saves compute: the tied core runs only for the tokens still thinking.

`LoopGPT.loop` with halting is the reference semantics: every loop runs the core on every token
and `halt_update` keeps the halted tokens' states. The compacted loop here computes the same
result doing, per loop, only the work the active tokens need, composed from the backend's
`layer_norm`, `linear`, `attention` and `halt_update` ops so that kernels run where a backend has
them:

    rows      active tokens, plus the tokens that halted in the previous loop
    k, v      LN1 + QKV of those rows, kept in a per-token K/V buffer; a halted token's K/V come
              from its frozen state and its own last step, so they are computed once and kept
    y         attention of the active tokens' queries over every token's K/V
    h         proj + MLP, update, readout and halt_update on the active rows only, scattered back

When it is exact. With one tied layer a halted token's core input inject(h_frozen, x0, s) never
changes, so neither do its keys and values, and the result equals the masked loop's up to the
rounding of differently shaped matmuls. With n_layer > 1 a halted token's deeper keys and values
still move while earlier tokens are active (they attend to them), so those models keep the masked
loop. A coda makes the readout attend across tokens, and dropout draws fresh noise per call:
both keep the masked loop too (`compaction_blocker` says which rule applies). Without halting
every token is active every loop and the loop here is the plain loop with K/V exposed, which
`looplm.generation` uses to fill its cache for any n_layer.

Attention runs on the batch rows that hold an active token and on the window of positions p0..p1
spanned by active tokens, padded inside it; the attention op's causal mask is aligned
bottom-right, so queries p0..p1 over keys 0..p1 keep their positions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import Tensor

from looplm.config import READOUT_CRITERIA
from looplm.halting import relative_change

if TYPE_CHECKING:
    from looplm.model import Block, LoopGPT, LoopTrace



class KVStore(Protocol):
    """Keys and values of earlier tokens, per core layer and loop (see looplm.generation)."""

    def past(self, layer: int, loop: int) -> Optional[tuple[Tensor, Tensor]]:
        """(K, V), each (B, P, C), that the block's tokens attend to before their own; None if P = 0."""

    def store(self, layer: int, loop: int, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        """Entry `loop` of the block's tokens `rows` (flat indices into (B, T)): keys, values (R, C)."""


def compaction_blocker(model: "LoopGPT") -> Optional[str]:
    """Why the compacted loop would not equal the masked loop for `model` now, or None if it would."""
    cfg = model.config
    if cfg.n_layer != 1:
        return f"n_layer={cfg.n_layer}: a halted token's deeper keys and values still change"
    if cfg.n_coda:
        return f"n_coda={cfg.n_coda}: the readout attends across tokens"
    if model.training and cfg.dropout > 0:
        return f"dropout={cfg.dropout} in training draws noise for every token"
    return None


def compact_loop(model: "LoopGPT", x0: Tensor, idx: Tensor, n_loops: int, halting: bool,
                 thresholds: Optional[Tensor] = None, trace: Optional["LoopTrace"] = None,
                 states: Optional[list[Tensor]] = None, grad_loops: Optional[int] = None) -> Tensor:
    """`LoopGPT.loop` with the same arguments and result, computing only the active tokens."""
    blocker = compaction_blocker(model) if halting else None
    if blocker is not None:
        raise ValueError(f"the compacted loop does not apply to this model: {blocker}")
    threshold = model.halt_bar(idx, thresholds) if halting else None
    h, _ = run_loop(model, x0, threshold, n_loops, trace=trace, states=states, grad_loops=grad_loops)
    return h


def run_loop(model: "LoopGPT", x0: Tensor, threshold: Optional[Tensor], n_loops: int, *,
             trace: Optional["LoopTrace"] = None, states: Optional[list[Tensor]] = None,
             grad_loops: Optional[int] = None, kv: Optional[KVStore] = None) -> tuple[Tensor, Tensor]:
    """Loop the core from x0 (B, T, C); returns the final state (B, T, C) and the steps (B*T,) int32.

    threshold (B*T,) float32, in halt_update's lower-is-surer units, turns halting on; None runs
    every token n_loops times. `kv` receives every K/V entry computed (entry t of a token: its core
    input at loop t, or its frozen input if it halted after loop t-1) and supplies earlier tokens'.
    """
    cfg, backend = model.config, model.backend
    halting = threshold is not None
    if halting and len(model.transformer.core) != 1:
        raise ValueError(f"halting without masking needs n_layer=1, got n_layer={cfg.n_layer}")
    B, T, C = x0.shape
    N = B * T
    x0 = x0.reshape(N, C)
    h = model.initial_state(x0)
    active = torch.ones(N, dtype=torch.bool, device=x0.device)
    steps = torch.zeros(N, dtype=torch.int32, device=x0.device)
    keys = [x0.new_zeros(N, C) for _ in model.transformer.core]
    values = [x0.new_zeros(N, C) for _ in model.transformer.core]
    stale = active  # rows whose keys and values this loop must compute
    needs_readout = trace is not None or (halting and cfg.halt in READOUT_CRITERIA)
    prev_log_p = None
    for t in range(1, n_loops + 1):
        if grad_loops is not None and t == n_loops - grad_loops + 1:
            h = h.detach()
            stale = torch.ones_like(active)  # halted K/V from the detached state, as the masked loop has them
        rows = stale.nonzero().squeeze(1)
        running = active[rows]  # which of `rows` run the whole block
        loop_index = torch.where(active, t, steps)[rows]  # a halted token keeps its last loop
        x = model.inject(h[rows], x0[rows], loop_index)
        for layer, blk in enumerate(model.transformer.core):
            q, k, v = _qkv(blk, backend, x)
            keys[layer] = keys[layer].index_copy(0, rows, k)
            values[layer] = values[layer].index_copy(0, rows, v)
            if kv is not None:
                kv.store(layer, t, rows, k, v)
            if not bool(running.all()):
                q, x, rows = q[running], x[running], rows[running]
                running = running[running]
            past = kv.past(layer, t) if kv is not None else None
            y = _attend(q, rows, keys[layer], values[layer], past, B, T, blk.n_head, backend)
            x = _mlp_half(blk, backend, y, x)

        h_rows = h[rows]
        h_new = model.update(h_rows, x)
        readout = model.readout(h_new[None]) if needs_readout else None
        was_active = active
        if halting:
            prev = prev_log_p[rows][None] if prev_log_p is not None else None
            score = model.halt_score(h_rows[None], h_new[None], readout, prev).reshape(-1)
            h_new, still_active, new_steps = backend.op("halt_update")(
                h_rows, h_new, torch.ones_like(rows, dtype=torch.bool), steps[rows], score, threshold[rows], t,
                cfg.min_loops, n_loops)
            active = active.index_copy(0, rows, still_active)
            steps = steps.index_copy(0, rows, new_steps)
        else:
            steps = steps + 1
        h = h.index_copy(0, rows, h_new)
        if readout is not None:
            log_p = readout[2].reshape(len(rows), -1)
            prev_log_p = log_p if prev_log_p is None else prev_log_p.index_copy(0, rows, log_p)
        if trace is not None:
            last = trace.entropy[-1].reshape(N) if trace.entropy else torch.zeros(N, device=x0.device)
            trace.entropy.append(last.index_copy(0, rows, readout[0].reshape(-1)).view(B, T))
            delta = torch.zeros(N, device=x0.device).index_copy(0, rows, relative_change(h_rows[None], h_new[None])[0])
            trace.delta.append(delta.view(B, T))
            trace.active.append(was_active.view(B, T))
        if states is not None:
            states.append(h.view(B, T, C))
        stale = was_active  # who ran this loop: the still active, and the just halted whose K/V are now frozen
        if halting and not active.any():
            break
    if kv is not None and halting:
        _store_frozen(model, kv, h, x0, steps, stale & ~active & (steps < n_loops))
    if trace is not None:
        trace.steps = steps.view(B, T)
    return h.view(B, T, C), steps


def _store_frozen(model: "LoopGPT", kv: KVStore, h: Tensor, x0: Tensor, steps: Tensor, halted: Tensor) -> None:
    """Entry steps+1 of the tokens that halted in the last loop run: the K/V of their frozen state."""
    rows = halted.nonzero().squeeze(1)
    if len(rows) == 0:
        return
    blk = model.transformer.core[0]
    _, k, v = _qkv(blk, model.backend, model.inject(h[rows], x0[rows], steps[rows]))
    for loop in steps[rows].unique().tolist():
        at = steps[rows] == loop
        kv.store(0, loop + 1, rows[at], k[at], v[at])


def _qkv(blk: "Block", backend, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The block's LN1 + QKV projection of rows x (R, C): q, k, v (R, C) each."""
    w = blk.weights()
    normed = backend.op("layer_norm")(x, w.ln1_w, w.ln1_b)
    return backend.op("linear")(normed, w.attn_w, w.attn_b).split(x.size(-1), dim=-1)


def _mlp_half(blk: "Block", backend, y: Tensor, x: Tensor) -> Tensor:
    """The rest of the block for rows whose attention output is y: x + proj(y), then + mlp(ln2(.))."""
    w = blk.weights()
    linear = backend.op("linear")
    x = linear(y, w.proj_w, w.proj_b, residual=x)
    hidden = linear(backend.op("layer_norm")(x, w.ln2_w, w.ln2_b), w.fc_w, w.fc_b, activation="gelu")
    return linear(hidden, w.fc2_w, w.fc2_b, residual=x)


def _attend(q: Tensor, rows: Tensor, keys: Tensor, values: Tensor, past: Optional[tuple[Tensor, Tensor]],
            B: int, T: int, n_head: int, backend) -> Tensor:
    """Causal attention of queries q (R, C) at flat positions `rows` of a (B, T) block over the
    block's keys/values (B*T, C), after the `past` ones (B, P, C). Returns (R, C)."""
    C = q.size(-1)
    batch, pos = rows // T, rows % T
    p0, p1 = int(pos.min()), int(pos.max())
    batches = batch.unique()  # sorted
    padded = q.new_zeros(B, T, C)
    padded[batch, pos] = q
    q = padded[batches, p0:p1 + 1]
    k = keys.view(B, T, C)[batches, :p1 + 1]
    v = values.view(B, T, C)[batches, :p1 + 1]
    if past is not None:
        k = torch.cat([past[0][batches], k], dim=1)
        v = torch.cat([past[1][batches], v], dim=1)

    def heads(x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), n_head, C // n_head).transpose(1, 2)

    y = backend.op("attention")(heads(q), heads(k), heads(v), causal=True)
    y = y.transpose(1, 2).reshape(len(batches), p1 - p0 + 1, C)
    return y[torch.searchsorted(batches, batch), pos - p0]
