"""Generation with a per-loop K/V cache (what `LoopGPT.generate` runs by default).

The prompt runs once, then each new token alone: it loops until its halting criterion says stop
(or the loop budget), attending at loop t to the keys and values the earlier tokens offered at
loop t, read from a cache. Rows of a batch whose token has halted stop computing (the loop engine
runs the active tokens only).

What a token offers at loop t. Under the loop engine's semantics (`looplm.engine`) a token that ran
s loops has, per core layer, the entries e_1..e_s (its keys and values at each loop it ran) and,
halted, offers e_s from then on. The fill policy decides what a later token reads at loop t:

    latest   e_min(t, s): exactly what LoopGPT.forward computes, so generation equals
             LoopGPT.generate(use_cache=False). Memory: one slot per loop of the budget.
    last     e_s only: every earlier token as it ended. Memory: one slot; an approximation.
    ring     the last k entries in a ring of k slots: e_t where kept, else the nearest kept one,
             e_clamp(t, s-k+1, s). k=1 is "last", k >= the budget is "latest".

Prelude and coda layers run once per token and keep one entry per token each; the coda inside the
loop's readout (the readout criteria with a coda) is cached per loop as the core is. Any n_layer,
prelude and coda, with or without halting. Per-token thresholds follow the config
(`halt_thresholds_after`, e.g. a stricter threshold from each `=` on: "wait to think"), computed
from the tokens fed so far, so a schedule applies to generated tokens as to prompt tokens. When the
context outgrows block_size, every further token reruns the cropped context, as nanoGPT does.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from looplm import halting as halting_rules
from looplm.config import LoopConfig
from looplm.engine import Past, blocks_with_cache, halting_loop, plain_loop, run_loop
from looplm.model import LoopGPT, check_sampling, sample_next_token

FILLS = ("latest", "last", "ring")


class LoopKVCache:
    """Keys and values of every cached token, per layer, in a ring of `slots` loop entries.

    Entry e of a token lives in slot (e - 1) % slots, so the last `slots` entries written survive.
    Tokens are added a block at a time: `begin(T)`, the loop's `store` calls, `commit(steps)`.
    """

    def __init__(self, n_layer: int, slots: int, batch: int, max_len: int, n_embd: int, budget: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, slots, batch, max_len, n_embd)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.entries = torch.zeros(batch, max_len, dtype=torch.int32, device=device)
        self.slots, self.budget, self.batch, self.max_len = slots, budget, batch, max_len
        self.length = 0  # tokens committed
        self.block_len = 0  # tokens of the block being looped, at positions length ..
        self.fewest = self.most = 0  # the fewest and most entries of a committed token (host copies)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.entries.nbytes

    def begin(self, block_len: int) -> None:
        if self.length + block_len > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {self.length} are cached and "
                             f"{block_len} more do not fit")
        self.block_len = block_len

    def store(self, layer: int, loop: int, rows: Optional[Tensor], keys: Tensor, values: Tensor,
              keep: Optional[Tensor] = None) -> None:
        slot = (loop - 1) % self.slots
        if rows is None:  # the whole block: one slice
            span = slice(self.length, self.length + self.block_len)
            old_keys, old_values = self.keys[layer, slot, :, span], self.values[layer, slot, :, span]
            keys, values = keys.view_as(old_keys), values.view_as(old_values)
            if keep is not None:  # halted tokens keep their entries (a ring's slot may hold an older one)
                keep = keep.view(self.batch, self.block_len, 1)
                keys, values = torch.where(keep, old_keys, keys), torch.where(keep, old_values, values)
            old_keys.copy_(keys)
            old_values.copy_(values)
            return
        batch, pos = rows // self.block_len, self.length + rows % self.block_len
        if keep is not None:
            keys = torch.where(keep[:, None], self.keys[layer, slot, batch, pos], keys)
            values = torch.where(keep[:, None], self.values[layer, slot, batch, pos], values)
        self.keys[layer, slot, batch, pos] = keys
        self.values[layer, slot, batch, pos] = values

    def past(self, layer: int, loop: int) -> Optional[Past]:
        if self.length == 0:
            return None
        if self.most - self.slots + 1 <= loop <= self.fewest:  # every token reads the same slot: a view
            s = (loop - 1) % self.slots
            return Past(self.keys[layer, s, :, :self.length], self.values[layer, s, :, :self.length])
        n = self.entries[:, :self.length]
        slot = (n.clamp(max=loop).maximum(n - self.slots + 1) - 1) % self.slots  # (B, P)
        batch = torch.arange(slot.size(0), device=slot.device)[:, None]
        pos = torch.arange(self.length, device=slot.device)[None, :]
        return Past(self.keys[layer, slot, batch, pos], self.values[layer, slot, batch, pos])

    def commit(self, steps: Optional[Tensor] = None) -> None:
        """Close the block: its tokens ran `steps` (B, T) loops (None: one each)."""
        if steps is None:
            self.entries[:, self.length:self.length + self.block_len] = 1
            fewest = most = 1
        else:
            self.entries[:, self.length:self.length + self.block_len] = steps
            fewest, most = (int(v) for v in torch.aminmax(steps))
        self.fewest = fewest if self.length == 0 else min(self.fewest, fewest)
        self.most = max(self.most, most)
        self.length += self.block_len
        self.block_len = 0


@dataclass
class GenerationStats:
    """steps: the loops each fed token ran (B, prompt + new - 1); position p's token made token p+1."""

    steps: Tensor
    prompt_len: int
    budget: int
    fill: str
    slots: int
    cache_bytes: int
    halting: bool

    @property
    def new_token_steps(self) -> Tensor:
        """(B, new): the loops behind each generated token."""
        return self.steps[:, self.prompt_len - 1:]

    @property
    def loops_per_token(self) -> float:
        return self.new_token_steps.float().mean().item()


class _Caches:
    """The caches of one run: the loop's (core layers, and the readout's coda layers when halting
    reads the coda), the prelude's and the coda's (one entry per token)."""

    def __init__(self, model: LoopGPT, loop_layers: int, slots: int, budget: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        cfg = model.config

        def cache(layers: int, slots: int, budget: int) -> Optional[LoopKVCache]:
            return LoopKVCache(layers, slots, batch, max_len, cfg.n_embd, budget, dtype, device) if layers else None
        self.loop = cache(loop_layers, slots, budget)
        self.prelude, self.coda = cache(cfg.n_prelude, 1, 1), cache(cfg.n_coda, 1, 1)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in (self.loop, self.prelude, self.coda) if c is not None)


def _loop_layers(cfg: LoopConfig, halting: bool) -> int:
    """The layers of the loop's K/V cache: the core's, then the coda's when the halting criterion
    reads each loop's state out through the coda (the in-loop readout stores their keys and values)."""
    return cfg.n_layer + (cfg.n_coda if halting and halting_rules.CRITERIA[cfg.halt].reads_out else 0)


def _checked_call(model: LoopGPT, idx: Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                  pos: Optional[Tensor], halting: Optional[bool], n_loops: Optional[int], halt: Optional[bool]
                  ) -> tuple[bool, int]:
    """Check a generation call's arguments (a clear error for each bad one); returns whether it
    halts and its loop budget, as LoopGPT.forward decides them."""
    check_sampling(max_new_tokens, temperature, top_k)
    if pos is not None:
        model._check_positions(pos, (idx.size(0), idx.size(1) + max_new_tokens))
    model._check_inputs(idx, None, None if pos is None else pos[:, :idx.size(1)])
    halting = halting_rules.resolve(model.config, halting, model.training, halt)
    return halting, halting_rules.loop_budget(model.config, halting, n_loops)


@torch.no_grad()
def generate_cached(model: LoopGPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, *, fill: str = "latest", ring_size: Optional[int] = None,
                    halting: Optional[bool] = None, n_loops: Optional[int] = None, pos: Optional[Tensor] = None,
                    halt: Optional[bool] = None) -> tuple[Tensor, GenerationStats]:
    """Append max_new_tokens tokens to idx (B, T) with a per-loop K/V cache; returns (tokens, stats).

    temperature/top_k as LoopGPT.generate (0 is greedy). fill: one of FILLS (module docstring);
    ring_size: the slots of fill="ring". halting (or halt) and n_loops as LoopGPT.forward: by default the model
    halts in eval mode when its config names a criterion, within max_loops; else n_loops loops.
    pos: position ids (B, T + max_new_tokens) of the prompt and the tokens to come, as LoopGPT.generate.
    """
    halting, budget = _checked_call(model, idx, max_new_tokens, temperature, top_k, pos, halting, n_loops, halt)
    slots = _slots(fill, ring_size, budget)
    return _generate_cached(model, idx, max_new_tokens, temperature, top_k, halting, budget, fill, slots, pos)


def _generate_cached(model: LoopGPT, idx: Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                     halting: bool, budget: int, fill: str, slots: int, pos: Optional[Tensor]
                     ) -> tuple[Tensor, GenerationStats]:
    """generate_cached's tokens, its arguments checked; idx may be longer than block_size (a restart)."""
    cfg = model.config
    loop_layers = _loop_layers(cfg, halting)
    B, prompt_len = idx.shape
    caches, cache_bytes, all_steps = None, 0, []
    for i in range(max_new_tokens):
        if caches is None or idx.size(1) > cfg.block_size:  # (re)start from the cropped context
            feed = idx[:, -cfg.block_size:]
            to_feed = min(cfg.block_size, feed.size(1) + max_new_tokens - 1 - i)
            weight = model.lm_head.weight
            caches = _Caches(model, loop_layers, slots, budget, B, to_feed, weight.dtype, weight.device)
            cache_bytes = max(cache_bytes, caches.nbytes)
            start = 0
        else:
            feed, start = idx[:, -1:], caches.loop.length
        T = feed.size(1)
        for cache in (caches.loop, caches.prelude, caches.coda):
            if cache is not None:
                cache.begin(T)
        feed_pos = None if pos is None else pos[:, idx.size(1) - T:idx.size(1)]  # the task's ids of the fed tokens
        x0 = model.embed(feed, start, feed_pos, kv=caches.prelude)
        # per-token thresholds from the context seen so far, for the fed positions
        threshold = model.halt_bar(idx[:, -cfg.block_size:]).view(B, -1)[:, -T:].reshape(-1) if halting else None
        h, steps = run_loop(model, x0, budget, threshold, kv=caches.loop)
        if cfg.n_coda:
            h = blocks_with_cache(model, model.transformer.coda, h, caches.coda)
        caches.loop.commit(steps.view(B, T))
        for cache in (caches.prelude, caches.coda):
            if cache is not None:
                cache.commit()
        # a restart past block_size reran known tokens: count the new one only
        all_steps.append(steps.view(B, T) if i == 0 or start else steps.view(B, T)[:, -1:])
        next_token = sample_next_token(model.logits(h[:, -1]), temperature, top_k)
        idx = torch.cat((idx, next_token), dim=1)
    steps = torch.cat(all_steps, dim=1) if all_steps else torch.zeros(B, 0, dtype=torch.int32, device=idx.device)
    return idx, GenerationStats(steps, prompt_len, budget, fill, slots, cache_bytes, halting)


def _slots(fill: str, ring_size: Optional[int], budget: int) -> int:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if fill != "ring":
        if ring_size is not None:
            raise ValueError(f"ring_size is for fill='ring', got ring_size={ring_size} with fill={fill!r}")
        return budget if fill == "latest" else 1
    if not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"fill='ring' needs ring_size, an integer >= 1, got {ring_size!r}")
    return min(ring_size, budget)


class StaticKVCache:
    """Preallocated keys and values of up to max_len tokens, per layer and per loop (one slot for
    each loop of the budget: the "latest" fill). A block of tokens is fed at a time: `begin(T)`,
    the loop's `store` calls, `commit(steps)`. A token that ran s loops has its entry e_s copied
    into the slots of the later loops when its block is committed (once a token, not once a loop),
    so that a later token reads loop t's slot as it is: e_min(t, s), and no loop gathers.

    Two ways to say where the block sits. `positioned=False`: at the host's count of committed
    tokens, and the past is that many tokens (sliced). positioned=True: at a device position (`at`,
    advanced on the device); the first block after a reset (the prompt) has no past, and each later
    block is one token whose past is all max_len places, of which attention reads the ones written
    so far (its `key_len`, on the device): every step has the same shapes, so one compiled graph (or
    a captured CUDA graph) serves every token, on every backend.
    """

    def __init__(self, n_layer: int, slots: int, batch: int, max_len: int, n_embd: int, dtype: torch.dtype,
                 device: torch.device, positioned: bool = False):
        shape = (n_layer, slots, batch, max_len, n_embd)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.at = torch.zeros((), dtype=torch.long, device=device)  # the block's first position (positioned)
        self.slot_loops = torch.arange(1, slots + 1, device=device)  # the loop each slot holds
        self.slots, self.batch, self.max_len, self.positioned = slots, batch, max_len, positioned
        self.length = 0  # tokens committed (host count; positioned: `at` on the device instead)
        self.block_len = 0
        self.empty = True  # nothing committed since the last reset (known on the host, positioned too)
        self.held = torch.zeros(batch, dtype=torch.int32, device=device)  # positioned: key_len of a block's past
        if positioned:  # the buffers keep their addresses: a compiled step reads them in place
            for t in (self.keys, self.values, self.at):
                torch._dynamo.mark_static_address(t)

    def begin(self, block_len: int) -> None:
        """Open a block of block_len tokens per row: where they go, planned once for every store."""
        if not self.positioned and self.length + block_len > self.max_len:  # positioned: the caller counts
            raise ValueError(f"the cache holds {self.max_len} tokens; {self.length} are cached and "
                             f"{block_len} more do not fit")
        self.block_len = block_len
        device = self.at.device
        if self.positioned:
            if not self.empty and block_len != 1:
                raise ValueError(f"a positioned cache takes one token a block after its first, got {block_len}")
            self.block = self.at + torch.arange(block_len, device=device)  # positions (T,), on the device
            self.held = (self.at + block_len).to(torch.int32).expand(self.batch).contiguous()
        else:
            self.block = torch.arange(self.length, self.length + block_len, device=device)
        batch = torch.arange(self.batch, device=device)[:, None]
        self.block_flat = (batch * self.max_len + self.block).reshape(-1)  # (B * T,) into (B * max_len)

    def store(self, layer: int, loop: int, rows: Optional[Tensor], keys: Tensor, values: Tensor,
              keep: Optional[Tensor] = None) -> None:
        slot = (loop - 1) % self.slots
        flat = self.block_flat if rows is None else self.block_flat.index_select(0, rows)
        for buffer, new in ((self.keys, keys), (self.values, values)):
            view = buffer[layer, slot].view(self.batch * self.max_len, -1)
            if keep is not None:  # halted tokens keep their entries
                new = torch.where(keep[:, None], view.index_select(0, flat), new)
            view.index_copy_(0, flat, new)

    def past(self, layer: int, loop: int) -> Optional[Past]:
        """Every earlier token's entry for `loop` (a view); a one-token block (a decode step) reads
        its own keys and values from here too (stored just before: no concatenation), `with_block`.
        Positioned, the past is every place, of which the first `held` are written."""
        if self.empty:  # the block's own keys and values are the attention's
            return None
        with_block, slot = self.block_len == 1, (loop - 1) % self.slots
        if self.positioned:
            return Past(self.keys[layer, slot], self.values[layer, slot], with_block, self.held)
        span = slice(0, self.length + (1 if with_block else 0))
        return Past(self.keys[layer, slot, :, span], self.values[layer, slot, :, span], with_block)

    def reset(self) -> None:
        """Empty the cache for a new sequence (the buffers stay where they are)."""
        self.at.zero_()
        self.length = self.block_len = 0
        self.empty = True

    def commit(self, steps: Optional[Tensor] = None) -> None:
        """Close the block: its tokens ran `steps` (B, T) loops (None: every loop of the budget);
        each token's last entry fills the slots of the loops it did not run."""
        T = self.block_len
        if steps is not None and self.slots > 1:
            last = (steps.view(1, 1, self.batch, T, 1).long() - 1).clamp(min=0)  # the slot of e_s
            not_run = self.slot_loops.view(1, -1, 1, 1, 1) > last + 1  # (1, slots, B, T, 1)
            for buffer in (self.keys, self.values):
                block = buffer.index_select(3, self.block)  # (layers, slots, B, T, C)
                final = block.gather(1, last.expand(block.size(0), 1, -1, -1, block.size(-1)))
                buffer.index_copy_(3, self.block, torch.where(not_run, final, block))
        if self.positioned:
            self.at.add_(T)
        else:
            self.length += T
        self.block_len, self.empty = 0, False


class Decoder:
    """Decode as one step per token: every loop of the new tokens (B, 1), halting included (masked
    loops: every row runs every loop of the budget, a halted row's results discarded), the prelude's
    and coda's blocks, the readout and sampling, all on the device over static caches. The step
    reads nothing on the host; tokens stay on the device until the caller reads them.

    compile: torch.compile the step (fullgraph; mode="reduce-overhead" on CUDA, which captures it in
    a CUDA graph and replays it per token), with `compiler` (torch.compile's backend). On every
    backend: a kernel backend's ops are custom ops under compilation (`looplm.backends.compilable`),
    and its attention reads the filled part of the static caches through `key_len`.

    stop_early: with halting, read after every loop whether a row still runs, so that halted rows
    stop computing and the step ends when every row has halted (the compacted loop, reading after
    each loop). That is a host read per loop: for the CPU, where a read waits for no device and the
    masked loops' full budget would cost more; never with compile."""

    def __init__(self, model: LoopGPT, batch: int, max_len: int, budget: int, halting: bool, temperature: float,
                 top_k: Optional[int], compile: bool = False, compiler: str = "inductor", stop_early: bool = False):
        cfg, weight = model.config, model.lm_head.weight
        if compile and stop_early:
            raise ValueError("stop_early reads the device after every loop: a compiled step cannot")
        self.model, self.batch, self.budget, self.halting = model, batch, budget, halting
        self.stop_early = stop_early
        self.temperature, self.top_k = temperature, top_k
        loop_layers = _loop_layers(cfg, halting)

        def cache(layers: int, slots: int) -> Optional[StaticKVCache]:
            return StaticKVCache(layers, slots, batch, max_len, cfg.n_embd, weight.dtype, weight.device,
                                 positioned=compile) if layers else None
        # A decoder outlives the call that made it (for_model keeps the compiled ones): its buffers are
        # normal tensors, which a later call writes in place whether it runs under inference mode or not.
        with torch.inference_mode(False):
            self.loop = cache(loop_layers, budget)
            self.prelude, self.coda = cache(cfg.n_prelude, 1), cache(cfg.n_coda, 1)
            # the fed token's threshold (criterion units): the latest trigger's, as halting.thresholds
            self.threshold = torch.zeros(batch, device=weight.device)
        self.caches = [c for c in (self.loop, self.prelude, self.coda) if c is not None]
        self.step = self._step
        if compile:
            # The step writes the threshold in place: a CUDA graph is captured only over static inputs.
            torch._dynamo.mark_static_address(self.threshold)
            mode = "reduce-overhead" if weight.device.type == "cuda" and compiler == "inductor" else None
            self._compiled_step = torch.compile(self._step, fullgraph=True, backend=compiler, mode=mode)
            self.step = self._replayed_step

    @classmethod
    def for_model(cls, model: LoopGPT, batch: int, max_len: int, budget: int, halting: bool, temperature: float,
                  top_k: Optional[int], compile: bool = False, compiler: str = "inductor",
                  stop_early: bool = False) -> "Decoder":
        """A decoder for this model, emptied. A compiled one holds block_size places, and the latest
        COMPILED_KEPT are kept, so that the next call with the same model and arguments replays its
        graph (a benchmark alternating backends or batch sizes recompiles nothing)."""
        if not compile:
            return cls(model, batch, max_len, budget, halting, temperature, top_k, stop_early=stop_early)
        weight = model.lm_head.weight
        key = (id(model), batch, budget, halting, temperature, top_k, compiler, model.backend.name, weight.dtype,
               weight.device)
        decoder = _COMPILED.pop(key, None)
        if decoder is None or decoder.model is not model:  # (a new model may reuse a freed one's id)
            decoder = cls(model, batch, model.config.block_size, budget, halting, temperature, top_k, True, compiler)
        _COMPILED[key] = decoder
        while len(_COMPILED) > COMPILED_KEPT:
            _COMPILED.popitem(last=False)
        decoder.reset()
        return decoder

    def reset(self) -> None:
        for c in self.caches:
            c.reset()
        self.threshold.zero_()

    def prefill(self, idx: Tensor, pos: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Run the prompt (B, T) (compacted halting loop: a few capacity reads, once); returns the
        first new token (B, 1) and the prompt's steps (B, T)."""
        model, cfg = self.model, self.model.config
        B, T = idx.shape
        for c in self.caches:
            c.begin(T)
        x0 = model.embed(idx, 0, pos, kv=self.prelude)
        threshold = None
        if self.halting:
            per_token = halting_rules.thresholds(cfg, idx)
            self.threshold.copy_(per_token[:, -1])
            threshold = halting_rules.halt_bar(cfg.halt, per_token)
        h, steps = run_loop(model, x0, self.budget, threshold, kv=self.loop)
        return self._finish(h, steps.view(B, T))

    def _step(self, token: Tensor, position: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """One new token (B, 1) at the task's position ids `position` (B, 1) or the cache's next."""
        model, cfg = self.model, self.model.config
        for c in self.caches:
            c.begin(1)
        if position is None:
            position = self.loop.at.view(1, 1) if self.loop.positioned else \
                torch.full((1, 1), self.loop.length, device=token.device)
        x0 = model.embed(token, pos=position.expand(self.batch, 1), kv=self.prelude)
        if self.halting:
            for trigger, value in cfg.halt_thresholds_after.items():
                self.threshold.copy_(torch.where(token[:, 0] == trigger, value, self.threshold))
            h, steps = halting_loop(model, x0, self.budget, halting_rules.halt_bar(cfg.halt, self.threshold),
                                    compact=self.stop_early, kv=self.loop,
                                    reads=tuple(range(cfg.min_loops, self.budget)) if self.stop_early else None)
        else:
            h, steps = plain_loop(model, x0, self.budget, kv=self.loop)
        return self._finish(h, steps.view(self.batch, 1))

    def _replayed_step(self, token: Tensor, position: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The compiled step, its outputs copied out: a CUDA graph's outputs live at fixed addresses,
        which its next replay overwrites (cudagraph trees free them when the next call begins), and
        the caller keeps every token and feeds each to the next step."""
        token, steps = self._compiled_step(token, position)
        return token.clone(), steps.clone()

    def _finish(self, h: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        if model.config.n_coda:
            h = blocks_with_cache(model, model.transformer.coda, h, self.coda)
        self.loop.commit(steps if self.halting else None)  # at fixed depth every slot is written
        for c in (self.prelude, self.coda):
            if c is not None:
                c.commit()
        return sample_next_token(model.logits(h[:, -1]), self.temperature, self.top_k), steps


# The latest compiled decoders by their arguments, oldest first (Decoder.for_model). Each holds its
# model and its static caches (block_size places per loop of the budget) until it drops out.
COMPILED_KEPT = 4
_COMPILED: OrderedDict[tuple, Decoder] = OrderedDict()


@torch.no_grad()
def generate_static(model: LoopGPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, *, halting: Optional[bool] = None, n_loops: Optional[int] = None,
                    pos: Optional[Tensor] = None, compile: bool = False, compiler: str = "inductor",
                    stop_early: Optional[bool] = None, halt: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """LoopGPT.generate with the Decoder: the prompt once, then one step per token while the context
    fits block_size; past it, every further token reruns the cropped context (generate_cached's
    restart, as nanoGPT). Returns (tokens (B, T + new), steps (B, T + new - 1)): the loops each fed
    token ran. Equal, token for token, to generate_cached (fill "latest"). compile, compiler and
    stop_early as Decoder; stop_early None: with halting on the CPU without compile (there a read
    waits for nothing), else the sync-free step."""
    halting, budget = _checked_call(model, idx, max_new_tokens, temperature, top_k, pos, halting, n_loops, halt)
    cfg = model.config
    B, T = idx.shape
    if max_new_tokens == 0:
        return idx, torch.zeros(B, 0, dtype=torch.int32, device=idx.device)
    in_cache = min(max_new_tokens, cfg.block_size - T + 1)  # new tokens made while the context fits
    if stop_early is None:
        stop_early = halting and not compile and idx.device.type == "cpu"
    decoder = Decoder.for_model(model, B, min(cfg.block_size, T + in_cache - 1), budget, halting, temperature, top_k,
                                compile=compile, compiler=compiler, stop_early=stop_early)
    token, steps = decoder.prefill(idx, None if pos is None else pos[:, :T])
    tokens, all_steps = [token], [steps]
    for i in range(1, in_cache):
        token, steps = decoder.step(token, None if pos is None else pos[:, T + i - 1:T + i])
        tokens.append(token)
        all_steps.append(steps)
    out = torch.cat([idx, *tokens], dim=1)
    steps = torch.cat(all_steps, dim=1)
    if in_cache < max_new_tokens:  # the context outgrew block_size: generate_cached's restarts
        rest = max_new_tokens - in_cache
        out, stats = _generate_cached(model, out, rest, temperature, top_k, halting, budget, "latest", budget, pos)
        steps = torch.cat([steps, stats.steps[:, -rest:]], dim=1)
    return out, steps
