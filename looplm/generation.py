"""Adaptive generation with a K/V cache per loop step.

`LoopGPT.generate` reruns the whole context for every new token. `generate_cached` runs the prompt
once, then each new token alone: it loops until its halting criterion says stop (or the loop
budget), attending at loop t to the keys and values the earlier tokens offered at loop t, read
from a cache. The rows of a batch whose token has halted stop computing (`looplm.compaction`).

What a token offers at loop t. Its cache entries are e_1..e_s, the keys and values of its core
input at each loop it ran, and, if it halted before the budget, e_{s+1}: those of its frozen state
(the input the masked loop keeps giving it). With n = its number of entries, the fill policy
decides what a later token reads at loop t:

    latest   e_min(t, n): the loop-t entry, or the latest one a token that halted earlier has. This is
             exactly what LoopGPT.forward computes, so greedy generation equals LoopGPT.generate.
             Memory: one slot per loop of the budget.
    last     e_n only: every earlier token as it ended. Memory: one slot; an approximation.
    ring     the last k entries in a ring of k slots: e_t where kept, else the nearest kept one,
             e_clamp(t, n-k+1, n). k=1 is "last", k >= the budget is "latest".

Halting needs n_layer == 1 (a halted token's deeper keys would keep changing, see
looplm.compaction); without halting any n_layer works. Per-token thresholds follow the config
(`halt_thresholds_after`, e.g. a stricter threshold from each `=` on: "wait to think"), computed
from the tokens fed so far, so a schedule applies to generated tokens as to prompt tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from looplm.compaction import run_loop
from looplm.model import LoopGPT, check_sampling, sample_next_token

FILLS = ("latest", "last", "ring")


class LoopKVCache:
    """Keys and values of every cached token, per core layer, in a ring of `slots` loop entries.

    Entry e of a token lives in slot (e - 1) % slots, so the last `slots` entries written survive.
    Tokens are added a block at a time: `begin(T)`, the loop's `store` calls, `commit(steps)`.
    """

    def __init__(self, n_layer: int, slots: int, batch: int, max_len: int, n_embd: int, budget: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, slots, batch, max_len, n_embd)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.entries = torch.zeros(batch, max_len, dtype=torch.int32, device=device)
        self.slots, self.budget, self.max_len = slots, budget, max_len
        self.length = 0  # tokens committed
        self.block_len = 0  # tokens of the block being looped, at positions length ..

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.entries.nbytes

    def begin(self, block_len: int) -> None:
        if self.length + block_len > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {self.length} are cached and "
                             f"{block_len} more do not fit")
        self.block_len = block_len

    def store(self, layer: int, loop: int, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        batch, pos = rows // self.block_len, self.length + rows % self.block_len
        slot = (loop - 1) % self.slots
        self.keys[layer, slot, batch, pos] = keys
        self.values[layer, slot, batch, pos] = values

    def past(self, layer: int, loop: int) -> Optional[tuple[Tensor, Tensor]]:
        if self.length == 0:
            return None
        n = self.entries[:, :self.length]
        slot = (n.clamp(max=loop).maximum(n - self.slots + 1) - 1) % self.slots  # (B, P)
        first = slot[0, 0]
        if bool((slot == first).all()):
            s = int(first)
            return self.keys[layer, s, :, :self.length], self.values[layer, s, :, :self.length]
        batch = torch.arange(slot.size(0), device=slot.device)[:, None]
        pos = torch.arange(self.length, device=slot.device)[None, :]
        return self.keys[layer, slot, batch, pos], self.values[layer, slot, batch, pos]

    def commit(self, steps: Tensor) -> None:
        """Close the block: its tokens ran `steps` (B, T) loops; one more entry if they halted early."""
        entries = steps + (steps < self.budget).to(steps.dtype)
        self.entries[:, self.length:self.length + self.block_len] = entries
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


@torch.no_grad()
def generate_cached(model: LoopGPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, *, fill: str = "latest", ring_size: Optional[int] = None,
                    halt: Optional[bool] = None, n_loops: Optional[int] = None, pos: Optional[Tensor] = None
                    ) -> tuple[Tensor, GenerationStats]:
    """Append max_new_tokens tokens to idx (B, T) with a per-loop K/V cache; returns (tokens, stats).

    temperature/top_k as LoopGPT.generate (0 is greedy). fill: one of FILLS (module docstring);
    ring_size: the slots of fill="ring". halt and n_loops as LoopGPT.forward: by default the model
    halts in eval mode when its config names a criterion, within max_loops; else n_loops loops.
    pos: position ids (B, T + max_new_tokens) of the prompt and the tokens to come, as LoopGPT.generate.
    """
    check_sampling(max_new_tokens, temperature, top_k)
    if pos is not None:
        model._check_positions(pos, (idx.size(0), idx.size(1) + max_new_tokens))
    model._check_inputs(idx, None, None if pos is None else pos[:, :idx.size(1)])
    cfg = model.config
    if cfg.n_prelude or cfg.n_coda:
        raise ValueError(f"generate_cached needs a model without prelude or coda layers (they would need caches "
                         f"of their own), got n_prelude={cfg.n_prelude}, n_coda={cfg.n_coda}; use "
                         "LoopGPT.generate")
    halting = (cfg.halt != "none" and not model.training) if halt is None else bool(halt)
    if halting and cfg.halt == "none":
        raise ValueError("halt=True but the config has halt='none'; set a halting criterion")
    if halting and cfg.n_layer != 1:
        raise ValueError(f"cached generation with halting needs n_layer=1, got n_layer={cfg.n_layer} (a halted "
                         "token's deeper keys and values keep changing); pass halt=False or use LoopGPT.generate")
    budget = n_loops if n_loops is not None else (cfg.max_loops if halting else cfg.n_loops)
    if not isinstance(budget, int) or budget < (cfg.min_loops if halting else 1):
        raise ValueError(f"n_loops must be an integer >= {cfg.min_loops if halting else 1}, got {budget!r}")
    slots = _slots(fill, ring_size, budget)
    B, prompt_len = idx.shape
    fed = prompt_len + max(max_new_tokens - 1, 0)  # the last new token is never fed back
    if fed > cfg.block_size:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) - 1 = {fed} exceeds "
                         f"block_size {cfg.block_size}; LoopGPT.generate crops the context instead")

    x0 = model.embed(idx, pos=None if pos is None else pos[:, :prompt_len])
    cache = LoopKVCache(cfg.n_layer, slots, B, fed, cfg.n_embd, budget, x0.dtype, x0.device)
    all_steps = []
    for i in range(max_new_tokens):
        if i > 0:
            last = idx.size(1) - 1
            x0 = model.embed(idx[:, -1:], start=last, pos=None if pos is None else pos[:, last:last + 1])
        T = x0.size(1)
        threshold = model.halt_bar(idx).view(B, -1)[:, -T:].reshape(-1) if halting else None
        cache.begin(T)
        h, steps = run_loop(model, x0, threshold, budget, kv=cache)
        cache.commit(steps.view(B, T))
        all_steps.append(steps.view(B, T))
        next_token = sample_next_token(model.head(h[:, -1:])[:, -1], temperature, top_k)
        idx = torch.cat((idx, next_token), dim=1)
    steps = torch.cat(all_steps, dim=1) if all_steps else torch.zeros(B, 0, dtype=torch.int32, device=idx.device)
    return idx, GenerationStats(steps, prompt_len, budget, fill, slots, cache.nbytes, halting)


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
