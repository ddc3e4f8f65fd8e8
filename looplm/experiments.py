"""Named experiments: `python -m looplm.experiments NAME... [--max-iters N]`.

    space_time   GPT-1L, LoopLM 1L x 4 and GPT-4L at nanoGPT's CPU size: the loop buys the depth
                 (and FLOPs) of GPT-4L with the parameters of GPT-1L
    injection    LoopLM 1L x 4 with the input added at every loop, or only as the initial state
    halting      one LoopLM 1L x 4, every loop supervised; halting criteria and thresholds against
                 val loss and loops per token
    curriculum   LoopLM 1L x 8, with the loop count growing 2 -> 8 over training or fixed at 8

Each writes experiments/<name>/metrics.csv (one row per run) and trace.json (per run: the
evaluations and, per loop, mean entropy and state delta on validation batches), and updates
experiments/summary.json and the tables in experiments/summary.md. Checkpoints go under
out/experiments. Wall times are those of this machine at the time; other work on it skews them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tabulate import tabulate

from looplm.config import LoopConfig
from looplm.model import LoopGPT
from looplm.fileio import atomic_write_text
from looplm.train import read_config_file, split_config, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EVAL_BATCHES = 20


@dataclass
class Run:
    name: str
    config: str  # a file in configs/
    overrides: dict[str, Any] = field(default_factory=dict)


EXPERIMENTS: dict[str, list[Run]] = {
    "space_time": [Run("GPT-1L", "shakespeare_cpu_gpt1l.py"), Run("LoopLM 1Lx4", "shakespeare_cpu_loop1x4.py"),
                   Run("GPT-4L", "shakespeare_cpu_gpt4l.py")],
    "injection": [Run("inject add", "shakespeare_cpu_loop1x4.py", dict(inject="add")),
                  Run("inject none (state starts at the embedding)", "shakespeare_cpu_loop1x4.py",
                      dict(inject="none", state_init="embed"))],
    "halting": [Run("LoopLM 1Lx4, ramp supervision", "shakespeare_cpu_loop1x4.py", dict(loss_weights="ramp"))],
    "curriculum": [Run("fixed 8 loops", "shakespeare_cpu_loop1x4.py", dict(n_loops=8)),
                   Run("curriculum 2,4,6,8", "shakespeare_cpu_loop1x4.py", dict(n_loops=8, loop_curriculum=(2, 4, 6, 8)))],
}
# criterion -> thresholds swept by the halting experiment, from eager to patient
HALTING_SWEEP = {"entropy": (2.0, 1.5, 1.0, 0.5), "confidence": (0.5, 0.7, 0.9), "delta": (0.3, 0.2, 0.1),
                 "kl": (0.1, 0.03, 0.01)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@torch.no_grad()
def loop_statistics(model: LoopGPT, task, seed: int = 0) -> dict[str, Any]:
    """Val loss and, per loop, mean entropy and state delta, over EVAL_BATCHES fixed batches, every loop run."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    losses, per_loop = [], []
    for _ in range(EVAL_BATCHES):
        x, y = task.get_batch("val", 12, generator, device)
        _, loss, trace = model(x, y, halt=False, return_trace=True)
        losses.append(loss.item())
        per_loop.append(trace.per_loop())
    return dict(val_loss=sum(losses) / len(losses),
                per_loop=[dict(loop=rows[0]["loop"], entropy=_mean(r["entropy"] for r in rows),
                               delta=_mean(r["delta"] for r in rows)) for rows in zip(*per_loop)])


@torch.no_grad()
def halting_sweep(model: LoopGPT, task, seed: int = 0) -> list[dict[str, Any]]:
    """The same weights under each halting criterion and threshold: val loss and loops per token."""
    rows = []
    for criterion, thresholds in HALTING_SWEEP.items():
        for threshold in thresholds:
            config = LoopConfig.from_dict({**model.config.to_dict(), "halt": criterion, "halt_threshold": threshold})
            halting = LoopGPT(config).to(model.lm_head.weight.device)
            halting.load_state_dict(model.state_dict())
            halting.eval()
            generator = torch.Generator().manual_seed(seed)
            losses, steps = [], []
            for _ in range(EVAL_BATCHES):
                x, y = task.get_batch("val", 12, generator, model.lm_head.weight.device)
                _, loss, trace = halting(x, y, return_trace=True)
                losses.append(loss.item())
                steps.append(trace.steps.float().mean().item())
            rows.append(dict(criterion=criterion, threshold=threshold, val_loss=_mean(losses), mean_steps=_mean(steps)))
    return rows


def run_experiment(name: str, out: Path, max_iters: Optional[int] = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every run of experiment `name`; write its files under out/<name>; return its summary."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    results, traces = [], {}
    for run in EXPERIMENTS[name]:
        slug = "".join(c if c.isalnum() else "_" for c in run.name.lower()).strip("_")
        values = {**read_config_file(CONFIGS / run.config), **run.overrides,
                  "out_dir": f"out/experiments/{name}/{slug}", "progress": False, "report": False}
        if max_iters is not None:
            values.update(max_iters=max_iters, lr_decay_iters=max_iters,
                          eval_interval=min(values.get("eval_interval", 250), max_iters))
        cfg, model_keys = split_config(values)
        log(f"[{name}] {run.name}: {cfg.max_iters} iterations")
        start = time.perf_counter()
        result = train(cfg, model_keys)
        wall_s = time.perf_counter() - start
        stats = loop_statistics(result.model, result.task, cfg.seed)
        c = result.model.config
        row = dict(run=run.name, layers=c.n_layer, loops=c.n_loops, depth=c.effective_depth,
                   params=result.model.get_num_params(), iters=result.iter_num, val_loss=round(stats["val_loss"], 4),
                   best_val_loss=round(result.best_val_loss, 4), wall_s=round(wall_s, 1),
                   tokens_per_s=round(result.tokens_per_s))
        trace = dict(history=result.history, per_loop=stats["per_loop"])
        if name == "halting":
            trace["halting"] = halting_sweep(result.model, result.task, cfg.seed)
        results.append(row)
        traces[run.name] = trace
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(results[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(directory / "metrics.csv", buffer.getvalue())
    atomic_write_text(directory / "trace.json", json.dumps(traces, indent=1) + "\n")
    summary = dict(runs=results, machine=dict(platform=platform.platform(), processor=platform.processor(),
                                               threads=torch.get_num_threads(),
                                               device="cuda" if torch.cuda.is_available() else "cpu"))
    if name == "halting":
        summary["halting"] = traces[EXPERIMENTS[name][0].name]["halting"]
    return summary


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    parts = ["# Experiments", "", "`python -m looplm.experiments NAME`. depth: layers a token passes through "
             "(equal depth, equal FLOPs per token). val_loss: the final model on 20 fixed validation batches; "
             "best_val_loss: the best of the trainer's evaluations. Wall times come from a CPU machine shared "
             "with other work, so they are noisy; compare them within one table only.", ""]
    for name, result in summary.items():
        parts += [f"## {name}", "", tabulate(result["runs"], headers="keys", tablefmt="github"), ""]
        if "halting" in result:
            parts += ["Halting on the same weights (val loss, mean loops per token):", "",
                      tabulate(result["halting"], headers="keys", tablefmt="github", floatfmt=".4f"), ""]
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m looplm.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=[*EXPERIMENTS, "all"], metavar="NAME",
                        help=f"one or more of {', '.join(EXPERIMENTS)}, or all")
    parser.add_argument("--max-iters", type=int, default=None, help="shorten every run (default: its config's)")
    parser.add_argument("--out", type=Path, default=Path("experiments"), help="where results are written")
    args = parser.parse_args(argv)
    if args.max_iters is not None and args.max_iters < 1:
        parser.error(f"--max-iters must be >= 1, got {args.max_iters}")
    names = list(EXPERIMENTS) if "all" in args.names else list(dict.fromkeys(args.names))
    summary_file = args.out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    for name in names:
        summary[name] = run_experiment(name, args.out, args.max_iters)
        atomic_write_text(summary_file, json.dumps(summary, indent=1) + "\n")
        atomic_write_text(args.out / "summary.md", markdown(summary))
        print(tabulate(summary[name]["runs"], headers="keys", tablefmt="github"))
    return summary


if __name__ == "__main__":
    main()
