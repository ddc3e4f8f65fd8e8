"""The loop engine: the tied core applied loop after loop, with per-token halting, in one place.

    h = init(x0)
    for t in 1 .. n_loops:
        rows = the token slots this loop computes (every token, or a compacted set)
        x = inject(h, x0, t)[rows]
        for each core layer:  x = block(x) on rows, reading every token's keys and values
        h_new = update(h[rows], x);  readout / score only if the criterion or the trace needs it,
                                     and not before a token may halt (halting.first_scored_loop)
        h[rows], active[rows], steps[rows] = halt_update(...)

Three pieces, each read alone: `plain_loop` (every token every loop), `halting_loop` (per-token
halting) and `TraceObserver` (what the trace records per loop). `run_loop` picks the loop.

Semantics with halting (recursion-wise K/V caching, as in Mixture-of-Recursions). Every core
layer keeps, per token, the keys and values the token computed at that layer in its latest loop.
A token that halts after loop s keeps offering its loop-s keys and values at every layer to the
tokens that still run; its own state stays h_s. Nothing about a halted token changes after it
halts, so running the core for the active tokens only ("compacted") gives exactly the result of
running it for every token and discarding the halted ones' outputs ("masked", compact=False, the
reference semantics): the two differ only by the rounding of differently shaped matmuls. This holds
for any n_layer; with one layer it is the plain rule "a halted token is seen as it was in its last loop".
The coda of the in-loop readout (halting criteria, traces) follows the same rule: per coda layer, a
halted token offers the keys and values of its last readout. The final logits (`LoopGPT.head`) run
the coda over every token's final state, full sequence.

Static shapes, no waiting on the host. A loop computes a fixed set of slots (`_Rows`): every token,
or the flat indices of the tokens that were active when the set was made, in token order. Which of
its slots are still active is a device mask, never read by the host: a slot whose token has halted
since computes like the others and its results are discarded (masked writes: `keep`), so a loop's
shapes do not depend on which tokens halt inside it. Slots of the compacted set are distinct tokens
(then, from a plan, spare slots that stand for the scratch row and never run), so writes to tokens
never collide (the masked ones and the spare slots' all go to a scratch row); for attention each
batch row's slots are laid side by side, L a row (the most any row holds), and the places past a
row's count read a clamped slot and are dropped.

When the set shrinks. Shapes that follow the active share need a count, and a count is a read.
A model keeps, per input shape (B, T, n_loops), a capacity plan (`halting.CapacityPlan`): how many
tokens ran after each loop in its latest forward, and the most in one batch row. A forward with a
plan takes its slots from it, re-planning on the device (`torch.nonzero_static`, sized by the plan)
after each loop where the planned count falls by a quarter or more, and reads the device once, at
its end, in one transfer: the counts that make the next plan, and a flag raised where the active
tokens outnumbered the slots (a token left out). That forward is rerun, reading as below, and
the plans that follow get a slack (1/16 of each count, doubling up to 1/2): the spare slots point
at the scratch row and compute nothing kept. A forward without a plan (the first of its shape, or
one with a trace, per-loop states or a K/V store) reads, in one transfer of two integers, how many
tokens still run (and the most in one batch row) after the loops of `halting.capacity_reads`: after
min_loops (the first loop a token can halt after), then each time the loop count doubles (loops 1,
2, 4 of 8: three reads a forward, where the engine used to read after every loop: on an H200, 14
synchronisations and 46 copies a forward). Each read re-plans the slots on the device and is also
where the loop stops once no token runs. As the active set only shrinks, a set made at loop t
serves every later loop. Between re-plans the slots keep their own states, flags, step counts,
thresholds and inputs (no gather or scatter per loop); the per-token buffers take them at a
re-plan, at the end, or every loop when a trace or the per-loop states want them. The compute
follows the active share of the previous forward, or with at most a doubling's delay when read.
The masked loop (compact=False, and under torch.compile or CUDA-graph capture without a frozen
plan) never reads: every token is a slot in every loop, with the masked writes; the graph it makes
is one static graph whatever halts, but its compute does not fall. A frozen plan
(`CapacityPlans.freeze()`) gives a graph whose compute falls: its slots are static, nothing is read,
and a token that finds no slot stops at that loop as if it had halted there, counted on the device
(`LoopGPT.capacity_dropped`), where the eager forward of an unfrozen plan would rerun. A trace or the
per-loop states are trimmed at the end, with one read, to the loops some token ran.

Without halting every token runs every loop: the core is the backends' fused `block` op over the
whole sequence. With halting (or a K/V store, for generation) the block is split into the ops
`layer_norm_linear` (LN1 + QKV, LN2 + fc + GELU), `attention` and `linear` (proj and fc2 with the
residual in the epilogue), so each backend's kernels run on the loop's slots only. Attention of a
compacted set: on the torch backend (PyTorch's SDPA, which takes a mask) the slots' queries, packed
per batch row, with their causal mask (additive, made once per set of slots); on a kernel backend
every query of the block (the halted tokens' from the layer's buffer), causal, and the slots' rows
of the result.

Cost per loop: keys, values and the trace are written in place into preallocated buffers (out of
place while autograd records, which needs the old values), each with one scratch row that takes the
masked writes (a halted slot writes there, not to its token: no gather-and-select per write); each
layer's keys and values are its QKV rows, written in one copy; the readout computes one log-softmax
per loop, and only for the KL criterion keeps the previous distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from looplm import torch_ops
from looplm.halting import (READOUT_CRITERIA, CapacityPlans, capacity_reads, first_scored_loop, halt_score,
                            relative_change, running_counts)
from looplm.ops import residual_branch

if TYPE_CHECKING:
    from looplm.model import Block, LoopGPT

__all__ = ["KVStore", "LoopTrace", "Past", "TraceObserver", "block_on_rows", "blocks_with_cache", "halt_score",
           "halting_loop", "plain_loop", "run_loop"]


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


class Past(NamedTuple):
    """Earlier tokens' keys and values for the block's tokens: each (B, P, C). with_block: a one-token
    block's own keys and values are among them, at its place (the store had them first). length
    (B,) int32 on the device: the places each batch row holds, the one-token block's included (a
    preallocated store of static length P, read by attention's `key_len`); None: all P."""

    keys: Tensor
    values: Tensor
    with_block: bool = False
    length: Optional[Tensor] = None


class KVStore(Protocol):
    """Keys and values of earlier tokens, per layer and loop (see looplm.generation). Layers
    0..n_layer-1 are the core's, n_layer.. the coda's in the in-loop readout."""

    def past(self, layer: int, loop: int) -> Optional[Past]:
        """What the block's tokens attend to before their own; None if there is nothing."""

    def store(self, layer: int, loop: int, rows: Optional[Tensor], keys: Tensor, values: Tensor,
              keep: Optional[Tensor] = None) -> None:
        """Entry `loop` of the block's tokens `rows` (flat indices into (B, T); None: every one):
        keys, values (R, C); rows where keep (R,) bool is True keep their old entry."""


class _Rows:
    """The token slots a loop computes: every token in order (idx None), or the flat indices idx (R,)
    into (B, T) of distinct tokens, in token order, then (a plan's spare slots) the scratch row N.
    For attention on the torch backend, the slots laid out per batch row, L places a row:
    `queries_at` (B * L,) the slot each place reads (clamped for the places past the row's count),
    `out_at` (R,) each slot's place, `positions` (B, L)."""

    def __init__(self, B: int, T: int, device: torch.device, active: Optional[Tensor] = None, count: int = 0,
                 most_in_row: int = 0, planned: bool = False):
        """Every token (active None), or the tokens that `active` (N,) bool marks, in `count` slots of
        which a batch row holds at most `most_in_row`: the host's read of the mask, or (planned) a
        `halting.CapacityPlan`'s slots. Those may exceed the marked tokens (the spare slots point at
        the scratch row N, read a clamped row and compute nothing kept) or fall short of them: the
        tokens past a row's `most_in_row`, then past `count`, in token order, are left out (`taken`
        (N,) marks the tokens that have a slot, `left_out` counts the others, both on the device)."""
        self.B, self.T, self._device = B, T, device
        N = B * T
        self.count = N if active is None else count
        self.idx, self.taken, self.left_out = None, None, None
        self._masks: dict = {}
        if active is not None and planned:
            within = active & (torch.cumsum(active.view(B, T), 1) <= most_in_row).view(-1)
            self.idx = torch.nonzero_static(within, size=count, fill_value=N).squeeze(1)
            self.taken = torch.zeros(N + 1, dtype=torch.bool, device=device).index_fill_(0, self.idx, True)[:N]
            self.left_out = active.sum() - self.taken.sum()
            active = self.taken
        elif active is not None:
            self.idx = torch.nonzero_static(active, size=count).squeeze(1)
        self.read_at = self.idx if not planned else self.idx.clamp(max=N - 1)  # a spare slot reads row N - 1
        self._targets = self.idx
        if active is None:
            return
        L = most_in_row
        per_row = active.view(B, T).sum(1)  # (a bincount of the rows would read its maximum on a GPU)
        batch = self.read_at // T
        first = torch.cumsum(per_row, 0) - per_row  # slots are in token order: a row's are consecutive
        rank = torch.arange(L, device=device)
        real = rank < per_row[:, None]  # (B, L)
        slot = torch.where(real, first[:, None] + rank, 0).clamp(max=max(self.count - 1, 0))
        self.L, self.queries_at = L, slot.reshape(-1)
        self.positions = torch.where(real, self.read_at.index_select(0, self.queries_at).view(B, L) % T, 0)
        self.out_at = batch * L + torch.arange(self.count, device=device) - first.index_select(0, batch)
        if planned:  # a spare slot's place is any place: its output is dropped
            self.out_at = self.out_at.clamp(0, B * L - 1)

    @property
    def every(self) -> bool:
        return self.idx is None

    @property
    def targets(self) -> Tensor:
        """The slots' token indices (R,), also when they are every token."""
        if self._targets is None:
            self._targets = torch.arange(self.count, device=self._device)
        return self._targets

    def gather(self, x: Tensor) -> Tensor:
        """The slots' rows of a per-token tensor x (N, ...), or of a buffer with a scratch row (N + 1,
        ...: the spare slots read the scratch row)."""
        if self.idx is None:
            return x[:self.count]
        return x.index_select(0, self.idx if x.size(0) > self.B * self.T else self.read_at)

    def causal_mask(self, P: int, dtype: torch.dtype) -> Tensor:
        """(B, 1, L, P + T): the keys each packed query sees, every one of the P past ones and the
        block's up to its own position. Made once per set of slots, P and dtype, as the additive mask
        (0 or -inf, in the queries' dtype) that SDPA would otherwise rebuild from a bool mask at every
        call."""
        key = (P, dtype)
        if key in self._masks:
            return self._masks[key]
        keys = torch.arange(self.T, device=self.positions.device)
        mask = keys <= self.positions[..., None]  # (B, L, T)
        if P:
            mask = torch.cat([mask.new_ones(self.B, self.L, P), mask], dim=-1)
        additive = torch.zeros(mask[:, None].shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask[:, None], float("-inf"))  # every place sees at least its own key: no row is all -inf
        self._masks[key] = additive
        return additive


def _write(buffer: Tensor, rows: _Rows, new: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """buffer with the rows' slots replaced by new (R, ...); in place unless autograd records (it
    needs the old values). A buffer with a scratch row (N + 1 rows: `_with_scratch`) takes masked
    writes: the slots that keep (R,) bool marks write into the scratch row instead of their token's."""
    N = rows.B * rows.T
    if rows.every and keep is None:  # every token: a plain copy (none at all without a scratch row)
        if buffer.size(0) == N:
            return new
        if torch.is_grad_enabled():
            return torch.cat([new, buffer[N:]])
        buffer[:N].copy_(new)
        return buffer
    if buffer.size(0) > N:
        at = rows.targets if keep is None else torch.where(keep, N, rows.targets)
    elif keep is not None:
        raise ValueError("a masked write needs a buffer with a scratch row")
    elif rows.taken is not None:
        raise ValueError("a planned set of slots writes to buffers with a scratch row only (its spare slots')")
    else:
        at = rows.idx
    if torch.is_grad_enabled():
        return buffer.index_copy(0, at, new)
    return buffer.index_copy_(0, at, new)


def _with_scratch(x: Tensor) -> Tensor:
    """x (N, ...) and one more row, the target of the masked writes (never read as a token's)."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])


class _Layers:
    """Per block (core layers, then coda layers): its weights, read once per run, and, when
    `buffered`, every token's latest queries, keys and values, (N, 3C) as the QKV projection gives
    them (one write per loop; the queries are read by the kernel backends' attention of a compacted
    set). Without halting every token runs every loop, so a loop's own QKV rows are the whole
    block's and no buffer is kept."""

    def __init__(self, blocks: list["Block"], buffered: bool):
        self.weights = [blk.weights() for blk in blocks]
        self.buffered = buffered
        self.qkv: list[Optional[Tensor]] = [None] * len(blocks)

    def detach(self) -> None:
        self.qkv = [x.detach() if x is not None else None for x in self.qkv]


def block_on_rows(model: "LoopGPT", blk: "Block", layer: int, x: Tensor, rows: _Rows, layers: _Layers,
                  keep: Optional[Tensor], kv: Optional[KVStore], loop: int) -> Tensor:
    """One block for the slots x (R, C): its keys and values go to the layer's buffer (except the
    slots `keep` marks: halted tokens), attention reads every token's."""
    backend, w, C = model.backend, layers.weights[layer], x.size(-1)
    qkv = backend.op("layer_norm_linear")(x, w.ln1_w, w.ln1_b, w.attn_w, w.attn_b)
    if layers.buffered:  # the first loop computes every token
        layers.qkv[layer] = _with_scratch(qkv) if layers.qkv[layer] is None else \
            _write(layers.qkv[layer], rows, qkv, keep)
    elif not rows.every or keep is not None:
        raise ValueError("a compacted or masked loop needs the layers' K/V buffers (_Layers(buffered=True))")
    if kv is not None:
        kv.store(layer, loop, rows.idx, qkv[:, C:2 * C], qkv[:, 2 * C:], keep)
    past = kv.past(layer, loop) if kv is not None else None
    y = _attend(backend, qkv[:, :C], rows, layers.qkv[layer] if layers.buffered else qkv, past, blk.n_head)
    p, linear = model._dropout_p(), backend.op("linear")
    x = residual_branch(linear, y, w.proj_w, w.proj_b, x, p)
    hidden = backend.op("layer_norm_linear")(x, w.ln2_w, w.ln2_b, w.fc_w, w.fc_b, activation="gelu")
    return residual_branch(linear, hidden, w.fc2_w, w.fc2_b, x, p)


def _attend(backend, q: Tensor, rows: _Rows, qkv: Tensor, past: Optional[Past], n_head: int) -> Tensor:
    """Causal attention of the slots' queries q (R, C) over the keys and values of every token of
    the (B, T) block, qkv (N, 3C), after the `past` ones. Returns (R, C). See the module docstring."""
    B, T, C = rows.B, rows.T, q.size(-1)
    qkv = qkv[:B * T]  # less the scratch row
    P = 0 if past is None else past.keys.size(1)
    if past is not None and past.with_block:  # one token per row, its own keys already in the past
        k, v, P = past.keys, past.values, P - 1
    else:
        kv = qkv.view(B, T, 3 * C)[..., C:]  # (B, T, 2C): one view serves both
        k, v = kv[..., :C], kv[..., C:]
        if past is not None:
            k, v = torch.cat([past.keys, k], dim=1), torch.cat([past.values, v], dim=1)

    def heads(x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), n_head, C // n_head).transpose(1, 2)

    def rows_of(y: Tensor, at: Optional[Tensor]) -> Tensor:  # (n, H, L, D) -> the rows `at` of (n * L, C)
        y = y.transpose(1, 2).reshape(-1, C)
        return y if at is None else y.index_select(0, at)

    attention, key_len = backend.op("attention"), None if past is None else past.length
    if attention is torch_ops.attention and not rows.every:  # SDPA takes a mask: the slots' queries only
        if key_len is not None:
            raise ValueError("a compacted set of slots reads a past of every place (a K/V store with held "
                             "lengths is read by every token of its block)")
        queries = q.index_select(0, rows.queries_at).view(B, rows.L, C)
        y = F.scaled_dot_product_attention(heads(queries), heads(k), heads(v), attn_mask=rows.causal_mask(P, q.dtype))
        return rows_of(y, rows.out_at)
    queries = q if rows.every else qkv[:, :C]  # a compacted set: every query, the halted tokens' from the buffer
    y = attention(heads(queries.view(B, T, C)), heads(k), heads(v), causal=True, key_len=key_len)
    return rows_of(y, rows.read_at)


class TraceObserver:
    """Fills a LoopTrace, loop by loop, from what the loop hands it; never changes the loop."""

    def __init__(self, trace: LoopTrace, N: int, device: torch.device):
        self.trace, self.N, self.device = trace, N, device
        self.entropy = torch.zeros(N + 1, device=device)  # every token's latest readout entropy, a scratch row

    def loop_done(self, rows: _Rows, active: Tensor, h_rows: Tensor, h_new: Tensor, entropy: Tensor,
                  keep: Optional[Tensor], shape: tuple[int, int]) -> None:
        """Loop done for the slots `rows`: active (N,) the tokens that ran it, h_rows -> h_new their
        states (a halted token's h_new is its h), entropy (R,) their readouts' (kept where `keep`)."""
        self.trace.active.append(active.view(shape).clone())
        delta = _write(torch.zeros(self.N, device=self.device), rows, relative_change(h_rows, h_new).reshape(-1))
        self.trace.delta.append(delta.view(shape))
        self.entropy = _write(self.entropy, rows, entropy.reshape(-1), keep)
        self.trace.entropy.append(self.entropy[:self.N].view(shape).clone())

    def finish(self, steps: Tensor, shape: tuple[int, int], loops_run: int) -> None:
        trace = self.trace
        trace.steps = steps.view(shape)
        del trace.active[loops_run:], trace.delta[loops_run:], trace.entropy[loops_run:]


class _Core:
    """One loop's computation for a set of slots: inject, the core layers, update, and the readout
    when wanted. Holds what lives across loops: the per-layer K/V buffers and the inputs."""

    def __init__(self, model: "LoopGPT", x0: Tensor, kv: Optional[KVStore], split: bool, halting: bool):
        self.model, self.kv, self.split = model, kv, split
        self.x0 = x0.reshape(-1, x0.size(-1)) if split else x0
        self.layers = _Layers([*model.transformer.core, *model.transformer.coda], buffered=halting)

    def __call__(self, h: Tensor, x0: Tensor, rows: _Rows, keep: Optional[Tensor], t: int) -> Tensor:
        """The slots' states after loop t from h (R, C) (every token: (B, T, C) when not split) and
        their inputs x0."""
        model = self.model
        if not self.split:  # every token, the fused block op
            return model.update(h, model.core(model.inject(h, x0, t)))
        x = model.inject(h, x0, t)
        for layer, blk in enumerate(model.transformer.core):
            x = block_on_rows(model, blk, layer, x, rows, self.layers, keep, self.kv, t)
        return model.update(h, x)

    def readout(self, h: Tensor, rows: _Rows, keep: Optional[Tensor], t: int) -> Tensor:
        """Logits (R, V) of the slots' states h (R, C): the coda (each layer reading every token's
        latest readout keys and values), ln_f and the tied lm_head in one op."""
        model = self.model
        if not self.split:
            return model.head(h)
        n_core = len(model.transformer.core)
        for i, blk in enumerate(model.transformer.coda):
            h = block_on_rows(model, blk, n_core + i, h, rows, self.layers, keep, self.kv, t)
        return model.logits(h)


def run_loop(model: "LoopGPT", x0: Tensor, n_loops: int, threshold: Optional[Tensor] = None, *,
             compact: bool = True, trace: Optional[LoopTrace] = None, states: Optional[list[Tensor]] = None,
             grad_loops: Optional[int] = None, kv: Optional[KVStore] = None,
             reads: Optional[tuple[int, ...]] = None, plans: Optional[CapacityPlans] = None
             ) -> tuple[Tensor, Tensor]:
    """Loop the core from x0 (B, T, C); returns the final state (B, T, C) and the steps (B*T,) int32.

    threshold (B*T,) float32, in the lower-is-surer units of `halting.halt_bar`, turns halting on;
    None runs every token n_loops times. compact=False runs every token every loop and discards the
    halted tokens' results (the reference semantics; same result; no host read). trace and states
    as LoopGPT.loop; `kv` receives every key and value computed and supplies the earlier tokens'.
    reads: the loops after which the compacted loop reads the active count (default
    `halting.capacity_reads`); plans: the capacity plans that let it read once a forward instead
    (`halting_loop`)."""
    if threshold is None:
        return plain_loop(model, x0, n_loops, trace=trace, states=states, grad_loops=grad_loops, kv=kv)
    return halting_loop(model, x0, n_loops, threshold, compact=compact, trace=trace, states=states,
                        grad_loops=grad_loops, kv=kv, reads=reads, plans=plans)


def plain_loop(model: "LoopGPT", x0: Tensor, n_loops: int, *, trace: Optional[LoopTrace] = None,
               states: Optional[list[Tensor]] = None, grad_loops: Optional[int] = None,
               kv: Optional[KVStore] = None) -> tuple[Tensor, Tensor]:
    """Every token runs every loop: the fused block op, or (with a K/V store) the split ops."""
    B, T, C = x0.shape
    N, split = B * T, kv is not None
    core, rows = _Core(model, x0, kv, split, halting=False), _Rows(B, T, x0.device)
    observer = TraceObserver(trace, N, x0.device) if trace is not None else None
    every_active = torch.ones(N, dtype=torch.bool, device=x0.device)
    h = model.initial_state(x0)
    h = h.reshape(N, C) if split else h
    for t in range(1, n_loops + 1):
        if grad_loops is not None and t == n_loops - grad_loops + 1:
            h = h.detach()  # truncated backprop: the graph of earlier loops is cut
            core.layers.detach()
        h_rows, h = h, core(h, core.x0, rows, None, t)
        if observer is not None:
            entropy, _ = model.backend.op("softmax_entropy")(core.readout(h, rows, None, t))
            observer.loop_done(rows, every_active, h_rows, h, entropy, None, (B, T))
        if states is not None:
            states.append(h.view(B, T, C))
    steps = torch.full((N,), n_loops, dtype=torch.int32, device=x0.device)
    if observer is not None:
        observer.finish(steps, (B, T), n_loops)
    return h.view(B, T, C), steps


def _capture_safe() -> bool:
    """Whether the loop must not read the device: inside torch.compile or a CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def halting_loop(model: "LoopGPT", x0: Tensor, n_loops: int, threshold: Tensor, *, compact: bool = True,
                 trace: Optional[LoopTrace] = None, states: Optional[list[Tensor]] = None,
                 grad_loops: Optional[int] = None, kv: Optional[KVStore] = None,
                 reads: Optional[tuple[int, ...]] = None, plans: Optional[CapacityPlans] = None
                 ) -> tuple[Tensor, Tensor]:
    """Per-token halting on threshold (B*T,) (lower-is-surer units). The slots are every token until
    a capacity read (compacted loop: after the loops `reads`, default `halting.capacity_reads`), then
    the tokens active at the latest read; compact=False, or under torch.compile / graph capture,
    every token throughout, with no read at all. With `plans` (and no trace, states or K/V store),
    a forward whose shape has a plan takes its slots from it and reads once, at the end, to record
    the plan of the next (rerunning if a token found no slot); a frozen plan's forward reads nothing,
    also under torch.compile and graph capture, and stops the tokens it has no slot for (see the
    module docstring)."""
    cfg, backend = model.config, model.backend
    B, T, C = x0.shape
    N, device = B * T, x0.device
    core, rows = _Core(model, x0, kv, split=True, halting=True), _Rows(B, T, device)
    observer = TraceObserver(trace, N, device) if trace is not None else None
    needs_readout = trace is not None or cfg.halt in READOUT_CRITERIA
    first_scored = first_scored_loop(cfg.halt, cfg.min_loops)
    capture = _capture_safe()
    read_loops = capacity_reads(cfg.min_loops, n_loops) if reads is None else reads
    read_loops = frozenset(read_loops) if compact and not capture else frozenset()
    plannable = plans is not None and compact and trace is None and states is None and kv is None
    frozen = plannable and plans.frozen
    plan = plans.get((B, T, n_loops)) if plannable and (frozen or not capture) else None
    recording = plannable and not frozen and not capture and (plan is not None or bool(read_loops))
    shrinks = plan.shrinks(N, T) if plan is not None else {}
    if plan is not None:
        read_loops = frozenset()
    left_out: list[Tensor] = []  # per planned set of slots, the running tokens it had no slot for
    # Per-token buffers, each with a scratch row N (the spare slots' and the masked writes' target).
    h = _with_scratch(model.initial_state(x0).reshape(N, C))
    active = _with_scratch(torch.ones(N, dtype=torch.bool, device=device))
    steps = torch.zeros(N + 1, dtype=torch.int32, device=device)
    prev_log_p = None  # every token's last distribution, for the KL criterion only
    # The slots' own states, flags, counts, thresholds and inputs: kept between capacity reads, and
    # written to the per-token buffers at a read, at the end, or every loop for a trace or the states.
    slot_h, slot_active, slot_steps, slot_threshold, slot_x0 = h[:N], active[:N], steps[:N], threshold, core.x0
    for t in range(1, n_loops + 1):
        if grad_loops is not None and t == n_loops - grad_loops + 1:
            h, slot_h = h.detach(), slot_h.detach()  # truncated backprop: earlier loops' graph is cut,
            core.layers.detach()  # the kept keys and values' included
        keep = None if t <= cfg.min_loops else ~slot_active  # before min_loops no token has halted
        h_new = core(slot_h, slot_x0, rows, keep, t)
        if t < first_scored and observer is None:  # no token can halt yet: no readout, no score
            score, entropy, log_p = slot_threshold, None, None  # (halt_update reads no score before min_loops)
        else:
            logits = core.readout(h_new, rows, keep, t) if needs_readout else None
            score, entropy, log_p = halt_score(model, cfg.halt, slot_h, h_new, logits,
                                               None if prev_log_p is None else rows.gather(prev_log_p),
                                               trace is not None)
        h_new, still_active, slot_steps = backend.op("halt_update")(
            slot_h, h_new, slot_active, slot_steps, score.reshape(-1), slot_threshold, t, cfg.min_loops, n_loops)
        if observer is not None:
            observer.loop_done(rows, active[:N], slot_h, h_new, entropy, keep, (B, T))
        if log_p is not None:
            log_p = log_p.reshape(-1, log_p.size(-1))
            prev_log_p = _with_scratch(log_p) if prev_log_p is None else _write(prev_log_p, rows, log_p, keep)
        slot_h, slot_active = h_new, still_active
        if observer is not None or states is not None or t in read_loops or t in shrinks or t == n_loops:
            h, active = _write(h, rows, slot_h), _write(active, rows, slot_active)
            steps = _write(steps, rows, slot_steps)
        if states is not None:
            states.append(h[:N].view(B, T, C) if torch.is_grad_enabled() else h[:N].view(B, T, C).clone())
        if t in read_loops:
            count, most_in_row = torch.stack([active.sum(), active[:N].view(B, T).sum(1).max()]).tolist()  # the read
        elif t in shrinks:
            count, most_in_row = shrinks[t]
        else:
            continue
        if count == 0:
            if plan is not None:  # the plan has every token stopped here: any still running stop too
                left_out.append(active.sum())
            break
        if count < rows.count:
            rows = _Rows(B, T, device, active[:N], count, most_in_row, planned=plan is not None)
            if rows.taken is not None:  # the tokens without a slot stop here, as if they had halted
                left_out.append(rows.left_out)
                active = torch.cat([rows.taken, active[N:]])
            slot_h, slot_active, slot_steps, slot_threshold, slot_x0 = (
                rows.gather(x) for x in (h, active, steps, threshold, core.x0))
    h, steps = h[:N], steps[:N]
    dropped = torch.stack(left_out).sum().view(1) if left_out else None  # running tokens left without a slot
    if frozen and dropped is not None:  # no read: the count waits on the device for `LoopGPT.capacity_dropped`
        model.capacity_dropped.add_(dropped[0])
    if recording:  # the forward's one read: the counts for the next plan, and whether this one fell short
        if dropped is None:
            dropped = torch.zeros(1, dtype=torch.long, device=device)
        read = torch.cat([dropped, running_counts(steps.view(B, T), n_loops).view(-1)]).tolist()
        overflowed, counts = read[0] > 0, read[1:]
        if overflowed:  # rerun, reading the counts as it goes (exact), and plan from that run
            h, steps = halting_loop(model, x0, n_loops, threshold, compact=compact, grad_loops=grad_loops,
                                    reads=reads)
            counts = running_counts(steps.view(B, T), n_loops).view(-1).tolist()
        plans.record((B, T, n_loops), counts[:n_loops - 1], counts[n_loops - 1:], overflowed)
        return h.view(B, T, C), steps
    if observer is not None or states is not None:
        loops_run = int(steps.max())  # one read: the loops some token ran (no loop runs after the last halts)
    if states is not None:
        del states[loops_run:]
    if observer is not None:
        observer.finish(steps, (B, T), loops_run)
    return h.view(B, T, C), steps


def blocks_with_cache(model: "LoopGPT", blocks, x: Tensor, kv: KVStore) -> Tensor:
    """Untied blocks (prelude, coda) on the block of new tokens x (B, T, C), every token running,
    attending to the earlier tokens' keys and values in `kv` (one entry each, loop 1) and storing theirs."""
    B, T, C = x.shape
    rows, layers, x = _Rows(B, T, x.device), _Layers(list(blocks), buffered=False), x.reshape(B * T, C)
    for layer, blk in enumerate(blocks):
        x = block_on_rows(model, blk, layer, x, rows, layers, None, kv, 1)
    return x.view(B, T, C)
