"""The end-of-run report: how the loss went, what each loop does, how early tokens halt, a sample.

Per loop (on a validation batch, all loops run): the mean entropy of the readout and the mean
relative change of the state. With halting (the config's criterion): the fraction of tokens still
running at each loop, the mean and largest loops per token, and the loss against running every loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from tabulate import tabulate

from looplm.halting import describe as describe_halting
from looplm.data.addition import AdditionTask

if TYPE_CHECKING:
    from looplm.train import TrainResult

MAX_CURVE_ROWS = 12
REPORT_BATCH = 32


def loss_curve_table(history: list[dict]) -> str:
    """The evaluations, thinned to at most MAX_CURVE_ROWS rows (the first and last always kept)."""
    if len(history) > MAX_CURVE_ROWS:
        stride = (len(history) - 1) / (MAX_CURVE_ROWS - 1)
        history = [history[round(i * stride)] for i in range(MAX_CURVE_ROWS)]
    rows = [[h["iter"], h["n_loops"], f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}", f"{h['lr']:.2e}"]
            for h in history]
    return tabulate(rows, headers=["iter", "loops", "train loss", "val loss", "lr"], tablefmt="github")


@torch.no_grad()
def loop_table(model, x: torch.Tensor, y: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[str, dict]:
    """Per-loop entropy and state change (every loop run), with the halting run beside them. Means
    are over the tokens that have a target (all of them in language modelling, the answer in addition)."""
    model.eval()
    counted = y != -1
    _, loss_all, trace = model(x, y, halting=False, return_trace=True, pos=pos)
    stats = dict(val_loss_all_loops=loss_all.item())
    rows = [[t + 1, f"{entropy[counted].mean().item():.3f}", f"{delta[counted].mean().item():.3f}", "-"]
            for t, (entropy, delta) in enumerate(zip(trace.entropy, trace.delta))]
    if model.config.halt != "none":
        _, loss_halt, halted = model(x, y, halting=True, return_trace=True, pos=pos)
        steps = halted.steps[counted].float()
        stats.update(val_loss_halting=loss_halt.item(), mean_steps=steps.mean().item(), max_steps=int(steps.max()),
                     loop_budget=model.config.max_loops)
        for t, active in enumerate(halted.active[:len(rows)]):
            rows[t][3] = f"{100 * active[counted].float().mean().item():.1f}"
    table = tabulate(rows, headers=["loop", "mean entropy (nats)", "mean state delta", "active with halting %"],
                     tablefmt="github")
    return table, stats


def training_report(result: "TrainResult", sample_tokens: int = 300, seed: int = 0) -> str:
    model, task = result.model.eval(), result.task
    cfg = model.config
    device = model.lm_head.weight.device
    lines = [f"== LoopGPT {cfg.n_layer} layer(s) x {cfg.n_loops} loops, {cfg.n_embd} wide, "
             f"{model.get_num_params() / 1e6:.2f}M parameters, on {result.device}",
             f"{result.iter_num} iterations in {result.elapsed_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s); "
             f"best val loss {result.best_val_loss:.4f}; checkpoints in {result.out_dir}", "",
             "== loss curve", loss_curve_table(result.history), ""]

    x, y = task.get_batch("val", REPORT_BATCH, torch.Generator().manual_seed(seed), device)
    pos = task.get_positions(x) if isinstance(task, AdditionTask) else None  # the ids the task gives, if any
    table, stats = loop_table(model, x, y, pos)
    lines += [f"== per loop, on {REPORT_BATCH} validation rows", table, ""]
    if cfg.halt != "none":
        lines.append(f"halting ({describe_halting(cfg)}): {stats['mean_steps']:.2f} loops per token on "
                     f"average (largest {stats['max_steps']}, budget {stats['loop_budget']}); val loss "
                     f"{stats['val_loss_halting']:.4f} with halting vs {stats['val_loss_all_loops']:.4f} running "
                     f"every loop")
    else:
        lines.append(f"no halting configured: every token runs {cfg.n_loops} loops")
    lines.append("")

    if isinstance(task, AdditionTask):
        from looplm.eval_addition import evaluate, format_table
        lines += ["== addition, exact match on the first 50 test problems per digit count",
                  format_table(evaluate(model, task, limit=50))]
    elif sample_tokens > 0:
        torch.manual_seed(seed)
        start = torch.tensor([task.tokenizer.encode("\n")], device=device)
        out = model.generate(start, sample_tokens, temperature=0.8, top_k=200)
        lines += [f"== sample ({sample_tokens} characters, temperature 0.8" +
                  (", with halting)" if cfg.halt != "none" else ")"), task.tokenizer.decode(out[0].tolist())]
    return "\n".join(lines)
