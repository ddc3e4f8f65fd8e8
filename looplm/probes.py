"""What each loop knows: per-loop states, readouts and linear probes, and fixed points.

    loop_states          the state after every loop, every token thinking every loop (no halting)
    readout_accuracy     the model's own frozen readout (ln_f + lm_head) on each loop's states
    probe_accuracy       a linear readout fit afresh (ridge regression on one-hot next tokens) on
                         each loop's states, scored on held-out positions
    fixed_points         per token, the first loop at which ||h_t - h_{t-1}|| / ||h|| drops below a
                         tolerance, and whether harder positions (higher final loss) get there later
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from looplm.halting import relative_change
from looplm.model import LoopGPT, LoopTrace


@torch.no_grad()
def loop_states(model: LoopGPT, idx: Tensor, n_loops: int) -> tuple[list[Tensor], LoopTrace]:
    """States (B, T, C) after loops 1..n_loops without halting, and the run's trace."""
    trace = LoopTrace(steps=torch.empty(0))
    states: list[Tensor] = []
    model.loop(model.embed(idx), idx, n_loops, halting=False, trace=trace, states=states)
    return states, trace


@torch.no_grad()
def readout_accuracy(model: LoopGPT, states: list[Tensor], targets: Tensor) -> list[float]:
    """Per loop: how often the model's own readout of that loop's state predicts targets (B, T)."""
    return [(model.head(h).argmax(-1) == targets).float().mean().item() for h in states]


def probe_accuracy(states: list[Tensor], targets: Tensor, vocab_size: int, ridge: float = 1e-2) -> list[float]:
    """Per loop: held-out accuracy of a linear probe fit on that loop's states.

    The probe is ridge regression from the state (plus a bias) onto one-hot targets, solved in
    closed form; it is fit on the even positions and scored on the odd ones."""
    flat_targets = targets.reshape(-1)
    fit, held_out = slice(0, None, 2), slice(1, None, 2)
    if flat_targets[held_out].numel() == 0:
        raise ValueError("probe_accuracy needs at least two positions")
    accuracies = []
    for h in states:
        x = h.reshape(-1, h.size(-1)).double()
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        y = torch.nn.functional.one_hot(flat_targets, vocab_size).double()
        xf = x[fit]
        gram = xf.T @ xf + ridge * torch.eye(x.size(1), dtype=x.dtype, device=x.device)
        weights = torch.linalg.solve(gram, xf.T @ y[fit])
        predicted = (x[held_out] @ weights).argmax(-1)
        accuracies.append((predicted == flat_targets[held_out]).float().mean().item())
    return accuracies


@dataclass
class FixedPoints:
    """converged_at (B, T): the first loop t >= 2 whose change from loop t-1 is below `tolerance`;
    n_loops + 1 where no loop within the budget gets there. hardness (B, T): the final loss (or
    entropy, without targets). rank_correlation: Spearman's rho between the two; > 0 means harder
    positions converge later."""

    tolerance: float
    n_loops: int
    converged_at: Tensor
    hardness: Tensor
    rank_correlation: float

    @property
    def converged_fraction(self) -> float:
        return (self.converged_at <= self.n_loops).float().mean().item()


def fixed_points(states: list[Tensor], hardness: Tensor, tolerance: float) -> FixedPoints:
    """Where each token's state stops moving (see FixedPoints)."""
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    n_loops = len(states)
    converged_at = torch.full(hardness.shape, n_loops + 1, dtype=torch.long, device=hardness.device)
    for t in range(n_loops, 1, -1):  # backwards, so the earliest loop below tolerance wins
        still = relative_change(states[t - 2], states[t - 1]) < tolerance
        converged_at = torch.where(still, t, converged_at)
    return FixedPoints(tolerance, n_loops, converged_at, hardness, spearman(hardness, converged_at.float()))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally shaped tensors (average ranks for ties); 0 if
    either is constant."""
    ra, rb = _ranks(a.reshape(-1).double()), _ranks(b.reshape(-1).double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator > 0 else 0.0


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    for value in x.unique():  # ties share the mean of their ranks
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
