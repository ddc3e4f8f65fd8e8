"""Named experiments: `python -m looplm.experiments NAME... [--max-iters N]`.

    space_time   GPT-1L, LoopLM 1L x 4 and GPT-4L at nanoGPT's CPU size: the loop buys the depth
                 (and FLOPs) of GPT-4L with the parameters of GPT-1L
    injection    LoopLM 1L x 4 with the input added at every loop, or only as the initial state
    halting      one LoopLM 1L x 4, every loop supervised; halting criteria and thresholds against
                 val loss and loops per token
    curriculum   LoopLM 1L x 8, with the loop count growing 2 -> 8 over training or fixed at 8
    adaptive     LoopLM 1L x 8 with ramp supervision, then a halting gate trained alone on its weights:
                 against fixed depth, each criterion's val loss, loops per token and forward time
                 (compacted loop), whether it reaches the goal of 2x fewer loops per token at <= 1%
                 higher val loss, and cached generation tokens/s at batch 1 and 16
    space_time_study
                 which recipe makes LoopLM 1Lx4 pay for its loops: a screen of learning rates and
                 loop changes against GPT-1L and GPT-4L, three seeds for the finalists, the goal per
                 arm; writes experiments/space_time_study/results.{md,json} and runs/ (one file per
                 run, kept: a finished run is not trained again). `all` leaves it out.

Each experiment writes experiments/<name>/metrics.csv (one row per run) and trace.json (per run: the
evaluations and, per loop, mean entropy and state delta on validation batches), and updates
experiments/summary.json and the tables in experiments/summary.md. Checkpoints go under
out/experiments. Wall times are those of this machine at the time; other work on it skews them.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tabulate import tabulate

from looplm.config import LoopConfig
from looplm.model import LoopGPT
from looplm.fileio import atomic_write_text
from looplm.generation import generate_cached
from looplm.train import read_config_file, split_config, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EVAL_BATCHES = 20


@dataclass
class Run:
    name: str
    config: str  # a file in configs/
    overrides: dict[str, Any] = field(default_factory=dict)


def run_dir(experiment: str, run_name: str) -> str:
    """Where a run of an experiment keeps its checkpoints and logs."""
    slug = "".join(c if c.isalnum() else "_" for c in run_name.lower()).strip("_")
    return f"out/experiments/{experiment}/{slug}"


# The loop recipe these experiments were run with; the shipped loop config now trains at the rate
# the space-time study found (see space_time_study below).
COMMITTED_LOOP = dict(learning_rate=1e-3)
EXPERIMENTS: dict[str, list[Run]] = {
    "space_time": [Run("GPT-1L", "shakespeare_cpu_gpt1l.py"),
                   Run("LoopLM 1Lx4", "shakespeare_cpu_loop1x4.py", dict(COMMITTED_LOOP)),
                   Run("GPT-4L", "shakespeare_cpu_gpt4l.py")],
    "injection": [Run("inject add", "shakespeare_cpu_loop1x4.py", dict(COMMITTED_LOOP, inject="add")),
                  Run("inject none (state starts at the embedding)", "shakespeare_cpu_loop1x4.py",
                      dict(COMMITTED_LOOP, inject="none", state_init="embed"))],
    "halting": [Run("LoopLM 1Lx4, ramp supervision", "shakespeare_cpu_loop1x4.py",
                    dict(COMMITTED_LOOP, loss_weights="ramp"))],
    "curriculum": [Run("fixed 8 loops", "shakespeare_cpu_loop1x4.py", dict(COMMITTED_LOOP, n_loops=8)),
                   Run("curriculum 2,4,6,8", "shakespeare_cpu_loop1x4.py",
                       dict(COMMITTED_LOOP, n_loops=8, loop_curriculum=(2, 4, 6, 8)))],
    # Every loop supervised (ramp) so that early loops can read out; one thread, as the timings are per core.
    # The second run trains only a halting gate on the first run's final weights: the core stays the same.
    "adaptive": [Run("LoopLM 1Lx8, ramp supervision", "shakespeare_cpu_loop1x4.py",
                     dict(COMMITTED_LOOP, n_loops=8, loss_weights="ramp", threads=1)),
                 Run("+ halting gate trained alone", "shakespeare_cpu_loop1x4.py",
                     dict(COMMITTED_LOOP, n_loops=8, threads=1, halt="gate", halt_threshold=0.5, gate_only=True,
                          init_from=run_dir("adaptive", "LoopLM 1Lx8, ramp supervision") + "/last",
                          max_iters=400, lr_decay_iters=400, warmup_iters=20, eval_interval=200))],
}
# criterion -> thresholds swept by the halting experiment, from eager to patient
HALTING_SWEEP = {"entropy": (2.0, 1.5, 1.0, 0.5), "confidence": (0.5, 0.7, 0.9), "delta": (0.3, 0.2, 0.1),
                 "kl": (0.1, 0.03, 0.01)}
# The adaptive experiment's sweep, wider than the halting one's: 8 loops leave more room to stop early.
ADAPTIVE_SWEEP = {"entropy": (2.5, 2.0, 1.5, 1.0, 0.5), "confidence": (0.3, 0.4, 0.5, 0.7, 0.9),
                  "delta": (0.5, 0.3, 0.2, 0.1, 0.05), "kl": (0.3, 0.1, 0.03, 0.01, 0.003),
                  "gate": (0.3, 0.5, 0.7, 0.9)}
FIXED = "fixed depth"  # the sweep's rows without halting, the loop count cut uniformly
MAX_LOSS_INCREASE = 0.01  # the adaptive-inference goal: val loss at most 1% above fixed depth ...
TARGET_REDUCTION = 2.0  # ... with at least 2x fewer loops per token
GENERATION_BATCHES = (1, 16)
PROMPT_TOKENS, NEW_TOKENS = 16, 48  # prompt + new - 1 fits the CPU configs' context of 64
TIMING_REPEATS = 3


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


def with_halting(model: LoopGPT, criterion: str, threshold: float) -> LoopGPT:
    """A copy of `model` that halts by `criterion` at `threshold` (a gate only if criterion is gate)."""
    config = LoopConfig.from_dict({**model.config.to_dict(), "halt": criterion, "halt_threshold": threshold})
    halting = LoopGPT(config).to(model.lm_head.weight.device)
    halting.load_state_dict({k: v for k, v in model.state_dict().items()
                             if criterion == "gate" or not k.startswith("halt_gate.")})
    return halting.eval()


@torch.no_grad()
def halting_sweep(model: LoopGPT, task, seed: int = 0) -> list[dict[str, Any]]:
    """The same weights under each halting criterion and threshold: val loss and loops per token."""
    rows = []
    for criterion, thresholds in HALTING_SWEEP.items():
        for threshold in thresholds:
            halting = with_halting(model, criterion, threshold)
            generator = torch.Generator().manual_seed(seed)
            losses, steps = [], []
            for _ in range(EVAL_BATCHES):
                x, y = task.get_batch("val", 12, generator, model.lm_head.weight.device)
                _, loss, trace = halting(x, y, return_trace=True)
                losses.append(loss.item())
                steps.append(trace.steps.float().mean().item())
            rows.append(dict(criterion=criterion, threshold=threshold, val_loss=_mean(losses), mean_steps=_mean(steps)))
    return rows


def _median_seconds(fn: Callable[[], Any], seed: int) -> float:
    """Median wall time of TIMING_REPEATS calls of fn, each from the same random state."""
    times = []
    for _ in range(TIMING_REPEATS):
        torch.manual_seed(seed)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _measure(model: LoopGPT, task, seed: int, **forward) -> dict[str, float]:
    """Val loss, loops per token and median forward wall time (ms) per batch over EVAL_BATCHES batches.
    The timed forward asks for no trace, whose extra readouts would cost time the model does not need."""
    generator = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    losses, steps, seconds = [], [], []
    for _ in range(EVAL_BATCHES):
        x, y = task.get_batch("val", 12, generator, device)
        seconds.append(_median_seconds(functools.partial(model, x, y, **forward), seed))
        _, loss, trace = model(x, y, return_trace=True, **forward)
        losses.append(loss.item())
        steps.append(trace.steps.float().mean().item())
    return dict(val_loss=_mean(losses), loops_per_token=_mean(steps), forward_ms=1e3 * statistics.median(seconds))


def adaptive_sweep(model: LoopGPT, task, seed: int = 0) -> list[dict[str, Any]]:
    """The same weights at every fixed depth 1..n_loops and under each criterion and threshold of
    ADAPTIVE_SWEEP (compacted loop, budget n_loops), against the full fixed depth."""
    model.eval()
    n_loops = model.config.n_loops
    rows = [dict(criterion=FIXED, threshold=None, **_measure(model, task, seed, halt=False, n_loops=loops))
            for loops in range(n_loops, 0, -1)]
    for criterion, thresholds in ADAPTIVE_SWEEP.items():
        if criterion == "gate" and model.config.halt != "gate":
            continue
        for threshold in thresholds:
            halting = with_halting(model, criterion, threshold)
            rows.append(dict(criterion=criterion, threshold=threshold, **_measure(halting, task, seed)))
    full = rows[0]
    return [dict(criterion=r["criterion"], threshold=r["threshold"], val_loss=round(r["val_loss"], 4),
                 loss_vs_fixed_pct=round(100 * (r["val_loss"] / full["val_loss"] - 1), 2),
                 loops_per_token=round(r["loops_per_token"], 3),
                 loop_reduction=round(full["loops_per_token"] / r["loops_per_token"], 2),
                 forward_ms=round(r["forward_ms"], 2), speedup=round(full["forward_ms"] / r["forward_ms"], 2))
            for r in rows]


def goal_table(sweep: Sequence[dict[str, Any]], max_loss_increase: float = MAX_LOSS_INCREASE,
               target_reduction: float = TARGET_REDUCTION) -> list[dict[str, Any]]:
    """Per criterion of an adaptive sweep (in order of appearance): its setting with the largest loop
    reduction whose val loss is within max_loss_increase of full fixed depth (the sweep's first row),
    and whether that reduction reaches target_reduction. A criterion with no such setting gets a
    row without one, and misses the goal."""
    if not sweep or sweep[0]["criterion"] != FIXED or sweep[0]["loop_reduction"] != 1:
        raise ValueError("an adaptive sweep starts with its full fixed-depth row (criterion "
                         f"{FIXED!r}, loop_reduction 1); got {sweep[0] if sweep else 'no rows'}")
    full = sweep[0]
    rows = []
    for criterion in dict.fromkeys(r["criterion"] for r in sweep):
        within = [r for r in sweep
                  if r["criterion"] == criterion and r["val_loss"] <= full["val_loss"] * (1 + max_loss_increase)]
        best = min(within, key=lambda r: r["loops_per_token"], default=None)
        keys = ("threshold", "loops_per_token", "loop_reduction", "loss_vs_fixed_pct", "speedup")
        rows.append(dict(criterion=criterion, **{k: best[k] if best else None for k in keys},
                         goal_met=best is not None
                         and full["loops_per_token"] >= target_reduction * best["loops_per_token"]))
    return rows


@torch.no_grad()
def generation_speed(model: LoopGPT, task, settings: Sequence[tuple[str, float]], seed: int = 0
                     ) -> list[dict[str, Any]]:
    """Cached generation (`generate_cached`) of NEW_TOKENS tokens after a PROMPT_TOKENS-token val prompt,
    at each batch of GENERATION_BATCHES: fixed depth, then each (criterion, threshold) of settings.
    tokens_per_s counts generated tokens over the median wall time of TIMING_REPEATS runs."""
    model.eval()
    device = model.lm_head.weight.device
    models = [(FIXED, None, model)] + [(c, t, with_halting(model, c, t)) for c, t in settings]
    rows = []
    for batch in GENERATION_BATCHES:
        generator = torch.Generator().manual_seed(seed)
        prompt = task.get_batch("val", batch, generator, device)[0][:, :PROMPT_TOKENS]
        for criterion, threshold, m in models:
            generate = functools.partial(generate_cached, m, prompt, NEW_TOKENS, temperature=0.8,
                                         halt=criterion != FIXED)
            seconds = _median_seconds(generate, seed)
            torch.manual_seed(seed)
            _, stats = generate()
            rows.append(dict(batch=batch, criterion=criterion, threshold=threshold,
                             loops_per_token=round(stats.loops_per_token, 3),
                             tokens_per_s=round(batch * NEW_TOKENS / seconds, 1)))
        fixed = rows[-len(models)]
        for row in rows[-len(models):]:
            row["speedup"] = round(row["tokens_per_s"] / fixed["tokens_per_s"], 2)
    return rows


def adaptive_inference(model: LoopGPT, task, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The adaptive experiment's measurements: the sweep, the goal per criterion, and generation speed
    under each criterion's setting that the goal table picked."""
    sweep = adaptive_sweep(model, task, seed)
    goal = goal_table(sweep)
    settings = [(r["criterion"], r["threshold"]) for r in goal
                if r["criterion"] != FIXED and r["threshold"] is not None]
    return dict(adaptive_sweep=sweep, adaptive_goal=goal, generation=generation_speed(model, task, settings, seed))


def run_experiment(name: str, out: Path, max_iters: Optional[int] = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every run of experiment `name`; write its files under out/<name>; return its summary."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    results, traces = [], {}
    for run in EXPERIMENTS[name]:
        values = {**read_config_file(CONFIGS / run.config), **run.overrides,
                  "out_dir": run_dir(name, run.name), "progress": False, "report": False}
        if max_iters is not None:
            values.update(max_iters=max_iters, lr_decay_iters=max_iters,
                          eval_interval=min(values.get("eval_interval", 250), max_iters))
        cfg, model_keys = split_config({**values, "overwrite": True})  # running an experiment again replaces its runs
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
        if name == "adaptive" and run is EXPERIMENTS[name][-1]:  # the last run's weights hold every criterion
            log(f"[{name}] {run.name}: halting sweep and generation speed")
            trace.update(adaptive_inference(result.model, result.task, cfg.seed))
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
    if name == "adaptive":
        summary.update({key: traces[EXPERIMENTS[name][-1].name][key] for key in ADAPTIVE_TABLES})
    return summary


# ---- space_time_study: which recipe makes LoopLM 1Lx4 pay for its loops

STUDY = "space_time_study"
STUDY_SEEDS = (1337, 1338, 1339)  # a seed fixes both the initial weights and the order of the batches
LOOP_1X4 = "shakespeare_cpu_loop1x4.py"
# The recipe the study starts from, spelled out so that changing the shipped loop config's defaults
# does not change the study: nanoGPT's CPU schedule and the plain loop (input added each loop).
STUDY_BASE = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, inject="add", step_encoding="none",
                  state_init="zeros", update="replace", loss_weights="last", random_depth=False, grad_loops=None,
                  n_prelude=0, n_coda=0, threads=1)


@dataclass
class Arm:
    name: str
    config: str  # a file in configs/
    change: str  # what differs from its baseline, in words
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = STUDY_SEEDS[:1]


# Stage 1, the screen: one change each against the shipped loop recipe, one seed.
STUDY_SCREEN = [
    Arm("GPT-1L", "shakespeare_cpu_gpt1l.py", "nanoGPT's CPU recipe", seeds=STUDY_SEEDS),
    Arm("GPT-4L", "shakespeare_cpu_gpt4l.py", "nanoGPT's CPU recipe", seeds=STUDY_SEEDS),
    Arm("loop", LOOP_1X4, "the loop recipe shipped before this study"),
    Arm("loop lr 2e-3", LOOP_1X4, "learning_rate=2e-3", dict(learning_rate=2e-3)),
    Arm("loop lr 4e-3", LOOP_1X4, "learning_rate=4e-3", dict(learning_rate=4e-3), seeds=STUDY_SEEDS),
    # The changes to the loop, each on top of the best learning rate of the three above.
    Arm("loop lr 4e-3 + step learned", LOOP_1X4, "learning_rate=4e-3, step_encoding='learned'",
        dict(learning_rate=4e-3, step_encoding="learned")),
    Arm("loop lr 4e-3 + euler", LOOP_1X4, "learning_rate=4e-3, update='euler' (h + alpha (core - h), alpha "
        "learned per channel)", dict(learning_rate=4e-3, update="euler")),
    # A control: GPT-1L at the loop's learning rate, so that the loop's gain is not only a learning
    # rate that a plain GPT would take as well.
    Arm("GPT-1L lr 4e-3", "shakespeare_cpu_gpt1l.py", "learning_rate=4e-3", dict(learning_rate=4e-3),
        seeds=STUDY_SEEDS),
]
STUDY_ARMS = STUDY_SCREEN
STUDY_NOTES = (
    "`python -m looplm.experiments space_time_study` (finished runs are kept in "
    "experiments/space_time_study/runs/ and not trained again). nanoGPT's CPU size: 128 wide, 4 heads, "
    "context 64, batch 12, 2000 iterations, one thread; a seed fixes the initial weights and the order "
    "of the batches, the same for every arm. The looped arms start from the recipe shipped before the "
    "study (learning_rate 1e-3, warm-up 100, inject add, no step encoding, zero initial state, replace "
    "update, loss on the last loop) and change what `change` says. best_val_loss: mean over the arm's "
    "seeds of the best of the trainer's evaluations (every 250 iterations, 20 batches); spread: max - min "
    "over the seeds; vs_gpt1l: the mean difference to GPT-1L (nanoGPT's recipe) at the same seeds.")
REFERENCE, TARGET = "GPT-1L", "GPT-4L"  # the goal: below the first by more than the seed spread, at or
MAX_PARAMS_FRACTION = 0.5  # below the second with at most this fraction of its parameters


def study_values(arm: Arm, seed: int, max_iters: Optional[int] = None) -> dict[str, Any]:
    """The training settings of one run of an arm: its config file, the study's base recipe for a
    looped arm, the arm's change, the seed and where its checkpoints go."""
    values = read_config_file(CONFIGS / arm.config)
    if values.get("n_loops", 1) > 1:
        values.update(STUDY_BASE)
    values.update(arm.overrides, seed=seed, threads=1, out_dir=run_dir(STUDY, f"{arm.name} seed {seed}"),
                  progress=False, report=False)
    if max_iters is not None:
        values.update(max_iters=max_iters, lr_decay_iters=max_iters,
                      warmup_iters=min(values.get("warmup_iters", 100), max_iters),
                      eval_interval=min(values.get("eval_interval", 250), max_iters))
    return values


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values))


def study_run(arm: Arm, seed: int, runs: Path, max_iters: Optional[int] = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one arm at one seed, or read its result from runs/ when a run with the same settings is
    there (so an interrupted or extended study trains only what it lacks)."""
    values = study_values(arm, seed, max_iters)
    path = runs / (run_dir(STUDY, f"{arm.name} seed {seed}").rsplit("/", 1)[1] + ".json")
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["settings"] == _jsonable(values):
            return cached
    cfg, model_keys = split_config({**values, "overwrite": True})  # a run whose record is stale is trained again
    log(f"[{STUDY}] {arm.name}, seed {seed}: {cfg.max_iters} iterations")
    start = time.perf_counter()
    result = train(cfg, model_keys)
    wall_s = time.perf_counter() - start
    stats = loop_statistics(result.model, result.task, seed)
    c = result.model.config
    record = dict(arm=arm.name, seed=seed, settings=_jsonable(values),
                  row=dict(arm=arm.name, seed=seed, params=result.model.get_num_params(), depth=c.effective_depth,
                           iters=result.iter_num, val_loss=round(stats["val_loss"], 4),
                           best_val_loss=round(result.best_val_loss, 4), wall_s=round(wall_s, 1),
                           tokens_per_s=round(result.tokens_per_s)),
                  history=result.history, per_loop=stats["per_loop"])
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def study_tables(arms: Sequence[Arm], rows: dict[tuple[str, int], dict[str, Any]]) -> dict[str, list[dict]]:
    """Per arm over its seeds: best val loss mean, spread (max - min) and standard deviation, and its
    difference to GPT-1L at the same seeds; then the goal, for the looped arms run at two seeds or more."""
    reference = {seed: rows[REFERENCE, seed]["best_val_loss"] for _, seed in rows if (REFERENCE, seed) in rows}
    table = []
    for arm in arms:
        runs = [rows[arm.name, seed] for seed in arm.seeds]
        best = [r["best_val_loss"] for r in runs]
        paired = [r["best_val_loss"] - reference[r["seed"]] for r in runs if r["seed"] in reference]
        table.append(dict(arm=arm.name, change=arm.change, params=runs[0]["params"], depth=runs[0]["depth"],
                          seeds=len(runs), best_val_loss=round(_mean(best), 4), spread=round(_spread(best), 4) if len(best) > 1 else None,
                          std=round(statistics.stdev(best), 4) if len(best) > 1 else None,
                          vs_gpt1l=round(_mean(paired), 4) if paired else None,
                          val_loss=round(_mean(r["val_loss"] for r in runs), 4),
                          wall_s=round(_mean(r["wall_s"] for r in runs), 1)))
    by_name = {r["arm"]: r for r in table}
    ref, target = by_name[REFERENCE], by_name[TARGET]
    reference_config, target_config = (next(arm.config for arm in arms if arm.name == name)
                                       for name in (REFERENCE, TARGET))
    # GPT-1L retrained at another learning rate, by rate: a looped arm is also held against it
    same_rate = {arm.overrides.get("learning_rate"): by_name[arm.name] for arm in arms
                 if arm.config == reference_config and arm.name != REFERENCE and len(arm.seeds) > 1}
    goal = []
    for arm, row in zip(arms, table):
        if arm.config in (reference_config, target_config) or row["seeds"] < 2:  # no spread from one seed
            continue
        margin = ref["best_val_loss"] - row["best_val_loss"]
        spread = max(row["spread"], ref["spread"])
        params_fraction = row["params"] / target["params"]
        control = same_rate.get(arm.overrides.get("learning_rate"))
        control_margin = control["best_val_loss"] - row["best_val_loss"] if control else None
        goal.append(dict(arm=row["arm"], best_val_loss=row["best_val_loss"], below_gpt1l=round(margin, 4),
                         seed_spread=round(spread, 4), beats_gpt1l=margin > spread,
                         vs_gpt4l=round(row["best_val_loss"] - target["best_val_loss"], 4),
                         params_vs_gpt4l=round(params_fraction, 3),
                         goal_met=margin > spread and row["best_val_loss"] <= target["best_val_loss"]
                         and params_fraction <= MAX_PARAMS_FRACTION,
                         below_gpt1l_same_lr=round(control_margin, 4) if control else None,
                         beats_gpt1l_same_lr=control_margin > max(row["spread"], control["spread"])
                         if control else None))
    return dict(runs=table, study_goal=goal)


def space_time_study(out: Path, max_iters: Optional[int] = None, log: Callable[[str], None] = print
                     ) -> dict[str, Any]:
    """Every arm of STUDY_ARMS at each of its seeds (cached under out/space_time_study/runs); writes
    results.md and results.json there and returns the summary."""
    directory = out / STUDY
    runs = directory / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = {}
    for seed in STUDY_SEEDS:  # every arm's first seed before any second one: a screen first
        for arm in STUDY_ARMS:
            if seed in arm.seeds:
                rows[arm.name, seed] = study_run(arm, seed, runs, max_iters, log)["row"]
    rows = {(arm.name, seed): rows[arm.name, seed] for arm in STUDY_ARMS for seed in arm.seeds}
    summary = dict(notes=STUDY_NOTES, **study_tables(STUDY_ARMS, rows), study_runs=list(rows.values()),
                   machine=dict(platform=platform.platform(), processor=platform.processor(), threads=1,
                                device="cpu"))
    atomic_write_text(directory / "results.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(directory / "results.md", markdown({STUDY: summary}))
    return summary


STUDIES = {STUDY: space_time_study}


# summary key -> caption of its table, for the experiments that measure more than their runs
ADAPTIVE_TABLES = {
    "adaptive_sweep": f"Fixed depth and halting on the same weights (compacted loop, {EVAL_BATCHES} val batches "
                      "of 12 sequences): loss_vs_fixed_pct and loop_reduction against the full fixed depth; "
                      "forward_ms the median forward wall time per batch, one thread; speedup: full fixed "
                      "depth's forward_ms over it.",
    "adaptive_goal": f"The goal, per criterion: the largest loop_reduction with val loss within "
                     f"{100 * MAX_LOSS_INCREASE:g}% of the full fixed depth; goal_met when it is "
                     f">= {TARGET_REDUCTION:g}x.",
    "generation": f"Cached generation (generate_cached, fill latest, temperature 0.8) of {NEW_TOKENS} tokens after a "
                  f"{PROMPT_TOKENS}-token prompt, each criterion at its goal-table threshold: generated tokens per "
                  "second (median of 3, one thread) and loops per generated token.",
}
TABLES = {"halting": ("Halting on the same weights (val loss, mean loops per token):", ".4f"),
          **{key: (caption, "g") for key, caption in ADAPTIVE_TABLES.items()},
          "study_goal": ("The goal, per looped arm run at two seeds or more: best val loss below GPT-1L's by more than "
                         "the seed spread (the larger max - min of the two), at or below GPT-4L's, with at most "
                         f"{MAX_PARAMS_FRACTION:g} of GPT-4L's parameters. The last two columns hold the arm against "
                         "GPT-1L trained at the arm's learning rate, where the study has that control at two seeds "
                         "or more.", "g"),
          "study_runs": ("Every run:", "g")}


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    parts = ["# Experiments", "", "`python -m looplm.experiments NAME`. depth: layers a token passes through "
             "(equal depth, equal FLOPs per token). val_loss: the final model on 20 fixed validation batches; "
             "best_val_loss: the best of the trainer's evaluations. Wall times come from a CPU machine shared "
             "with other work, so they are noisy; compare them within one table only.", ""]
    for name, result in summary.items():
        parts += [f"## {name}", ""] + ([result["notes"], ""] if "notes" in result else [])
        parts += [tabulate(result["runs"], headers="keys", tablefmt="github"), ""]
        for key, (caption, floatfmt) in TABLES.items():
            if key in result:
                table = tabulate(result[key], headers="keys", tablefmt="github", floatfmt=floatfmt)
                parts += [caption, "", table, ""]
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m looplm.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=[*EXPERIMENTS, *STUDIES, "all"], metavar="NAME",
                        help=f"one or more of {', '.join([*EXPERIMENTS, *STUDIES])}, or all")
    parser.add_argument("--max-iters", type=int, default=None, help="shorten every run (default: its config's)")
    parser.add_argument("--out", type=Path, default=Path("experiments"), help="where results are written")
    args = parser.parse_args(argv)
    if args.max_iters is not None and args.max_iters < 1:
        parser.error(f"--max-iters must be >= 1, got {args.max_iters}")
    names = list(EXPERIMENTS) if "all" in args.names else list(dict.fromkeys(args.names))
    summary_file = args.out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    for name in names:
        if name in STUDIES:
            summary[name] = STUDIES[name](args.out, args.max_iters)
        else:
            summary[name] = run_experiment(name, args.out, args.max_iters)
        atomic_write_text(summary_file, json.dumps(summary, indent=1) + "\n")
        atomic_write_text(args.out / "summary.md", markdown(summary))
        print(tabulate(summary[name]["runs"], headers="keys", tablefmt="github"))
    return summary


if __name__ == "__main__":
    main()
