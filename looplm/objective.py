"""The training loss of a looped model, `LoopObjective`, with what it is built from.

- multi-step supervision: the loss of every loop's readout, weighted `last`, `all` or `ramp`
  (`loop_weights`); only the loops with a weight above zero (or all, when the gate is trained) get a
  head pass;
- a learned halting gate (LoopConfig halt="gate"), trained on the expected loss under its exit
  distribution (`exit_distribution`) minus an entropy bonus.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from looplm.halting import gate_probability
from looplm.model import LoopGPT
from looplm.train_config import LOSS_WEIGHTS, TrainConfig


def loop_weights(kind: str, n_loops: int) -> list[float]:
    """Weights of the loss of each loop's readout, summing to 1."""
    if kind == "last":
        raw = [0.0] * (n_loops - 1) + [1.0]
    elif kind == "all":
        raw = [1.0] * n_loops
    elif kind == "ramp":
        raw = [float(t) for t in range(1, n_loops + 1)]
    else:
        raise ValueError(f"loss_weights must be one of {LOSS_WEIGHTS}, got {kind!r}")
    return [w / sum(raw) for w in raw]


def exit_distribution(halt_probs: Tensor) -> Tensor:
    """Per-loop halting probabilities (L, N) -> probability of exiting at each loop (L, N): halt at t
    having run on through 1..t-1; the last loop takes what is left."""
    survive = torch.cumprod(1 - halt_probs, dim=0)
    before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]])
    return torch.cat([(halt_probs * before)[:-1], before[-1:]])


class LoopObjective(nn.Module):
    """The training loss of a LoopGPT, as a module so DDP and torch.compile see one forward."""

    def __init__(self, model: LoopGPT, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.loss_weights = cfg.loss_weights
        self.gate = model.config.halt == "gate" and (cfg.gate_loss_weight > 0 or cfg.gate_only)
        self.gate_only = cfg.gate_only
        self.gate_loss_weight = cfg.gate_loss_weight
        self.gate_entropy_weight = cfg.gate_entropy_weight

    def forward(self, idx: Tensor, targets: Tensor, n_loops: int, grad_loops: Optional[int] = None,
                pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """-> (loss to minimise, the last loop's language-model loss for logging). Targets of -1
        carry no loss; losses are means over the tokens that have a target, as nanoGPT's."""
        model = self.model
        weights = loop_weights(self.loss_weights, n_loops)
        every_loop = self.gate or any(w > 0 for w in weights[:-1])
        states: list[Tensor] = []
        final = model.loop(model.embed(idx, pos=pos), idx, n_loops, halting=False, states=states if every_loop else None,
                           grad_loops=grad_loops)
        targets = targets.reshape(-1)
        if not self.gate:  # the head runs only for the loops whose loss counts
            if not every_loop:
                last_loss = lm_loss(model.head(final), targets)
                return last_loss, last_loss.detach()
            losses = {t: lm_loss(model.head(h), targets) for t, h in enumerate(states) if weights[t] > 0}
            return sum(weights[t] * loss for t, loss in losses.items()), losses[n_loops - 1].detach()
        # The gate weighs every loop's per-token loss by the probability of exiting there.
        per_token = torch.stack([lm_loss(model.head(h), targets, reduction="none") for h in states])  # (L, N)
        valid = (targets != -1).to(per_token.dtype)  # ignored tokens already have loss 0
        n_valid = valid.sum().clamp(min=1)
        per_loop = per_token.sum(1) / n_valid
        loss = per_loop.new_zeros(())
        if not self.gate_only:
            loss = loss + sum(w * per_loop[t] for t, w in enumerate(weights) if w > 0)
        halt_probs = torch.stack([gate_probability(model, h).reshape(-1) for h in states])
        exit_probs = exit_distribution(halt_probs)
        expected_loss = (exit_probs * per_token).sum() / n_valid
        entropy = (-(exit_probs * exit_probs.clamp(min=1e-12).log()).sum(0) * valid).sum() / n_valid
        loss = loss + self.gate_loss_weight * (expected_loss - self.gate_entropy_weight * entropy)
        return loss, per_loop[-1].detach()


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (B, T, V) against flat targets (B*T,), -1 ignored. The logits go in as
    they are, with no fp32 copy: autocast runs cross_entropy in fp32, and an fp32 model's logits are fp32."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, ignore_index=-1, reduction=reduction)
