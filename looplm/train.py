"""Train a LoopGPT: `python -m looplm.train CONFIG [--key=value ...]`.

Configs are Python files of assignments, as nanoGPT's (`looplm.train_config`): any TrainConfig
field and any LoopConfig field; `--key=value` overrides them.

The loop of training is nanoGPT's (AdamW with weight decay on matrices only, linear warm-up then
cosine decay, gradient clipping, periodic evaluation, best checkpoint). What a looped model adds:
the loss in `looplm.objective.LoopObjective` (per-loop supervision, the halting gate's loss), and
here a loop curriculum (the training loop count grows over training), random depth per batch,
truncated backprop through the last `grad_loops` loops, and `gate_only` to train the gate alone on
a trained model.

Progress through training (for the schedule and the curriculum) is iterations over
`lr_decay_iters`, or time over `max_seconds` when that is sooner. Checkpoints live in out_dir:
`last/` (model, plus train_state.pt with optimizer, RNG and iteration, for exact resume) and `best/`
(lowest validation loss). Logs: log.jsonl and metrics.csv. Under torchrun each process trains on its
own batches and gradients are averaged (DDP; gloo on CPU, nccl on GPU).

Nothing is lost. A new run refuses an out_dir that holds a run: resume it (`init_from=resume`) or
replace it (`overwrite=True`). Resuming checks before it changes anything: the train state against
the checkpoint's config.json (the iteration, the config, the optimizer's shapes), the settings given
against the checkpoint's (a model key or a task field that differs is refused; training knobs such
as max_iters or learning_rate may change), and every record of the logs; then the logs are cut back
to the checkpoint's iteration. A last record cut short by an interrupted write is dropped with a
warning; a corrupt record before it is an error naming the file and line. A run removes the
temporary files and folders that an interrupted save left in out_dir.
"""
from __future__ import annotations

import contextlib
import gc
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch import Tensor
from tqdm.auto import tqdm

from looplm.checkpoint import (CONFIG_FILE, TRAIN_STATE_FILE, CheckpointError, backup_path, checkpoint_dir,
                               load_checkpoint, load_train_state, read_checkpoint_doc, read_config,
                               remove_stale_saves, save_checkpoint)
from looplm.cli import run_cli, warn
from looplm.config import ConfigError, LoopConfig
from looplm.data.addition import RECORDED_FIELDS, AdditionTask
from looplm.data.shakespeare import ShakespeareTask
from looplm.fileio import atomic_write_text, remove_stale_temps
from looplm.model import LoopGPT
# The trainer's API as before the split: `from looplm.train import TrainConfig, LoopObjective, ...`
from looplm.objective import LoopObjective, exit_distribution, loop_weights  # noqa: F401
from looplm.train_config import (DTYPES, HALTING_KEYS, TrainConfig, model_key_conflicts,  # noqa: F401
                                 parse_args, read_config_file, resolve_device, resolve_dtype, split_config)

METRICS_FIELDS = ("iter", "n_loops", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s")
# What a run writes in out_dir: its logs (RunLog), its checkpoints and its report.
LOG_FILES = ("log.jsonl", "metrics.csv")
CHECKPOINTS = ("last", "best")
REPORT_FILE = "report.txt"


# ---- the task


def make_task(cfg: TrainConfig, block_size: int, n_positions: Optional[int] = None
              ) -> Union[ShakespeareTask, AdditionTask]:
    if cfg.task == "shakespeare":
        return ShakespeareTask(cfg.data_dir, block_size)
    return AdditionTask(**{field: getattr(cfg, key) for key, field in RECORDED_FIELDS.items()},
                        block_size=block_size, n_positions=n_positions)


def task_positions(task: Union[ShakespeareTask, AdditionTask], x: Tensor, split: str,
                   generator: torch.Generator) -> Optional[Tensor]:
    """The position ids a task gives the batch x, or None: the model's own 0..T-1."""
    return task.get_positions(x, split, generator) if isinstance(task, AdditionTask) else None


def task_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of its task, so evaluation rebuilds the same data."""
    keys = ("task",) + (tuple(RECORDED_FIELDS) if cfg.task == "addition" else ("data_dir",))
    return {k: getattr(cfg, k) for k in keys}


# ---- the schedule


def learning_rate(cfg: TrainConfig, it: int, progress: float) -> float:
    """Linear warm-up over warmup_iters, then cosine decay to min_lr as progress goes 0 -> 1."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if progress >= 1:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def curriculum_loops(cfg: TrainConfig, default: int, progress: float) -> int:
    if not cfg.loop_curriculum:
        return default
    stage = min(int(progress * len(cfg.loop_curriculum)), len(cfg.loop_curriculum) - 1)
    return cfg.loop_curriculum[stage]


def configure_optimizer(model: LoopGPT, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (2D) only, as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


# ---- files


class LogError(ValueError):
    """A log of the run in out_dir that cannot be read back: the file, the line, what is wrong."""


def _read_records(path: Path, parse, header: Optional[str] = None) -> list[tuple[str, Any]]:
    """The lines of a log (after its `header` line, checked) with what parse(line) makes of each (it
    raises ValueError on a bad one). The last line, cut short by an interrupted write, is dropped
    with a warning; a bad line before it is a LogError naming the file and line."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if header is not None and numbered:
        if numbered[0][1].strip() != header:
            raise LogError(f"{path}, line {numbered[0][0]}: expected the header {header!r}, "
                           f"got {numbered[0][1].strip()[:80]!r}")
        numbered = numbered[1:]
    out = []
    for i, (n, line) in enumerate(numbered):
        try:
            out.append((line, parse(line)))
        except (ValueError, KeyError, TypeError) as e:
            if i < len(numbered) - 1:
                raise LogError(f"{path}, line {n}: corrupt record ({e}); repair or remove that line to "
                               f"resume") from None
            warn(f"{path}: dropped its last record (line {n}), cut short by an interrupted write")
    return out


def _log_record(line: str) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
        raise ValueError("not an object with an integer 'iter'")
    return record


def _metrics_row(line: str) -> dict[str, str]:
    values = next(csv.reader([line]))
    if len(values) != len(METRICS_FIELDS):
        raise ValueError(f"{len(values)} fields where the header has {len(METRICS_FIELDS)}")
    row = dict(zip(METRICS_FIELDS, values))
    int(row["iter"])
    for field in METRICS_FIELDS[1:]:
        float(row[field])
    return row


class RunLog:
    """log.jsonl (every record) and metrics.csv (one row per evaluation) in out_dir."""

    def __init__(self, out_dir: Path, resume_iter: Optional[int]):
        self.jsonl, self.csv = (out_dir / name for name in LOG_FILES)
        if resume_iter is None:
            atomic_write_text(self.jsonl, "")
            atomic_write_text(self.csv, ",".join(METRICS_FIELDS) + "\n")
        else:  # drop what was logged after the checkpoint we resume from
            self._truncate(resume_iter)

    def _truncate(self, resume_iter: int) -> None:
        """Both logs are read and checked before either is rewritten."""
        records = _read_records(self.jsonl, _log_record) if self.jsonl.exists() else []
        rows = _read_records(self.csv, _metrics_row, ",".join(METRICS_FIELDS)) if self.csv.exists() else []
        kept = [line for line, record in records if record["iter"] <= resume_iter]
        atomic_write_text(self.jsonl, "".join(line + "\n" for line in kept))
        atomic_write_text(self.csv, ",".join(METRICS_FIELDS) + "\n" +
                          "".join(line + "\n" for line, row in rows if int(row["iter"]) <= resume_iter))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "eval":
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, METRICS_FIELDS, extrasaction="ignore", lineterminator="\n").writerow(record)


# ---- a run's out_dir


def run_files(out_dir: Path) -> list[str]:
    """What of a run out_dir holds: its logs and checkpoints (or a checkpoint's backup)."""
    return [name for name in (*LOG_FILES, *CHECKPOINTS) if (out_dir / name).exists()
            or (name in CHECKPOINTS and backup_path(out_dir / name).exists())]


def check_out_dir(cfg: TrainConfig) -> None:
    """A new run does not write over another run's results unless told to."""
    out_dir = Path(cfg.out_dir)
    if cfg.overwrite and cfg.init_from not in ("scratch", "resume"):
        source = Path(cfg.init_from).resolve()
        if out_dir.resolve() in (source, *source.parents):
            raise ConfigError(f"init_from={cfg.init_from!r} lies in out_dir {str(out_dir)!r}, which overwrite=True "
                              f"removes first; fine-tune into another out_dir")
    if cfg.init_from == "resume" or cfg.overwrite:
        return
    found = run_files(out_dir)
    if found:
        raise ConfigError(f"out_dir {str(out_dir)!r} already holds a run ({', '.join(found)}); resume it with "
                          f"--init_from=resume, or pass --overwrite=True to replace it")


def remove_run(out_dir: Path) -> None:
    """What overwrite=True replaces: the logs, checkpoints and report of the run in out_dir."""
    for name in CHECKPOINTS:
        for path in (out_dir / name, backup_path(out_dir / name)):
            shutil.rmtree(path, ignore_errors=True)
    for name in (*LOG_FILES, REPORT_FILE):
        (out_dir / name).unlink(missing_ok=True)


def prepare_out_dir(out_dir: Path) -> None:
    """out_dir made, and what interrupted writes left there removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINTS:
        remove_stale_saves(out_dir / name)
    for name in (*LOG_FILES, REPORT_FILE):
        remove_stale_temps(out_dir / name)


# ---- resuming

TRAIN_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "optimizer": (dict,), "scaler": (dict,), "iter_num": (int,), "best_val_loss": (int, float),
    "elapsed_s": (int, float), "history": (list,), "torch_rng": (Tensor,), "batch_rng": (Tensor,)}


def check_resume_settings(cfg: TrainConfig, model_keys: dict[str, Any], checkpoint: Path) -> None:
    """The settings of a resumed run do not contradict the checkpoint: its model keys and its task
    are the checkpoint's (training knobs may change)."""
    doc = read_checkpoint_doc(checkpoint)
    conflicts = model_key_conflicts(read_config(checkpoint), model_keys)
    saved_task = doc.get("metadata", {}).get("task", {})
    given_task = json.loads(json.dumps(task_metadata(cfg)))  # tuples as the record's lists
    conflicts.update({k: (saved_task[k], v) for k, v in given_task.items()
                      if k in saved_task and k != "data_dir" and saved_task[k] != v})
    if conflicts:
        found = ", ".join(f"{k}={saved!r} there, {given!r} given" for k, (saved, given) in conflicts.items())
        raise ConfigError(f"init_from=resume continues {checkpoint} as saved ({found}); drop the override, or "
                          f"start a new run (init_from=<checkpoint> fine-tunes one)")


def check_train_state(state: dict[str, Any], checkpoint: Path, model: LoopGPT,
                      optimizer: torch.optim.Optimizer) -> None:
    """The train state belongs to the checkpoint beside it: its fields, its iteration and config as
    config.json records them, and an optimizer state shaped as the model's parameters."""
    state_file = checkpoint / TRAIN_STATE_FILE
    for field, kinds in TRAIN_STATE_FIELDS.items():
        if field not in state:
            raise CheckpointError(f"{state_file}: no field {field!r}; it is not a train state written by looplm.train")
        if not isinstance(state[field], kinds) or isinstance(state[field], bool):
            raise CheckpointError(f"{state_file}: field {field!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                                  f"got {type(state[field]).__name__}")
    for i, record in enumerate(state["history"]):
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise CheckpointError(f"{state_file}: field 'history' item {i} is not an evaluation record with an "
                                  f"integer 'iter'")
    doc = read_checkpoint_doc(checkpoint)
    config_file = checkpoint / CONFIG_FILE
    recorded = doc.get("metadata", {}).get("iter_num")
    if recorded is not None and state["iter_num"] != recorded:
        raise CheckpointError(f"{state_file}: field 'iter_num' is {state['iter_num']} but {config_file} records "
                              f"iter_num {recorded}; the train state is from another run or save")
    saved_config = state.get("looplm_config")
    if saved_config is not None and saved_config != doc["looplm_config"]:
        keys = sorted(k for k in set(saved_config) | set(doc["looplm_config"])
                      if saved_config.get(k) != doc["looplm_config"].get(k))
        raise CheckpointError(f"{state_file}: field 'looplm_config' differs from {config_file}'s in {keys}; the "
                              f"train state is from another run")
    saved = state["optimizer"]
    groups = saved.get("param_groups")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if (not isinstance(groups, list) or not isinstance(saved.get("state"), dict)
            or [len(g.get("params", ())) for g in groups] != sizes):
        found = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else groups
        raise CheckpointError(f"{state_file}: field 'optimizer' holds parameter groups of sizes {found}; this "
                              f"model's optimizer has {sizes}")
    names = {id(p): name for name, p in model.named_parameters()}
    for saved_group, group in zip(groups, optimizer.param_groups):
        for key, param in zip(saved_group["params"], group["params"]):
            for name, value in saved["state"].get(key, {}).items():
                if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(
                        f"{state_file}: field 'optimizer' holds {name} of shape {tuple(value.shape)} for "
                        f"{names[id(param)]}, which is {tuple(param.shape)} in {config_file}'s model; the train "
                        f"state is from another model")


# ---- training


@dataclass
class TrainResult:
    model: LoopGPT
    task: Union[ShakespeareTask, AdditionTask]
    history: list[dict[str, Any]]  # the evaluations
    out_dir: Path
    iter_num: int
    best_val_loss: float
    elapsed_s: float
    tokens_per_s: float  # over the whole run (this process's part of a resumed run), evaluations included
    device: str
    report: str = ""


@dataclass
class _Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Distributed:
    if "RANK" not in os.environ:
        return _Distributed()
    ddp = _Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp


def build_model(cfg: TrainConfig, model_keys: dict[str, Any], vocab_size: int) -> LoopGPT:
    """A fresh model, or the weights of init_from=<checkpoint> under the halting settings given here
    (a gate added for a second stage starts fresh)."""
    if cfg.init_from in ("scratch", "resume"):
        return LoopGPT(LoopConfig(vocab_size=vocab_size, **model_keys))
    source = load_checkpoint(cfg.init_from)
    changed = {k: (getattr(source.config, k), v) for k, v in model_keys.items()
               if k not in HALTING_KEYS and getattr(source.config, k) != v}
    if changed:
        raise ConfigError(f"init_from={cfg.init_from!r} has another architecture; (checkpoint, config): {changed}. "
                          f"Only {HALTING_KEYS} may change when fine-tuning")
    model = LoopGPT(LoopConfig.from_dict({**source.config.to_dict(), **model_keys}))
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    fresh = [k for k in missing if not k.startswith("halt_gate.")]
    if fresh or unexpected:
        raise ConfigError(f"cannot start from {cfg.init_from!r}: missing {fresh}, unexpected {unexpected}")
    return model


def train(cfg: TrainConfig, model_keys: Optional[dict[str, Any]] = None) -> TrainResult:
    """Run training as configured; returns the trained model (best checkpoint's weights are on disk)."""
    model_keys = dict(model_keys or {})
    check_out_dir(cfg)  # before any process of a DDP run writes
    device = resolve_device(cfg.device)
    ddp = _setup_distributed(device)
    if ddp.enabled and device.startswith("cuda"):
        device = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(device)
    device_type = torch.device(device).type
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = (torch.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    out_dir = Path(cfg.out_dir)
    last_dir, best_dir = (out_dir / name for name in CHECKPOINTS)
    if ddp.master:
        prepare_out_dir(out_dir)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + ddp.rank)
    batch_rng = torch.Generator().manual_seed(cfg.seed + ddp.rank)
    # init_from='resume' with nothing complete to resume from fails here, naming the missing file
    state = load_train_state(last_dir) if cfg.init_from == "resume" else None
    if cfg.init_from == "scratch":
        block_size = model_keys.get("block_size", LoopConfig.block_size)
        n_positions = model_keys.get("n_positions") or block_size
    else:
        source_config = read_config(last_dir if cfg.init_from == "resume" else cfg.init_from)
        block_size, n_positions = source_config.block_size, source_config.n_positions
    if cfg.init_from == "resume":
        check_resume_settings(cfg, model_keys, last_dir)
    task = make_task(cfg, block_size, n_positions)

    if cfg.init_from == "resume":
        model = load_checkpoint(last_dir)
    else:
        model = build_model(cfg, model_keys, task.vocab_size)
    if model.config.vocab_size != task.vocab_size:
        raise ConfigError(f"the model's vocab_size {model.config.vocab_size} does not match the task's "
                          f"{task.vocab_size}")
    n_loops = model.config.n_loops
    if cfg.grad_loops is not None and cfg.grad_loops > n_loops and not cfg.loop_curriculum:
        raise ConfigError(f"grad_loops ({cfg.grad_loops}) exceeds n_loops ({n_loops})")
    if cfg.gate_only:
        if model.config.halt != "gate":
            raise ConfigError("gate_only=True needs halt='gate' in the model config")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("halt_gate."))
    model.to(device).set_backend(cfg.backend)

    optimizer = configure_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    iter_num, best_val_loss, elapsed_before, history = 0, math.inf, 0.0, []
    if state is not None:  # checked against the checkpoint before anything (the logs first) is changed
        check_train_state(state, checkpoint_dir(last_dir), model, optimizer)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss, elapsed_before = state["iter_num"], state["best_val_loss"], state["elapsed_s"]
        history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device_type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        batch_rng.set_state(state["batch_rng"])

    # The evaluations run the objective too (its second output is the last loop's loss, as the model
    # computes it at n_loops), and with compile=True the compiled one: eval mode compiles its own graph.
    evaluator = objective = LoopObjective(model, cfg)
    if ddp.enabled:
        unused = model.config.halt == "gate" and not objective.gate
        objective = DistributedDataParallel(objective, device_ids=[ddp.local_rank] if device_type == "cuda" else None,
                                            find_unused_parameters=unused)
    if cfg.compile:
        objective = torch.compile(objective)
        evaluator = objective if not ddp.enabled else torch.compile(evaluator)  # evaluation runs on one process
    if ddp.master and cfg.overwrite:  # the run starts: only now is the old one removed
        remove_run(out_dir)
    log = RunLog(out_dir, iter_num if state is not None else None) if ddp.master else None

    def progress_at(it: int, elapsed: float) -> float:
        p = it / (cfg.lr_decay_iters or cfg.max_iters)
        return max(p, elapsed / cfg.max_seconds) if cfg.max_seconds else p

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        eval_rng = torch.Generator().manual_seed(cfg.seed + 10_000)  # the same batches at every evaluation
        out = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = task.get_batch(split, cfg.batch_size, eval_rng, device)
                pos = task_positions(task, x, split, eval_rng)
                with autocast:
                    losses.append(evaluator(x, y, n_loops, pos=pos)[1].item())
            out[f"{split}_loss"] = sum(losses) / len(losses)
        model.train()
        return out

    def save(path: Path, with_state: bool) -> None:
        # Only tensors and plain values, so that resuming loads it with weights_only=True.
        train_state = dict(
            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
            best_val_loss=best_val_loss, elapsed_s=elapsed_before + time.perf_counter() - start,
            history=history, torch_rng=torch.get_rng_state(), batch_rng=batch_rng_state,
            cuda_rng=torch.cuda.get_rng_state_all() if device_type == "cuda" else None,
            train_config=asdict(cfg), looplm_config=model.config.to_dict()) if with_state else None
        save_checkpoint(model, path, metadata={"iter_num": iter_num, "task": task_metadata(cfg)},
                        train_state=train_state)

    model.train()
    start = time.perf_counter()
    # Tokens/s counts the tokens the model ran: addition batches are cut to their longest row.
    tokens_per_s, window_tokens, window_start, run_tokens = 0.0, 0, start, 0
    # A progress bar on a terminal; in a log file or CI, a plain line every log_interval iterations.
    show_bar = cfg.progress and ddp.master and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not show_bar, unit="it", dynamic_ncols=True)
    # The train state keeps the batch generator as it was before the batch in hand, so a resumed run
    # draws the very batch this run would have trained on next.
    batch_rng_state = batch_rng.get_state()
    x, y = task.get_batch("train", cfg.batch_size, batch_rng, device)
    pos = task_positions(task, x, "train", batch_rng)
    while True:
        elapsed = elapsed_before + time.perf_counter() - start
        progress = progress_at(iter_num, elapsed)
        out_of_time = cfg.max_seconds is not None and elapsed >= cfg.max_seconds
        if ddp.enabled and cfg.max_seconds is not None:  # every process stops at the same iteration
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        done = iter_num >= cfg.max_iters or out_of_time
        if ddp.master and (iter_num % cfg.eval_interval == 0 or done) and (iter_num > 0 or state is None):
            if not (state is not None and history and history[-1]["iter"] == iter_num):
                losses = evaluate()
                record = dict(kind="eval", iter=iter_num, n_loops=curriculum_loops(cfg, n_loops, progress),
                              lr=learning_rate(cfg, iter_num, progress), tokens_per_s=round(tokens_per_s, 1),
                              elapsed_s=round(elapsed, 2), **losses)
                history.append(record)
                log.write(record)
                bar.write(f"iter {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}")
                improved = losses["val_loss"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val_loss"])
                if iter_num > 0:
                    save(last_dir, with_state=True)
                    if improved or cfg.always_save_checkpoint:
                        save(best_dir, with_state=False)
        if done:
            break

        loops = curriculum_loops(cfg, n_loops, progress)
        if cfg.random_depth:
            loops = int(torch.randint(1, loops + 1, (1,), generator=batch_rng))
        grad_loops = min(cfg.grad_loops, loops) if cfg.grad_loops is not None else None
        lr = learning_rate(cfg, iter_num, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(cfg.gradient_accumulation_steps):
            last_micro = micro_step == cfg.gradient_accumulation_steps - 1
            sync = objective.no_sync() if ddp.enabled and not last_micro else contextlib.nullcontext()
            with sync, autocast:
                loss, lm_loss = objective(x, y, loops, grad_loops, pos)
                loss = loss / cfg.gradient_accumulation_steps
            window_tokens += x.numel() * ddp.world_size
            batch_rng_state = batch_rng.get_state()
            x, y = task.get_batch("train", cfg.batch_size, batch_rng, device)  # while the GPU works
            pos = task_positions(task, x, "train", batch_rng)
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update()
        if iter_num % cfg.log_interval == 0 and ddp.master:
            now = time.perf_counter()
            tokens_per_s, run_tokens = window_tokens / (now - window_start), run_tokens + window_tokens
            tokens, window_tokens, window_start = window_tokens, 0, now
            lm = lm_loss.item()
            if show_bar:
                bar.set_postfix(loss=f"{lm:.4f}", tok_s=f"{tokens_per_s:,.0f}", loops=loops)
            elif cfg.progress:
                print(f"iter {iter_num}: loss {lm:.4f}, {tokens_per_s:,.0f} tokens/s, {loops} loops, lr {lr:.2e}",
                      flush=True)
            log.write(dict(kind="train", iter=iter_num, loss=lm, objective=loss.item() * cfg.gradient_accumulation_steps,
                           n_loops=loops, lr=lr, tokens=tokens, tokens_per_s=round(tokens_per_s, 1),
                           elapsed_s=round(elapsed_before + now - start, 2)))
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - start
    if ddp.enabled:
        # The DDP wrapper goes first: a reducer freed after the process group would tear the group
        # down while holding the GIL that the group's worker thread waits for (a hang at exit).
        objective = sync = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    model.eval()
    run_tokens += window_tokens
    # The run's average, evaluations included (the log keeps each window's own rate).
    return TrainResult(model, task, history, out_dir, iter_num, best_val_loss, elapsed,
                       run_tokens / max(elapsed - elapsed_before, 1e-9), device)


def main(argv: Optional[list[str]] = None) -> TrainResult:
    """The command line; bad settings, files and checkpoints raise the errors run_cli reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    cfg, model_keys = parse_args(argv)
    result = train(cfg, model_keys)
    if cfg.report and int(os.environ.get("RANK", 0)) == 0:
        from looplm.report import training_report
        result.report = training_report(result, sample_tokens=cfg.sample_tokens, seed=cfg.seed)
        print(result.report)
        atomic_write_text(result.out_dir / REPORT_FILE, result.report + "\n")
    return result


if __name__ == "__main__":
    run_cli(main, prog="looplm.train")
