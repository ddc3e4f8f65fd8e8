"""Shape buckets, and the shapes the shipped model configs launch: the one home of both.

A kernel describes a launch by its shape key, a tuple of ints it defines itself (`KernelTuning.
shape_key`). Tables are filed by bucket: every dim rounded up to a power of two, so the 4096 x 384
launch of a layer norm and a 4000 x 300 one share an entry. A launch with no entry of its own takes the
nearest bucket, nearness being the distance between the dims' log2.

The tuner tunes the shapes a model actually launches: `op_calls` lists every op call of one forward
pass of a model shape, as meta tensors, and each kernel's own `shape_key` turns them into shape keys.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from looplm.ops import SIGNATURES, BlockWeights

Shape = tuple[int, ...]

# What `python -m tuning.autotune` tunes unless told otherwise: bf16 for training and fp32, the model's
# own dtype, for evaluation and generation.
TUNED_DTYPES: tuple[str, ...] = ("bfloat16", "float32")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def bucket(shape: Sequence[int]) -> Shape:
    """Each dim rounded up to a power of two (0 stays 0)."""
    out = []
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"a shape key holds integers >= 0, got {dim!r} in {tuple(shape)}")
        out.append(0 if dim == 0 else 1 << (dim - 1).bit_length())
    return tuple(out)


def bucket_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Sum over dims of |log2 a - log2 b|; infinite between keys of different length."""
    if len(a) != len(b):
        return math.inf

    def log2(d: int) -> float:
        return math.log2(d) if d > 0 else -1.0
    return sum(abs(log2(x) - log2(y)) for x, y in zip(a, b))


def nearest_bucket(target: Sequence[int], buckets: Iterable[Sequence[int]]) -> Optional[Shape]:
    """The bucket closest to `target` (ties: the smaller one), or None if none has its length."""
    best = min(((bucket_distance(target, b), tuple(b)) for b in buckets), default=None)
    return None if best is None or best[0] == math.inf else best[1]


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def parse_shape(text: str) -> Shape:
    """'4096x384' -> (4096, 384)."""
    if not re.fullmatch(r"\d+(x\d+)*", text.strip()):
        raise ValueError(f"a shape is integers joined by 'x' (e.g. 4096x384), got {text!r}")
    return tuple(int(d) for d in text.strip().split("x"))


@dataclass(frozen=True)
class ModelShape:
    """The dims of a model and its batch that decide the kernels' launch shapes."""

    name: str
    batch: int
    context: int  # block_size
    n_embd: int
    n_head: int
    vocab: int
    n_loops: int = 12

    def __post_init__(self) -> None:
        for field in ("batch", "context", "n_embd", "n_head", "vocab", "n_loops"):
            if getattr(self, field) < 1:
                raise ValueError(f"model shape {self.name!r}: {field} must be >= 1, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model shape {self.name!r}: n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")


# The shipped model configs: the character model on tiny-shakespeare (and its GPT-2-vocabulary
# variant, 50304 = 50257 padded to a multiple of 64) and nanoGPT's CPU-sized one.
MODEL_SHAPES: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("shakespeare-char", batch=16, context=256, n_embd=384, n_head=6, vocab=65),
    ModelShape("shakespeare-gpt2", batch=16, context=256, n_embd=384, n_head=6, vocab=50304),
    ModelShape("cpu", batch=12, context=64, n_embd=128, n_head=4, vocab=65),
)}


def model_shape(spec: str) -> ModelShape:
    """A shipped model shape by name, or one read from a JSON model config (LoopConfig keys, plus an
    optional batch_size; a "model" sub-object is read if present)."""
    if spec in MODEL_SHAPES:
        return MODEL_SHAPES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"model config {spec!r} is neither a shipped model shape ({', '.join(MODEL_SHAPES)}) "
                         "nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read model config {spec!r}: {e}") from None
    cfg = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {spec!r} must hold a JSON object")
    from looplm.config import LoopConfig
    defaults = LoopConfig()
    pick = lambda key, fallback: cfg.get(key, raw.get(key, fallback))  # noqa: E731
    return ModelShape(path.stem, batch=int(pick("batch_size", 1)), context=int(pick("block_size", defaults.block_size)),
                      n_embd=int(pick("n_embd", defaults.n_embd)), n_head=int(pick("n_head", defaults.n_head)),
                      vocab=int(pick("vocab_size", defaults.vocab_size)), n_loops=int(pick("n_loops", defaults.n_loops)))


OpCall = tuple[tuple, dict]  # (args, kwargs) of one op call


def op_calls(model: ModelShape, dtype: torch.dtype, device: Any = "meta") -> dict[str, list[OpCall]]:
    """Every distinct op call of a forward pass of `model` (training and evaluation), per op name."""
    B, T, C, H, V = model.batch, model.context, model.n_embd, model.n_head, model.vocab
    N = B * T

    def t(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device=device)

    weights = BlockWeights(t(C), t(C), t(3 * C, C), t(3 * C), t(C, C), t(C), t(C), t(C), t(4 * C, C), t(4 * C),
                           t(C, 4 * C), t(C))
    x = t(B, T, C)
    head = t(B, H, T, C // H)
    return {
        "layer_norm": [((x, t(C), t(C)), {})],
        "linear": [
            ((x, t(3 * C, C), t(3 * C)), {}),  # attention in-projection
            ((x, t(C, C), t(C)), {"residual": x}),  # attention out-projection
            ((x, t(4 * C, C), t(4 * C)), {"activation": "gelu"}),  # MLP up
            ((t(B, T, 4 * C), t(C, 4 * C), t(C)), {"residual": x}),  # MLP down
            ((x, t(V, C)), {}),  # lm_head, every position
            ((t(B, 1, C), t(V, C)), {}),  # lm_head, last position (evaluation, generation)
        ],
        "layer_norm_linear": [
            ((x, t(C), t(C), t(3 * C, C), t(3 * C)), {}),  # ln_1 + attention in-projection
            ((x, t(C), t(C), t(4 * C, C), t(4 * C)), {"activation": "gelu"}),  # ln_2 + MLP up
        ],
        "attention": [((head, head, head), {})],
        "softmax_entropy": [((t(B, T, V),), {})],
        "halt_update": [((t(N, C), t(N, C), t(N, dt=torch.bool), t(N, dt=torch.int32), t(N, dt=torch.float32),
                          t(N, dt=torch.float32), 1, 1, model.n_loops), {})],
        "block": [((x, weights, H), {})],
    }


def calls_by_key(op: str, shape_key, model: ModelShape, dtype: torch.dtype) -> dict[Shape, OpCall]:
    """Each distinct shape key a kernel of `op` sees in `model`'s forward pass (its own `shape_key`
    applied to the op's arguments, all passed positionally with defaults filled in), with the first
    op call (args, kwargs; meta tensors) that gives it."""
    found: dict[Shape, OpCall] = {}
    for args, kwargs in op_calls(model, dtype).get(op, []):
        bound = SIGNATURES[op].bind(*args, **kwargs)
        bound.apply_defaults()
        found.setdefault(tuple(int(d) for d in shape_key(*bound.args)), (args, kwargs))
    return found


def shape_keys(op: str, shape_key, model: ModelShape, dtype: torch.dtype) -> list[Shape]:
    """The distinct shape keys a kernel of `op` sees in `model`'s forward pass (see calls_by_key)."""
    return list(calls_by_key(op, shape_key, model, dtype))


# ---- an op call as plain data (it travels to the tuner's worker process) and back as tensors

def describe_call(args: tuple, kwargs: dict) -> tuple:
    """(args, kwargs) with each tensor replaced by ("tensor", shape, dtype name) and block weights
    by ("weights", [...]): what `materialize` turns back into fresh tensors on a device."""
    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
        if isinstance(value, BlockWeights):
            return ("weights", [spec(w) for w in value])
        return value
    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def materialize(call: tuple, device: Any) -> tuple[tuple, dict]:
    """The (args, kwargs) `describe_call` described, as random tensors on `device`: floats of unit
    scale (matrices scaled by 1/sqrt(fan-in)), booleans half set, integers small."""
    def make(value: Any) -> Any:
        if isinstance(value, tuple) and value and value[0] == "tensor":
            _, shape, dtype = value
            dtype = getattr(torch, dtype)
            if dtype == torch.bool:
                return torch.rand(shape, device=device) < 0.5
            if not dtype.is_floating_point:
                return torch.randint(0, 4, shape, device=device, dtype=dtype)
            scale = shape[-1] ** -0.5 if len(shape) == 2 else 1.0  # a weight matrix (out, in)
            return (torch.randn(shape, device=device) * scale).to(dtype)
        if isinstance(value, tuple) and value and value[0] == "weights":
            return BlockWeights(*(make(w) for w in value[1]))
        return value
    args, kwargs = call
    return tuple(make(a) for a in args), {k: make(v) for k, v in kwargs.items()}
