"""Training settings: `TrainConfig`, and config files with `--key=value` overrides, as nanoGPT's.

A config is a Python file of assignments: any TrainConfig field, and any LoopConfig field (the
model; vocab_size comes from the task), and `base`, a config file whose settings it changes.
`--key=value` overrides it; values are Python literals (a bare word is a string). Unknown keys and ill-typed values are `ConfigError`s that say what is allowed.
"""
from __future__ import annotations

import ast
import difflib
import runpy
import traceback
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from looplm.config import ConfigError, LoopConfig
from looplm.data.addition import POSITIONS

TASKS = ("shakespeare", "addition")
LOSS_WEIGHTS = ("last", "all", "ramp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The model's keys: every LoopConfig field but vocab_size (the task's). A resumed run keeps the
# checkpoint's (model_key_conflicts); a fine-tuning run may change HALTING_KEYS only.
MODEL_KEYS = tuple(f.name for f in fields(LoopConfig) if f.name != "vocab_size")
# Settings that change how a trained model halts, not its weights: a fine-tuning run may change them.
HALTING_KEYS = ("halt", "halt_threshold", "halt_thresholds_after", "min_loops", "max_loops", "dropout")


@dataclass
class TrainConfig:
    # run
    out_dir: str = "out/run"
    data_dir: str = "out/data"
    task: str = "shakespeare"
    init_from: str = "scratch"  # scratch | resume (out_dir/last) | a checkpoint directory to fine-tune
    overwrite: bool = False  # a new run may replace the run already in out_dir (its logs and checkpoints)
    seed: int = 1337
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, else float32
    backend: str = "torch"
    compile: bool = False
    threads: Optional[int] = None  # CPU threads for torch; None keeps torch's choice
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    always_save_checkpoint: bool = False
    progress: bool = True  # a tqdm bar on a terminal, else a plain line every log_interval iterations
    report: bool = True  # print the end-of-run report
    sample_tokens: int = 300
    # batches
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    # addition (task="addition")
    train_digits: tuple = (1, 4)
    test_digits: tuple = tuple(range(1, 13))
    reverse_digits: bool = True
    zero_pad: bool = False
    swap_augment: bool = True
    random_offset: bool = True
    n_train: int = 100_000
    n_test: int = 200
    positions: str = "absolute"  # absolute | coupled | abacus: position ids the task gives (data/addition.py)
    pack: int = 1  # training problems per row, with task-given positions
    aligned: bool = False  # operands one leading zero wider, answer as wide, its length given (data/addition.py)
    carry_fraction: float = 0.0  # training problems with a planted carry chain of 2+ places (data/addition.py)
    # optimizer and schedule
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    max_iters: int = 2000
    max_seconds: Optional[float] = None  # wall-time budget; training stops when it is spent
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables
    # looped training
    loss_weights: str = "last"  # last | all | ramp: how each loop's readout loss counts
    loop_curriculum: tuple = ()  # e.g. (2, 4, 8, 12): training loop counts over equal parts of training
    random_depth: bool = False  # each batch runs a loop count drawn from [1, current]
    grad_loops: Optional[int] = None  # backprop through the last k loops only
    gate_loss_weight: float = 1.0  # with halt="gate": weight of the exit-distribution loss
    gate_entropy_weight: float = 0.05  # entropy bonus of the exit distribution
    gate_only: bool = False  # train the halting gate alone (a second stage, from init_from=<checkpoint>)

    def __post_init__(self) -> None:
        choices = {"task": TASKS, "loss_weights": LOSS_WEIGHTS, "dtype": ("auto", *DTYPES), "positions": POSITIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                    "log_interval", "n_train", "n_test")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "gate_loss_weight",
                     "gate_entropy_weight", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate})")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(f"lr_decay_iters must be >= 1 or None, got {self.lr_decay_iters!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {self.threads!r}")
        if self.grad_loops is not None and self.grad_loops < 1:
            raise ConfigError(f"grad_loops must be >= 1 or None, got {self.grad_loops!r}")
        for n in self.loop_curriculum:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigError(f"loop_curriculum must hold loop counts >= 1, got {self.loop_curriculum!r}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1!r}, {self.beta2!r}")
        if self.overwrite and self.init_from == "resume":
            raise ConfigError("overwrite=True replaces the run in out_dir and init_from='resume' continues it; "
                              "choose one")


def resolve_device(device: str) -> str:
    """The device a setting names: "auto" is cuda where there is one, else cpu; a CUDA device asked
    for where there is none is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype a setting names on `device`: "auto" is bf16 on a CUDA device that has it, else fp32;
    a half type is for CUDA devices only (a ConfigError elsewhere)."""
    cuda = torch.device(device).type == "cuda"
    if dtype == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype != "float32" and not cuda:
        raise ConfigError(f"dtype={dtype!r} needs a CUDA device; on {device} use 'float32' or 'auto'")
    return DTYPES[dtype]


def model_key_conflicts(saved: LoopConfig, model_keys: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, given value)} for each model key given that `saved` does not have; values
    compared as LoopConfig holds them (max_loops=None is n_loops, token ids of thresholds as ints)."""
    try:
        given = LoopConfig.from_dict({**saved.to_dict(), **model_keys})
    except (ConfigError, TypeError):  # the given keys do not make a config with the saved ones: compare as given
        return {k: (getattr(saved, k), v) for k, v in model_keys.items() if getattr(saved, k) != v}
    return {k: (getattr(saved, k), getattr(given, k)) for k in model_keys if getattr(given, k) != getattr(saved, k)}


def parse_args(argv: list[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """Config files and --key=value overrides, in order -> (TrainConfig, the model keys that were set)."""
    values: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep or not key:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            values[key] = _literal(raw)
        else:
            values.update(read_config_file(arg))
    return split_config(values)


def read_config_file(path: Union[str, Path], _within: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings a config file assigns. `base = "other.py"` (a path from the file's folder) reads
    that file's settings first and lets the file's own override them, so a baseline states only how
    it differs from the run it is compared with. A file that does not run is one ConfigError naming
    the file and line."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        namespace = runpy.run_path(str(path))
    except SyntaxError as e:
        raise ConfigError(f"{e.filename or path}:{e.lineno}: {e.msg} (a config file is Python assignments, "
                          f"e.g. batch_size = 12)") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == Path(path)]
        line = f":{frames[-1].lineno}" if frames else ""
        raise ConfigError(f"{path}{line}: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in namespace.items() if not k.startswith("_")
              and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    if "base" not in values:
        return values
    base = values.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of a config file (a string), got {base!r}")
    within, base_path = (*_within, Path(path).resolve()), (Path(path).parent / base).resolve()
    if base_path in within:
        raise ConfigError(f"{path}: base {base!r} leads back to {base_path.name}: config files may not "
                          f"be each other's base")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config file {base!r} does not exist (looked for {base_path})")
    return {**read_config_file(base_path, within), **values}


def split_config(values: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Check every key and type; the training keys make a TrainConfig, the model keys are returned."""
    hints = typing.get_type_hints(TrainConfig)
    known = sorted(set(hints) | set(MODEL_KEYS))
    train, model = {}, {}
    for key, value in values.items():
        if key in hints:
            train[key] = _coerce(key, value, hints[key])
        elif key in MODEL_KEYS:
            model[key] = value
        else:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {known}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    return TrainConfig(**train), model


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string


def _coerce(key: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is tuple and isinstance(value, (list, tuple, range)):
        return tuple(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")
