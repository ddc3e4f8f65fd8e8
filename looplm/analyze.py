"""See the model think: `python -m looplm.analyze CKPT --text "..." [--out DIR]`.

Two runs of the text. The adaptive run, halting as the checkpoint's config says, gives each
character's steps. The dynamics run loops every character for the whole budget without halting,
so that every loop's state exists: per loop the mean entropy of the readout, the mean relative
state change, the accuracy of the model's own readout and of a linear probe fit on that loop's
states, and per character the loop where its state stops moving (a fixed point).

Printed: a per-character table and a per-loop table. Written to --out: entropy_vs_loop.png,
state_change_vs_loop.png, steps_heatmap.png, steps_histogram.png, probe_accuracy.png and
analysis.json (every number shown).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

from looplm.checkpoint import load_checkpoint  # noqa: E402
from looplm.cli import ArgumentParser, CLIError, run_cli  # noqa: E402
from looplm.data.shakespeare import CharTokenizer, corpus_text  # noqa: E402
from looplm.fileio import atomic_write_bytes  # noqa: E402
from looplm.model import LoopGPT, LoopTrace  # noqa: E402
from looplm.probes import fixed_points, loop_states, probe_accuracy, readout_accuracy  # noqa: E402

PLOTS = ("entropy_vs_loop.png", "state_change_vs_loop.png", "steps_heatmap.png", "steps_histogram.png",
         "probe_accuracy.png")
SUMMARY = "analysis.json"
HEATMAP_WIDTH = 32  # characters per heatmap row


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m looplm.analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (looplm.checkpoint.save_checkpoint)")
    p.add_argument("--text", required=True, help="the text to analyse, at least two characters")
    p.add_argument("--out", type=Path, default=Path("analysis"), help="directory for plots and analysis.json")
    p.add_argument("--vocab", help="the character vocabulary, in token-id order (default: the characters of "
                                   "the bundled tiny-shakespeare corpus, sorted)")
    p.add_argument("--loops", type=int, help="loop budget of the dynamics run (default: the config's max_loops)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative state change below which a state is "
                                                           "at a fixed point (default 1e-3)")
    p.add_argument("--backend", default="torch", help="backend to run on (default torch)")
    return p.parse_args(argv)


@torch.no_grad()
def analyze(model: LoopGPT, tokenizer: CharTokenizer, text: str, n_loops: int, tolerance: float) -> dict:
    """Every number the report shows, as plain Python values."""
    cfg = model.config
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the vocabulary has {tokenizer.vocab_size} characters but the model expects "
                         f"{cfg.vocab_size}; pass the model's vocabulary with --vocab")
    if not 2 <= len(text) <= cfg.block_size:
        raise ValueError(f"--text must have 2 to block_size={cfg.block_size} characters, got {len(text)}")
    idx = torch.tensor([tokenizer.encode(text)], device=model.lm_head.weight.device)
    inputs, targets = idx[:, :-1], idx[:, 1:]  # each character predicts the next

    halting = cfg.halt != "none"
    adaptive = LoopTrace(steps=torch.empty(0))
    model.loop(model.embed(inputs), inputs, cfg.max_loops if halting else cfg.n_loops, halting, trace=adaptive)

    states, dynamics = loop_states(model, inputs, n_loops)
    final_logits = model.head(states[-1]).float()
    loss = F.cross_entropy(final_logits.transpose(1, 2), targets, reduction="none")
    points = fixed_points(states, loss, tolerance)
    budget = points.n_loops
    per_loop = [dict(row, readout_accuracy=r, probe_accuracy=p) for row, r, p in zip(
        dynamics.per_loop(), readout_accuracy(model, states, targets),
        probe_accuracy(states, targets, cfg.vocab_size))]
    return dict(
        text=text, halting=halting, criterion=cfg.halt, n_loops=budget, tolerance=tolerance,
        characters=[dict(position=p, char=text[p], next_char=text[p + 1], steps=int(adaptive.steps[0, p]),
                         final_entropy=dynamics.entropy[-1][0, p].item(), loss=loss[0, p].item(),
                         converged_at=int(points.converged_at[0, p]) if points.converged_at[0, p] <= budget
                         else None)
                    for p in range(inputs.size(1))],
        per_loop=per_loop,
        entropy=[e[0].tolist() for e in dynamics.entropy],  # [loop][position]
        state_change=[d[0].tolist() for d in dynamics.delta],
        fixed_points=dict(converged_fraction=points.converged_fraction,
                          loss_vs_convergence_loop_spearman=points.rank_correlation),
    )


def print_report(result: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [(c["position"], repr(c["char"]), c["steps"], f"{c['final_entropy']:.3f}", f"{c['loss']:.3f}",
             c["converged_at"] if c["converged_at"] is not None else "-") for c in result["characters"]]
    print(f"Steps per character ({'halting on ' + result['criterion'] if result['halting'] else 'no halting'}); "
          f"entropy, loss and fixed point from {result['n_loops']} loops without halting:", file=file)
    print(tabulate(rows, headers=["pos", "char", "steps", "entropy", "loss", "fixed at"]), file=file)
    loops = [(r["loop"], f"{r['entropy']:.4f}", f"{r['delta']:.4f}", f"{r['readout_accuracy']:.3f}",
              f"{r['probe_accuracy']:.3f}") for r in result["per_loop"]]
    print("\nPer loop (means over characters):", file=file)
    print(tabulate(loops, headers=["loop", "entropy", "state change", "readout acc", "probe acc"]), file=file)
    fp = result["fixed_points"]
    print(f"\nFixed points (relative change < {result['tolerance']:g}): {fp['converged_fraction']:.0%} of "
          f"characters; Spearman(loss, loop of convergence) = {fp['loss_vs_convergence_loop_spearman']:+.3f}"
          " (> 0: harder characters settle later)", file=file)


def write_plots(result: dict, out: Path) -> list[Path]:
    loops = [r["loop"] for r in result["per_loop"]]
    written = []

    def save(fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(out / name)

    for name, key, label in (("entropy_vs_loop.png", "entropy", "entropy of the readout (nats)"),
                             ("state_change_vs_loop.png", "state_change", "||h_t - h_{t-1}|| / ||h||")):
        fig, ax = plt.subplots(figsize=(6, 4))
        per_token = torch.tensor(result[key])  # (loops, positions)
        ax.plot(loops, per_token.numpy(), color="tab:blue", alpha=0.15, linewidth=0.8)
        ax.plot(loops, per_token.mean(1).numpy(), color="black", linewidth=2, label="mean")
        if key == "state_change":
            ax.axhline(result["tolerance"], color="tab:red", linestyle="--", label="fixed-point tolerance")
            ax.set_yscale("log")
        ax.set(xlabel="loop", ylabel=label, title=f"{label.split(' (')[0]} against loop")
        ax.legend()
        save(fig, name)

    chars = result["characters"]
    rows = math.ceil(len(chars) / HEATMAP_WIDTH)
    grid = torch.full((rows, HEATMAP_WIDTH), float("nan"))
    for c in chars:
        grid[c["position"] // HEATMAP_WIDTH, c["position"] % HEATMAP_WIDTH] = c["steps"]
    fig, ax = plt.subplots(figsize=(HEATMAP_WIDTH * 0.35, rows * 0.45 + 1))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", vmin=1)
    bright = (max(c["steps"] for c in chars) + 1) / 2  # viridis turns light from the middle up
    for c in chars:
        ax.text(c["position"] % HEATMAP_WIDTH, c["position"] // HEATMAP_WIDTH, c["char"].replace("\n", "\\n"),
                ha="center", va="center", color="black" if c["steps"] > bright else "white", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("steps per character")
    fig.colorbar(image, ax=ax, label="steps")
    save(fig, "steps_heatmap.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [c["steps"] for c in chars]
    ax.hist(steps, bins=range(1, max(steps) + 2), align="left", rwidth=0.8)
    ax.set(xlabel="steps", ylabel="characters", title="steps per character")
    save(fig, "steps_histogram.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(loops, [r["readout_accuracy"] for r in result["per_loop"]], marker="o", label="model's own readout")
    ax.plot(loops, [r["probe_accuracy"] for r in result["per_loop"]], marker="s", label="linear probe (held out)")
    ax.set(xlabel="loop", ylabel="next-character accuracy", title="what each loop's state knows", ylim=(0, 1))
    ax.legend()
    save(fig, "probe_accuracy.png")
    return written


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    model = load_checkpoint(args.checkpoint, backend=args.backend).eval()
    tokenizer = CharTokenizer(args.vocab) if args.vocab else CharTokenizer.from_text(corpus_text())
    n_loops = args.loops if args.loops is not None else model.config.max_loops
    if n_loops < 2:
        raise CLIError(f"--loops must be >= 2 to see states change, got {n_loops}")
    if not args.tol > 0:
        raise CLIError(f"--tol must be > 0, got {args.tol}")
    result = analyze(model, tokenizer, args.text, n_loops, args.tol)
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    written = write_plots(result, args.out)
    atomic_write_bytes(args.out / SUMMARY, (json.dumps(result, indent=2) + "\n").encode())
    print(f"\nwrote {', '.join(str(p) for p in [*written, args.out / SUMMARY])}")
    return result


if __name__ == "__main__":
    run_cli(main, prog="looplm.analyze")
