"""The loop engine: the tied core applied loop after loop, with per-token halting, in one place.

    h = init(x0)
    for t in 1 .. n_loops:
        rows = the tokens still active (every token without halting)
        x = inject(h, x0, t)[rows]
        for each core layer:  x = block(x) on rows, reading every token's keys and values
        h_new = update(h[rows], x);  readout / score only if the criterion or the trace needs it
        h[rows], active[rows], steps[rows] = halt_update(...)

Semantics with halting (recursion-wise K/V caching, as in Mixture-of-Recursions). Every core
layer keeps, per token, the keys and values the token computed at that layer in its latest loop.
A token that halts after loop s keeps offering its loop-s keys and values at every layer to the
tokens that still run; its own state stays h_s. Nothing about a halted token changes after it
halts, so running the core for the active tokens only ("compacted") gives exactly the result of
running it for every token and discarding the halted ones' outputs ("masked", compact=False, the
reference semantics): the two differ only by the rounding of differently shaped matmuls. This holds
for any n_layer; with one layer it is the plain rule "a halted token is seen as it was in its last loop".

The coda. The in-loop readout (halting criteria, traces) passes the state through the coda with
the same rule: per coda layer, a halted token offers the keys and values of its last readout. The
final logits (`LoopGPT.head`) run the coda over every token's final state, full sequence.

Without halting every token runs every loop: the core is the backends' fused `block` op over the
whole sequence. With halting (or a K/V store, for generation) the block is split into the ops
`layer_norm_linear` (LN1 + QKV, LN2 + fc + GELU), `attention` and `linear` (proj and fc2 with the
residual in the epilogue), so each backend's kernels run on the active rows only.

Cost per loop. Work proportional to the active tokens: states, keys, values and the trace are
written in place into preallocated buffers (out of place while autograd records, which needs the
old values); each layer's keys and values are its QKV rows, written in one copy. The host learns
which tokens still run from one device-to-host transfer per loop, of the running rows' flags, and
plans the next loop's rows from them in numpy. Attention runs on the batch rows holding an active
token, for the keys of positions 0..p1 (p1 the last active position); on the torch backend the
active queries only, packed per batch row, with an additive causal mask taken from a per-run
table; the readout computes one log-softmax per loop, and only for the KL criterion keeps the
previous distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from looplm import torch_ops
from looplm.config import READOUT_CRITERIA
from looplm.halting import relative_change
from looplm.ops import residual_branch

if TYPE_CHECKING:
    from looplm.model import Block, LoopGPT


@dataclass
class LoopTrace:
    """What the loop did. Per token: the loops it ran. Per loop t (lists index t-1), per token:
    the readout's entropy (nats), the relative state change ||h_t - h_{t-1}|| / ||h_{t-1}||, and
    whether the token was still running during loop t."""

    steps: Tensor  # (B, T) int32
    entropy: list[Tensor] = field(default_factory=list)  # each (B, T) float32
    delta: list[Tensor] = field(default_factory=list)  # each (B, T) float32
    active: list[Tensor] = field(default_factory=list)  # each (B, T) bool

    @property
    def loops_run(self) -> int:
        return len(self.entropy)

    def per_loop(self) -> list[dict[str, float]]:
        """Per loop: mean entropy and state change over all tokens, and the fraction still active."""
        return [dict(loop=t + 1, entropy=e.mean().item(), delta=d.mean().item(), active=a.float().mean().item())
                for t, (e, d, a) in enumerate(zip(self.entropy, self.delta, self.active))]


class KVStore(Protocol):
    """Keys and values of earlier tokens, per layer and loop (see looplm.generation). Layers
    0..n_layer-1 are the core's, n_layer.. the coda's in the in-loop readout."""

    def past(self, layer: int, loop: int) -> Optional[tuple[Tensor, Tensor]]:
        """(K, V), each (B, P, C), that the block's tokens attend to before their own; None if P = 0."""

    def store(self, layer: int, loop: int, rows: Optional[Tensor], keys: Tensor, values: Tensor) -> None:
        """Entry `loop` of the block's tokens `rows` (flat indices into (B, T); None: every one):
        keys, values (R, C)."""


class _Rows:
    """The tokens a loop computes: every one (idx None) or the flat indices idx (R,) into (B, T),
    sorted, from the host array `host`. What attention needs to run on them is worked out on the
    host once per loop, for every layer, when first asked for: the batch rows holding them
    (`batches`, None when every batch row does) and either the packed layout (`packed`) or the
    padded window of positions (`window`). `tables` holds the causal masks of the run."""

    def __init__(self, B: int, T: int, host: Optional[np.ndarray] = None, device: Optional[torch.device] = None,
                 tables: Optional[dict] = None):
        self.B, self.T, self.host, self.device = B, T, host, device
        self.tables = {} if tables is None else tables
        self.idx = self.batches = self._packed = self._window = None
        self._masks: dict = {}
        self.p1 = T - 1
        self.count = B * T if host is None else len(host)
        if host is None or self.count == 0:
            return
        self.idx = self._to_device(host)
        self.batch, self.pos = np.divmod(host, T)
        self.p1 = int(self.pos.max())
        counts = np.bincount(self.batch, minlength=B)
        self.present = counts > 0
        if self.present.all():
            self.counts, self.n_batches = counts, B
        else:
            self.batches = self._to_device(np.flatnonzero(self.present))
            self.counts, self.n_batches = counts[self.present], len(self.batches)

    def _to_device(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        return t if self.device is None or self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    @property
    def every(self) -> bool:
        return self.idx is None

    def subset(self, still: np.ndarray) -> "_Rows":
        """The rows of those of these tokens that `still` (R,) bool marks."""
        if self.every and still.all():
            return self
        host = np.flatnonzero(still) if self.every else self.host[still]
        return _Rows(self.B, self.T, host, self.device, self.tables)

    def packed(self) -> tuple[int, Tensor, Tensor, np.ndarray]:
        """Each batch row's tokens side by side, padded to the most any has: the length L,
        `gather` (n_batches * L,) the row of q for each packed place (padding takes a row of the
        first token: its output is dropped), `packed_at` (R,) each row's place, and the place's
        positions (host)."""
        if self._packed is None:
            L = int(self.counts.max())
            first = np.cumsum(self.counts) - self.counts  # host is sorted: a batch row's tokens are consecutive
            rank = np.arange(L)
            real = rank < self.counts[:, None]  # (n_batches, L), row-major in the order of host
            gather = np.where(real, first[:, None] + rank, 0).reshape(-1)
            self._packed = L, self._to_device(gather), self._to_device(np.flatnonzero(real)), self.pos[gather]
        return self._packed

    def causal_mask(self, past: int, dtype: torch.dtype) -> Tensor:
        """(n_batches, 1, L, past + p1 + 1) additive mask (0 or -inf) of the packed queries: the
        rows of the run's causal table at their positions (made once per loop, for every layer)."""
        key = (past, dtype)
        if key not in self._masks:
            if key not in self.tables:  # position p sees keys -past .. p
                self.tables[key] = torch.full((self.T, past + self.T), -math.inf, dtype=dtype,
                                              device=self.device).triu_(past + 1)
            L, _, _, positions = self.packed()
            table = self.tables[key][:, :past + self.p1 + 1]
            self._masks[key] = table.index_select(0, self._to_device(positions)).view(self.n_batches, 1, L, -1)
        return self._masks[key]

    def window(self) -> tuple[int, Tensor, Tensor]:
        """The window of positions p0..p1 the tokens span, per batch row: its width W, `gather`
        (n_batches * W,) the row of q for each place of the window (the halted tokens' places take
        row 0: their outputs are dropped) and `padded_at` (R,) each row's place."""
        if self._window is None:
            p0 = int(self.pos.min())
            width = self.p1 - p0 + 1
            slot = self.batch if self.batches is None else (np.cumsum(self.present) - 1)[self.batch]
            padded_at = slot * width + self.pos - p0
            gather = np.zeros(self.n_batches * width, dtype=np.int64)
            gather[padded_at] = np.arange(self.count)
            self._window = width, self._to_device(gather), self._to_device(padded_at)
        return self._window


def _write(buffer: Tensor, rows: _Rows, new: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """buffer with `rows` replaced by new (R, ...), where keep (R,) bool, if given, is False; in
    place unless autograd records (it needs the old values) or every row is replaced."""
    if keep is not None:
        new = torch.where(keep.view(-1, *([1] * (new.dim() - 1))), buffer if rows.every else buffer[rows.idx], new)
    if rows.every:
        return new
    if torch.is_grad_enabled():
        return buffer.index_copy(0, rows.idx, new)
    return buffer.index_copy_(0, rows.idx, new)


class _Layers:
    """Per block (core layers, then coda layers): its weights, read once per run, and every token's
    latest queries, keys and values, (N, 3C) as the QKV projection gives them (one write per loop;
    the queries are not read)."""

    def __init__(self, blocks: list["Block"]):
        self.weights = [blk.weights() for blk in blocks]
        self.qkv: list[Optional[Tensor]] = [None] * len(blocks)

    def detach(self) -> None:
        self.qkv = [x.detach() if x is not None else None for x in self.qkv]


def block_on_rows(model: "LoopGPT", blk: "Block", layer: int, x: Tensor, rows: _Rows, layers: _Layers,
                  keep: Optional[Tensor], kv: Optional[KVStore], loop: int) -> Tensor:
    """One block for the rows x (R, C): its keys and values go to the layer's buffer (except the
    rows `keep` marks: halted tokens in the masked loop), attention reads every token's."""
    backend, w, C = model.backend, layers.weights[layer], x.size(-1)
    qkv = backend.op("layer_norm_linear")(x, w.ln1_w, w.ln1_b, w.attn_w, w.attn_b)
    # the first loop computes every token
    layers.qkv[layer] = qkv if layers.qkv[layer] is None else _write(layers.qkv[layer], rows, qkv, keep)
    if kv is not None:
        kv.store(layer, loop, rows.idx, qkv[:, C:2 * C], qkv[:, 2 * C:])
    past = kv.past(layer, loop) if kv is not None else None
    y = _attend(backend, qkv[:, :C], rows, layers.qkv[layer], past, blk.n_head)
    p, linear = model._dropout_p(), backend.op("linear")
    x = residual_branch(linear, y, w.proj_w, w.proj_b, x, p)
    hidden = backend.op("layer_norm_linear")(x, w.ln2_w, w.ln2_b, w.fc_w, w.fc_b, activation="gelu")
    return residual_branch(linear, hidden, w.fc2_w, w.fc2_b, x, p)


def _attend(backend, q: Tensor, rows: _Rows, qkv: Tensor, past: Optional[tuple[Tensor, Tensor]],
            n_head: int) -> Tensor:
    """Causal attention of the rows' queries q (R, C) over the keys and values of every token of
    the (B, T) block, qkv (N, 3C), after the `past` ones (B, P, C). Returns (R, C).

    Some rows: only the batch rows holding one, and keys up to the last position p1 any row has.
    On the torch backend, whose attention is PyTorch's SDPA, which takes a mask, only the active
    queries run, packed per batch row, with their causal mask: the cost falls with the active
    tokens however they are spread. Other backends run their attention op on the window of
    positions the rows span (its causal mask is aligned bottom-right, so the queries keep their
    positions), padded with the halted tokens' places."""
    B, T, C = rows.B, rows.T, q.size(-1)
    kv = qkv.view(B, T, 3 * C)[:, :rows.p1 + 1, C:]  # (B, p1 + 1, 2C): one gather serves both
    if rows.batches is not None:  # only the batch rows holding a running token
        kv = kv.index_select(0, rows.batches)
        past = (past[0].index_select(0, rows.batches), past[1].index_select(0, rows.batches)) \
            if past is not None else None
    k, v = kv[..., :C], kv[..., C:]
    if past is not None:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)

    def heads(x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), n_head, C // n_head).transpose(1, 2)

    def rows_of(y: Tensor, at: Tensor) -> Tensor:  # (n, H, L, D) -> the rows `at` of (n * L, C)
        return y.transpose(1, 2).reshape(-1, C).index_select(0, at)

    attention = backend.op("attention")
    if rows.every:
        y = attention(heads(q.view(B, T, C)), heads(k), heads(v), causal=True)
        return y.transpose(1, 2).reshape(-1, C)
    if attention is torch_ops.attention:
        L, gather, packed_at, _ = rows.packed()
        queries = q.index_select(0, gather).view(rows.n_batches, L, C)
        mask = rows.causal_mask(past[0].size(1) if past is not None else 0, q.dtype)
        return rows_of(F.scaled_dot_product_attention(heads(queries), heads(k), heads(v), attn_mask=mask), packed_at)
    width, gather, padded_at = rows.window()
    queries = q.index_select(0, gather).view(rows.n_batches, width, C)
    return rows_of(attention(heads(queries), heads(k), heads(v), causal=True), padded_at)


def run_loop(model: "LoopGPT", x0: Tensor, n_loops: int, threshold: Optional[Tensor] = None, *,
             compact: bool = True, trace: Optional[LoopTrace] = None, states: Optional[list[Tensor]] = None,
             grad_loops: Optional[int] = None, kv: Optional[KVStore] = None) -> tuple[Tensor, Tensor]:
    """Loop the core from x0 (B, T, C); returns the final state (B, T, C) and the steps (B*T,) int32.

    threshold (B*T,) float32, in halt_update's lower-is-surer units, turns halting on; None runs
    every token n_loops times. compact=False runs every token every loop and discards the halted
    tokens' results (the reference semantics; same result). trace and states as LoopGPT.loop;
    `kv` receives every key and value computed and supplies the earlier tokens' (generation)."""
    cfg, backend = model.config, model.backend
    halting = threshold is not None
    split = halting or kv is not None  # else every token runs every loop: the fused block op
    B, T, C = x0.shape
    N = B * T
    needs_readout = trace is not None or (halting and cfg.halt in READOUT_CRITERIA)
    x0_rows = x0.reshape(N, C)
    h = model.initial_state(x0)
    h = h.reshape(N, C) if split else h
    every_active = torch.ones(N, dtype=torch.bool, device=x0.device)  # never written: its head is a compacted loop's
    active = every_active  # the device mask; a compacted loop keeps it only for the trace
    steps = torch.zeros(N, dtype=torch.int32, device=x0.device)
    layers = _Layers([*model.transformer.core, *model.transformer.coda])
    prev_log_p = None  # the last distribution of every token, for the KL criterion only
    entropy = torch.zeros(N, device=x0.device) if trace is not None else None
    rows = _Rows(B, T, device=x0.device)
    for t in range(1, n_loops + 1):
        if grad_loops is not None and t == n_loops - grad_loops + 1:
            h = h.detach()  # truncated backprop: the graph of earlier loops, keys and values included, is cut
            layers.detach()
        keep = ~active if halting and not compact and t > 1 else None  # masked loop: halted tokens' K/V stay
        if split:
            h_rows = h if rows.every else h.index_select(0, rows.idx)
            x = model.inject(h_rows, x0_rows if rows.every else x0_rows.index_select(0, rows.idx),
                             torch.full((rows.count,), t, device=x0.device))
            for layer, blk in enumerate(model.transformer.core):
                x = block_on_rows(model, blk, layer, x, rows, layers, keep, kv, t)
            h_new = model.update(h_rows, x)
        else:
            h_rows = h
            h_new = model.update(h, model.core(model.inject(h, x0, torch.full((B, T), t, device=x0.device))))

        logits = None
        if needs_readout:
            logits = readout_logits(model, h_new, rows, layers, keep, kv, t) if split else model.head(h_new)
        prev = prev_log_p if prev_log_p is None or rows.every else prev_log_p.index_select(0, rows.idx)
        score, row_entropy, log_p = halt_score(model, cfg.halt if halting else None, h_rows, h_new, logits, prev,
                                               trace is not None)
        if halting:
            if rows.every:
                row_active, row_steps, row_threshold = active, steps, threshold
            else:  # a compacted loop: every row is active
                row_active = every_active[:rows.count]
                row_steps, row_threshold = steps.index_select(0, rows.idx), threshold.index_select(0, rows.idx)
            h_new, still_active, row_steps = backend.op("halt_update")(
                h_rows, h_new, row_active, row_steps, score.reshape(-1), row_threshold, t, cfg.min_loops, n_loops)
        else:
            still_active, row_steps = None, (steps + 1 if rows.every else None)
        if trace is not None:
            trace.active.append(active.view(B, T))
            trace.delta.append(_write(torch.zeros(N, device=x0.device), rows,
                                      relative_change(h_rows, h_new).reshape(-1)).view(B, T))
            entropy = _write(entropy, rows, row_entropy.reshape(-1), None if t == 1 else keep)
            trace.entropy.append(entropy.view(B, T).clone())
        if log_p is not None:
            log_p = log_p.reshape(-1, log_p.size(-1))
            prev_log_p = log_p if prev_log_p is None else _write(prev_log_p, rows, log_p, keep)
        h = _write(h, rows, h_new)
        steps = row_steps if rows.every else _write(steps, rows, row_steps)
        if states is not None:
            states.append(h.view(B, T, C) if torch.is_grad_enabled() or not split else h.view(B, T, C).clone())
        if not halting:
            continue
        if not compact:
            active = still_active
            if not bool(active.any()):  # the one sync of the masked loop
                break
            continue
        still = still_active.cpu().numpy()  # the one sync of the compacted loop
        if trace is not None:  # a fresh mask: the trace keeps the old one
            active = still_active if rows.every else _write(active.clone(), rows, still_active)
        rows = rows.subset(still)
        if rows.count == 0:
            break
    if trace is not None:
        trace.steps = steps.view(B, T)
    return h.view(B, T, C), steps


def readout_logits(model: "LoopGPT", h: Tensor, rows: _Rows, layers: _Layers, keep: Optional[Tensor],
                   kv: Optional[KVStore], loop: int) -> Tensor:
    """Logits (R, V) of the rows' states h (R, C): the coda (each layer reading every token's latest
    readout keys and values), ln_f and the tied lm_head in one op."""
    n_core = len(model.transformer.core)
    for i, blk in enumerate(model.transformer.coda):
        h = block_on_rows(model, blk, n_core + i, h, rows, layers, keep, kv, loop)
    return model.logits(h)


def halt_score(model: "LoopGPT", criterion: Optional[str], h: Tensor, h_new: Tensor, logits: Optional[Tensor],
               prev_log_p: Optional[Tensor] = None, want_entropy: bool = False
               ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The halting score of states h -> h_new (..., C) under `criterion` (lower is surer; None: no
    score), the readout's entropy if wanted, and its log-probabilities for the KL criterion, which
    compares them with prev_log_p (the previous loop's; None in the first loop: no token halts).
    logits (..., V), the readout of h_new, are needed by the readout criteria and the entropy only.
    One softmax pass: the backend's softmax_entropy, or one log-softmax for KL."""
    entropy = None
    if criterion == "kl":
        log_p = torch.log_softmax(logits.float(), dim=-1)
        score = torch.full(log_p.shape[:-1], math.inf, device=log_p.device) if prev_log_p is None else \
            (log_p.exp() * (log_p - prev_log_p.view_as(log_p))).sum(-1)
        if want_entropy:
            p = log_p.exp()
            entropy = -torch.special.xlogy(p, p).sum(-1)
        return score, entropy, log_p
    if criterion in ("entropy", "confidence") or want_entropy:
        entropy, max_prob = model.backend.op("softmax_entropy")(logits)
    if criterion == "entropy":
        score = entropy
    elif criterion == "confidence":
        score = -max_prob
    elif criterion == "delta":
        score = relative_change(h, h_new)
    elif criterion == "gate":
        score = -torch.sigmoid(model.halt_gate(h_new).squeeze(-1).float())
    else:
        score = None
    return score, entropy, None


def blocks_with_cache(model: "LoopGPT", blocks, x: Tensor, kv: KVStore) -> Tensor:
    """Untied blocks (prelude, coda) on the block of new tokens x (B, T, C), every token running,
    attending to the earlier tokens' keys and values in `kv` (one entry each, loop 1) and storing theirs."""
    B, T, C = x.shape
    rows, layers, x = _Rows(B, T, device=x.device), _Layers(list(blocks)), x.reshape(B * T, C)
    for layer, blk in enumerate(blocks):
        x = block_on_rows(model, blk, layer, x, rows, layers, None, kv, 1)
    return x.view(B, T, C)
