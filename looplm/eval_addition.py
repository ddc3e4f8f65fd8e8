"""Length generalization on addition: `python -m looplm.eval_addition CKPT [--max-loops N] [--digits 1-20]`.

For each digit count, the model answers every test problem greedily (`a+b=` -> `c;`), with halting
on when its config names a criterion, and the table gives exact-match accuracy and the mean and
largest number of loops run per answer token. `--max-loops` is the loop budget, which may exceed
the loops the model was trained with.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tabulate import tabulate

from looplm.checkpoint import load_checkpoint, read_checkpoint_doc
from looplm.cli import ArgumentParser, run_cli
from looplm.data.addition import AdditionTask, encode, sequence_length
from looplm.model import LoopGPT
from looplm.train import resolve_device


@dataclass
class DigitResult:
    digits: int
    problems: int
    accuracy: float  # exact match of the whole answer
    mean_steps: float  # loops per answer token
    max_steps: int

    def row(self) -> list:
        return [self.digits, self.problems, f"{100 * self.accuracy:.1f}", f"{self.mean_steps:.2f}", self.max_steps]


HEADERS = ["digits", "problems", "exact match %", "mean loops", "max loops"]


@torch.no_grad()
def evaluate_digits(model: LoopGPT, task: AdditionTask, n_digits: int, max_loops: Optional[int] = None,
                    limit: Optional[int] = None, batch_size: int = 256) -> DigitResult:
    """Greedy answers to the n-digit test set (first `limit` problems)."""
    if sequence_length(n_digits) > model.config.block_size:
        raise ValueError(f"{n_digits}-digit problems take {sequence_length(n_digits)} tokens; the model's "
                         f"block_size is {model.config.block_size}")
    model.eval()
    device = model.lm_head.weight.device
    problems = task.test_set(n_digits)[:limit]
    correct, step_total, step_count, step_max = 0, 0, 0, 0
    for first in range(0, len(problems), batch_size):
        chunk = problems[first:first + batch_size]
        texts = [task.format(a, b) for a, b in chunk]
        prompts = torch.tensor([encode(prompt) for prompt, _ in texts], device=device)  # one length per digit count
        seq = prompts
        for _ in range(max(len(answer) for _, answer in texts)):
            logits, _ = model(seq, n_loops=max_loops)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        answers = [task.decode(row) for row in seq[:, prompts.size(1):].tolist()]
        correct += sum(task.parse_answer(text) == a + b for text, (a, b) in zip(answers, chunk))
        # Loops run where the model predicts each answer token of the reference answer. The model is
        # causal, so one pass over the finished sequence decides halting exactly as decoding did.
        _, _, trace = model(seq[:, :-1], n_loops=max_loops, return_trace=True)
        positions = torch.arange(seq.size(1) - 1, device=device)
        answer_len = torch.tensor([len(answer) for _, answer in texts], device=device)
        start = prompts.size(1) - 1
        on_answer = (positions >= start) & (positions < start + answer_len[:, None])
        steps = trace.steps[on_answer]
        step_total += int(steps.sum())
        step_count += steps.numel()
        step_max = max(step_max, int(steps.max()))
    return DigitResult(n_digits, len(problems), correct / len(problems), step_total / step_count, step_max)


def evaluate(model: LoopGPT, task: AdditionTask, digits: Optional[Sequence[int]] = None,
             max_loops: Optional[int] = None, limit: Optional[int] = None) -> list[DigitResult]:
    return [evaluate_digits(model, task, n, max_loops, limit) for n in (digits or task.test_digits)]


def format_table(results: Sequence[DigitResult]) -> str:
    return tabulate([r.row() for r in results], headers=HEADERS, tablefmt="github")


def task_from_checkpoint(path: Union[str, Path], test_digits: Optional[Sequence[int]] = None) -> AdditionTask:
    """The AdditionTask a checkpoint was trained on (from its metadata), with other test digits if given."""
    doc = read_checkpoint_doc(path)
    meta = doc.get("metadata", {}).get("task", {})
    if meta.get("task") != "addition":
        raise ValueError(f"{path} was not trained on addition (its task: {meta.get('task', 'not recorded')!r})")
    block_size = doc["looplm_config"]["block_size"]
    return AdditionTask(train_digits=tuple(meta["train_digits"]),
                        test_digits=tuple(test_digits or meta["test_digits"]), reverse=meta["reverse_digits"],
                        zero_pad=meta.get("zero_pad", False),  # checkpoints older than the option
                        swap_augment=meta["swap_augment"], random_offset=meta["random_offset"],
                        n_train=meta["n_train"], n_test=meta["n_test"], block_size=block_size, seed=meta["seed"])


def parse_digits(text: str) -> list[int]:
    """'5-12' or '1,2,8' or '7' -> digit counts."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"digits must look like '5-12' or '1,2,8', got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"digit counts must be >= 1, got {text!r}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> list[DigitResult]:
    parser = ArgumentParser(prog="python -m looplm.eval_addition", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory written by looplm.train on the addition task")
    parser.add_argument("--max-loops", type=int, default=None, help="loop budget (default: the config's)")
    parser.add_argument("--digits", type=parse_digits, default=None, help="digit counts, e.g. 1-20 (default: "
                        "the training run's test digits)")
    parser.add_argument("--limit", type=int, default=None, help="problems per digit count (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--backend", default="torch", help="torch, triton or tile")
    args = parser.parse_args(argv)
    if args.max_loops is not None and args.max_loops < 1:
        parser.error(f"--max-loops must be >= 1, got {args.max_loops}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device)
    task = task_from_checkpoint(args.checkpoint, args.digits)
    task.check_disjoint()
    model = load_checkpoint(args.checkpoint, backend=args.backend, device=device)
    cfg = model.config
    halting = f"halt={cfg.halt} (threshold {cfg.halt_threshold})" if cfg.halt != "none" else "no halting"
    print(f"{args.checkpoint}: {cfg.n_layer} layer(s) x {cfg.n_loops} loops, {halting}, "
          f"loop budget {args.max_loops or cfg.max_loops}; trained on {task.train_digits[0]}-{task.train_digits[1]} digits")
    results = evaluate(model, task, args.digits, args.max_loops, args.limit)
    print(format_table(results))
    return results


if __name__ == "__main__":
    run_cli(main, prog="looplm.eval_addition")
