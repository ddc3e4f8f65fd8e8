"""Halting, in one place: the criteria, their thresholds, their scores, and when the loop reads
how many tokens still run.

A criterion scores each token after every loop; the token stops once the score passes its
threshold (and min_loops is done), or at the loop budget. Each criterion is read one way by the
user ("entropy below 1.5 nats", "confidence above 0.9") and one way by the loop engine: every
score the engine and the backends' `halt_update` see is "lower is surer", so the criteria whose
natural reading is "higher is surer" (max probability, the learned gate's probability) are
negated here, in `halt_score` and `halt_bar`, and nowhere else.

    criterion    score (natural units)                          halts when   scored from
    entropy      entropy of the next-token distribution (nats)  <  threshold  the readout
    confidence   its max probability                            >  threshold  the readout
    delta        ||h_new - h|| / max(||h||, ||h_new||)           <  threshold  the state
    kl           KL(p_t || p_{t-1}) of the readout (nats)        <  threshold  the readout
    gate         sigmoid(halt_gate(h_new)), learned              >  threshold  the state

The readout criteria read the state out through the coda, ln_f and the head at every loop from
`first_scored_loop` on (earlier, no token may halt yet).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from looplm import torch_ops

if TYPE_CHECKING:
    from looplm.config import LoopConfig
    from looplm.model import LoopGPT


@dataclass(frozen=True)
class Criterion:
    """A halting criterion: the thresholds it allows, [low, high] (low itself only if low_allowed),
    whether a higher score means surer, and whether it is scored from the readout."""

    name: str
    low: float
    high: float
    low_allowed: bool
    higher_is_surer: bool
    reads_out: bool

    @property
    def comparison(self) -> str:
        """How a score passes the threshold, as the user reads it: '>' or '<'."""
        return ">" if self.higher_is_surer else "<"


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("entropy", 0.0, math.inf, True, higher_is_surer=False, reads_out=True),
    Criterion("confidence", 0.0, 1.0, False, higher_is_surer=True, reads_out=True),
    Criterion("delta", 0.0, math.inf, True, higher_is_surer=False, reads_out=False),
    Criterion("kl", 0.0, math.inf, True, higher_is_surer=False, reads_out=True),
    Criterion("gate", 0.0, 1.0, False, higher_is_surer=True, reads_out=False),
)}
NO_HALTING = "none"
# The tables other modules import: criterion -> (lowest, highest, whether the lowest is allowed).
HALT_CRITERIA: dict[str, Optional[tuple[float, float, bool]]] = {
    NO_HALTING: None, **{c.name: (c.low, c.high, c.low_allowed) for c in CRITERIA.values()}}
HIGHER_IS_SURER = tuple(c.name for c in CRITERIA.values() if c.higher_is_surer)
READOUT_CRITERIA = tuple(c.name for c in CRITERIA.values() if c.reads_out)


def check_threshold(criterion: str, value: float, what: str) -> None:
    """Refuse a threshold the criterion cannot take (a ConfigError naming the allowed interval)."""
    from looplm.config import ConfigError  # the config validates with this function
    if criterion == NO_HALTING:
        raise ConfigError(f"{what} is set but halt='none'; choose a criterion from {tuple(CRITERIA)}")
    c = CRITERIA[criterion]
    inside = isinstance(value, (int, float)) and not math.isnan(value) and \
        (c.low <= value if c.low_allowed else c.low < value) and value <= c.high
    if not inside:
        interval = f"{'[' if c.low_allowed else '('}{c.low}, {c.high}{']' if c.high != math.inf else ')'}"
        raise ConfigError(f"{what} for halt={criterion!r} must be in {interval}, got {value!r}")


def describe(config: "LoopConfig") -> str:
    """The config's halting rule as a user reads it, e.g. "entropy < 1.5"."""
    if config.halt == NO_HALTING:
        return "no halting"
    return f"{config.halt} {CRITERIA[config.halt].comparison} {config.halt_threshold}"


def resolve(config: "LoopConfig", halting: Optional[bool], training: bool, halt: Optional[bool] = None) -> bool:
    """Whether a call halts: None halts in eval mode when the config names a criterion, never in
    training; True or False forces it (True needs a criterion). `halt` is the keyword's former name
    (the config's `halt` names the criterion), still taken."""
    if halt is not None:
        if halting is not None and bool(halting) != bool(halt):
            raise ValueError(f"halting={halting!r} and halt={halt!r} disagree; pass halting= only")
        halting = halt
    if halting is None:
        return config.halt != NO_HALTING and not training
    if halting and config.halt == NO_HALTING:
        raise ValueError("halting=True but the config has halt='none'; set a halting criterion")
    return bool(halting)


def loop_budget(config: "LoopConfig", halting: bool, n_loops: Optional[int]) -> int:
    """A call's loop budget: n_loops if given (checked), else max_loops when it halts, n_loops when not."""
    budget = n_loops if n_loops is not None else (config.max_loops if halting else config.n_loops)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"n_loops must be an integer >= 1, got {budget!r}")
    if halting and budget < config.min_loops:
        raise ValueError(f"n_loops ({budget}) is below min_loops ({config.min_loops})")
    return budget


def thresholds(config: "LoopConfig", idx: Tensor, given: Optional[Tensor] = None) -> Tensor:
    """Per-token thresholds (B, T) in the criterion's own units: `given` if any (checked), else
    halt_threshold, replaced from each trigger token of halt_thresholds_after on (latest wins)."""
    if given is not None:
        if given.shape != idx.shape:
            raise ValueError(f"thresholds must have the shape of idx {tuple(idx.shape)}, got {tuple(given.shape)}")
        if not torch.compiler.is_compiling():  # a data-dependent check would break a compiled graph
            extremes = torch.stack(torch.aminmax(given.float())).tolist()  # one read; NaN shows in both
            for value in extremes:  # the allowed values are an interval: its ends decide
                check_threshold(config.halt, value, "thresholds")
        return given.to(device=idx.device, dtype=torch.float32)
    thr = torch.full(idx.shape, float(config.halt_threshold), device=idx.device)
    latest = torch.full(idx.shape, -1, device=idx.device)
    pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
    for token, value in config.halt_thresholds_after.items():
        last_seen = torch.where(idx == token, pos, -1).cummax(dim=1).values
        newer = last_seen > latest
        thr = torch.where(newer, value, thr)
        latest = torch.where(newer, last_seen, latest)
    return thr


def halt_bar(criterion: str, thresholds: Tensor) -> Tensor:
    """Thresholds in the criterion's units -> (N,) float32 in the engine's lower-is-surer units."""
    return (-thresholds if CRITERIA[criterion].higher_is_surer else thresholds).reshape(-1).float()


def relative_change(h: Tensor, h_new: Tensor, eps: float = 1e-6) -> Tensor:
    """||h_new - h|| / max(||h||, ||h_new||) per token, (B, T, C) -> (B, T) float32, in [0, 2].
    The larger norm in the denominator keeps the first loop from a zero state at 1, not infinity."""
    h, h_new = h.float(), h_new.float()
    norm = torch.linalg.vector_norm
    return norm(h_new - h, dim=-1) / torch.maximum(norm(h, dim=-1), norm(h_new, dim=-1)).clamp(min=eps)


def gate_probability(model: "LoopGPT", h: Tensor) -> Tensor:
    """The learned gate's halting probability of states h (..., C) -> (...,) float32."""
    return torch.sigmoid(model.halt_gate(h).squeeze(-1).float())


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
        value = torch.full(log_p.shape[:-1], math.inf, device=log_p.device) if prev_log_p is None else \
            (log_p.exp() * (log_p - prev_log_p.view_as(log_p))).sum(-1)
        if want_entropy:
            entropy = torch_ops.entropy_of(log_p, log_p.exp())
        return value, entropy, log_p
    if criterion in ("entropy", "confidence") or want_entropy:
        entropy, max_prob = model.backend.op("softmax_entropy")(logits)
    if criterion == "entropy":
        value = entropy
    elif criterion == "confidence":
        value = -max_prob
    elif criterion == "delta":
        value = relative_change(h, h_new)
    elif criterion == "gate":
        value = -gate_probability(model, h_new)
    else:
        value = None
    return value, entropy, None


def first_scored_loop(criterion: str, min_loops: int) -> int:
    """The first loop whose score (and readout) the halting rule can use: min_loops, the first a
    token may halt after; for KL the loop before, whose distribution the score compares with.
    Earlier loops skip the readout and the score unless a trace wants them."""
    return max(1, min_loops - (1 if criterion == "kl" else 0))


def capacity_reads(min_loops: int, n_loops: int) -> tuple[int, ...]:
    """The loops after which the compacted loop reads, in one device-to-host transfer, how many
    tokens still run (to size the next loops' rows, and to stop when none does): after loop
    min_loops (the first a token can halt after), then each time the loop count doubles, never
    after the last loop. At most log2(n_loops / min_loops) + 1 reads a forward, none inside a loop."""
    reads, t = [], max(1, min_loops)
    while t < n_loops:
        reads.append(t)
        t *= 2
    return tuple(reads)


@dataclass(frozen=True)
class CapacityPlan:
    """The compacted loop's slots for a forward of one shape, planned from how many tokens ran in
    an earlier one instead of read mid-forward: `running[t - 1]` tokens still ran after loop t, at
    most `most_in_row[t - 1]` in one batch row (t = 1 .. n_loops - 1). `slack` widens each count
    (a fraction) after a forward ran more tokens than its plan had slots for."""

    running: tuple[int, ...]
    most_in_row: tuple[int, ...]
    slack: float = 0.0

    def shrinks(self, n_tokens: int, row_len: int) -> dict[int, tuple[int, int]]:
        """loop t -> (slots, slots per batch row) after the loops where the planned slots fall to
        3/4 of the current ones or fewer (a re-plan costs a few small ops; it must pay for them),
        or to none (the loop stops). Both counts are widened by the slack, capped at the tokens."""
        def widened(count: int, cap: int) -> int:
            return min(cap, count + math.ceil(self.slack * count))

        plan, slots = {}, n_tokens
        for t, (running, most) in enumerate(zip(self.running, self.most_in_row), start=1):
            count = widened(running, n_tokens)
            if count == 0:
                plan[t] = (0, 0)
                break
            if 4 * count <= 3 * slots:
                plan[t], slots = (count, widened(most, row_len)), count
        return plan


class CapacityPlans:
    """The latest capacity plan of each forward shape (B, T, n_loops), kept by a model between
    forwards (the MAX_SHAPES used last). One read at the end of each forward (`running_counts`)
    records the next plan; a forward that ran more tokens than its plan had slots for is rerun by
    the engine and widens the slack of the plans that follow (1/16, doubling up to 1/2).

    Frozen (`freeze()`), the plans stop changing and a forward never reads the device, also under
    torch.compile and CUDA-graph capture, where it would otherwise run every token every loop: its
    compute falls as the plan says. A token that finds no slot stops where it found none, as if it
    had halted there (as a mixture of experts drops the tokens past an expert's capacity), and is
    counted on the device in `LoopGPT.capacity_dropped`, for the caller to read when it chooses."""

    MAX_SLACK = 0.5
    MAX_SHAPES = 64  # uncached generation grows T by one a token: keep the recent shapes only

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple[int, int, int], CapacityPlan] = OrderedDict()
        self.frozen = False

    def freeze(self) -> "CapacityPlans":
        """Keep the plans as they are, and let forwards of their shapes read nothing."""
        self.frozen = True
        return self

    def unfreeze(self) -> "CapacityPlans":
        self.frozen = False
        return self

    def get(self, key: tuple[int, int, int]) -> Optional[CapacityPlan]:
        return self._plans.get(key)

    def record(self, key: tuple[int, int, int], running: list[int], most_in_row: list[int],
               overflowed: bool) -> None:
        slack = self._plans[key].slack if key in self._plans else 0.0
        if overflowed:
            slack = min(self.MAX_SLACK, max(1 / 16, 2 * slack))
        self._plans[key] = CapacityPlan(tuple(running), tuple(most_in_row), slack)
        self._plans.move_to_end(key)
        if len(self._plans) > self.MAX_SHAPES:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()


def running_counts(steps: Tensor, n_loops: int) -> Tensor:
    """From every token's loop count steps (B, T): how many tokens still ran after each loop t =
    1 .. n_loops - 1, and the most in one batch row: (2, n_loops - 1) int64, on steps' device."""
    after = torch.arange(1, n_loops, device=steps.device)
    per_row = (steps[None] > after[:, None, None]).sum(-1)  # (n_loops - 1, B)
    return torch.stack([per_row.sum(1), per_row.amax(1) if per_row.size(1) else per_row.sum(1)])
