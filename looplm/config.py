"""LoopConfig: every architectural choice of a looped GPT, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from looplm.halting import HALT_CRITERIA, HIGHER_IS_SURER, READOUT_CRITERIA, check_threshold

STATE_INITS = ("zeros", "embed", "noise")
INJECTIONS = ("none", "add", "norm_add")
STEP_ENCODINGS = ("none", "learned", "sinusoidal")
UPDATES = ("replace", "euler")
# Halting criteria and their thresholds live in looplm.halting; these names stay importable from here.
__all__ = ["ConfigError", "HALT_CRITERIA", "HIGHER_IS_SURER", "LoopConfig", "READOUT_CRITERIA", "check_threshold"]


class ConfigError(ValueError):
    pass


@dataclass
class LoopConfig:
    vocab_size: int = 65
    block_size: int = 256
    # Rows of the position table. None: block_size (positions 0..T-1). A task that gives its own
    # position ids (model(idx, pos=...)) may need more, or fewer, than block_size.
    n_positions: Optional[int] = None
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 1  # layers in the tied core
    n_loops: int = 12  # times the core is applied in training (and without halting)
    n_prelude: int = 0  # untied layers before the loop
    n_coda: int = 0  # untied layers after the loop
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as nanoGPT
    # The loop: h = init; u = inject(h, x0) + step(t); g = core(u); h = update(h, g).
    # zeros + add makes loop 1 see exactly x0, so n_loops=1 is a plain GPT.
    state_init: str = "zeros"
    state_noise_std: float = 1.0  # for state_init="noise"
    inject: str = "add"
    step_encoding: str = "none"
    update: str = "replace"
    # Halting (applied in eval; see LoopGPT.forward and looplm.halting): the criterion's name or 'none'.
    halt: str = "none"
    halt_threshold: Optional[float] = None
    halt_thresholds_after: dict[int, float] = field(default_factory=dict)  # token id -> threshold from it on
    min_loops: int = 1
    max_loops: Optional[int] = None  # loop budget with halting; None means n_loops; may exceed it

    def __post_init__(self) -> None:
        self.halt_thresholds_after = {int(k): float(v) for k, v in dict(self.halt_thresholds_after).items()}
        if self.max_loops is None:
            self.max_loops = self.n_loops
        if self.n_positions is None:
            self.n_positions = self.block_size
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_positions", "n_embd", "n_head", "n_layer", "n_loops", "min_loops",
                     "max_loops"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("n_prelude", "n_coda"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("state_init", STATE_INITS), ("inject", INJECTIONS),
                              ("step_encoding", STEP_ENCODINGS), ("update", UPDATES),
                              ("halt", tuple(HALT_CRITERIA))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.inject == "none" and self.state_init != "embed":
            raise ConfigError(f"inject='none' with state_init={self.state_init!r} never shows the core the "
                              "input; use state_init='embed' or inject 'add' / 'norm_add'")
        if self.state_noise_std <= 0:
            raise ConfigError(f"state_noise_std must be > 0, got {self.state_noise_std!r}")
        if self.min_loops > self.max_loops:
            raise ConfigError(f"min_loops ({self.min_loops}) must be <= max_loops ({self.max_loops})")
        if self.halt != "none":
            if self.halt_threshold is None:
                raise ConfigError(f"halt={self.halt!r} needs halt_threshold")
            check_threshold(self.halt, self.halt_threshold, "halt_threshold")
        for token, value in self.halt_thresholds_after.items():
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"halt_thresholds_after: token id {token} is outside [0, {self.vocab_size})")
            check_threshold(self.halt, value, f"halt_thresholds_after[{token}]")

    @property
    def effective_depth(self) -> int:
        """Layers a token passes through at the training loop count."""
        return self.n_prelude + self.n_layer * self.n_loops + self.n_coda

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["halt_thresholds_after"] = {str(k): v for k, v in self.halt_thresholds_after.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown LoopConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

