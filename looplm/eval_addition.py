"""Length generalization on addition: `python -m looplm.eval_addition CKPT [--max-loops N] [--digits 1-20]`.

    python -m looplm.eval_addition CKPT --problems FILE [--json] [--answers OUT]

answers anyone's problems instead: one `a+b` per line (any lengths; blank lines skipped), grouped by
the longer operand's digit count. A malformed line, or a problem longer than the model's block, is
an error naming its line number, raised before anything is answered or written.

For each digit count, the model answers every test problem greedily (`a+b=` -> `c;`), with halting
on when its config names a criterion, and the table gives exact-match accuracy and the mean and
largest number of loops run per answer token. `--max-loops` is the loop budget, which may exceed
the loops the model was trained with; `--halt CRITERION --threshold X` change the checkpoint's halting
for this run, as in `looplm.sample`.

Depth against difficulty. Below the table, Spearman's rank correlation between the digit count and
the mean loops per answer token, over the digit counts evaluated (ties share their mean rank; 0
when either is constant, or with one digit count). `--by-carry` adds the same table per carry-chain
length (`looplm.data.addition.carry_chain`: the most place values one carry reaches, the place
above where it is made and each place above that whose digits sum to 9), and turns `--json` from
the list per digit count into an object: {"by_digits": [...], "by_carry_chain": [...],
"spearman_digits_mean_loops": rho}.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tabulate import tabulate

from looplm.checkpoint import CONFIG_FILE, checkpoint_dir, load_checkpoint, read_checkpoint_doc, read_config
from looplm.cli import ArgumentParser, run_cli
from looplm.config import HALT_CRITERIA
from looplm.data.addition import (LATER_FIELDS, RECORDED_FIELDS, AdditionTask, Problem, carry_chain, encode,
                                  max_position_id)
from looplm.fileio import atomic_write_text
from looplm.model import LoopGPT
from looplm.probes import spearman
from looplm.sample import halting_config
from looplm.train_config import resolve_device


@dataclass
class DigitResult:
    digits: int
    problems: int
    accuracy: float  # exact match of the whole answer
    mean_steps: float  # loops per answer token
    max_steps: int

    def row(self) -> list:
        return [self.digits, self.problems, f"{100 * self.accuracy:.1f}", f"{self.mean_steps:.2f}", self.max_steps]

    def to_json(self) -> dict:
        return dict(digits=self.digits, problems=self.problems, accuracy=self.accuracy, mean_loops=self.mean_steps,
                    max_loops=self.max_steps)


HEADERS = ["digits", "problems", "exact match %", "mean loops", "max loops"]


@dataclass
class CarryResult:
    carry_chain: int  # the most places one carry reaches (data.addition.carry_chain)
    problems: int
    accuracy: float
    mean_steps: float  # loops per answer token
    max_steps: int

    def row(self) -> list:
        return [self.carry_chain, self.problems, f"{100 * self.accuracy:.1f}", f"{self.mean_steps:.2f}",
                self.max_steps]

    def to_json(self) -> dict:
        return dict(carry_chain=self.carry_chain, problems=self.problems, accuracy=self.accuracy,
                    mean_loops=self.mean_steps, max_loops=self.max_steps)


CARRY_HEADERS = ["carry chain", "problems", "exact match %", "mean loops", "max loops"]


@dataclass
class Answer:
    """The model's answer to a+b: its text (up to and with ';' when it wrote one), whether it is
    exactly right, and the loops it ran on each answer token."""
    a: int
    b: int
    text: str
    correct: bool
    steps: list[int]

    @property
    def digits(self) -> int:
        return max(len(str(self.a)), len(str(self.b)))

    @property
    def carry_chain(self) -> int:
        return carry_chain(self.a, self.b)


def problem_tokens(task: AdditionTask, a: int, b: int) -> int:
    prompt, answer = task.format(a, b)
    return len(prompt) + len(answer)


def check_fits(model: LoopGPT, task: AdditionTask, a: int, b: int) -> None:
    """Raise ValueError if a+b does not fit the model's block (and position table, with task-given positions)."""
    cfg, digits = model.config, max(len(str(a)), len(str(b)))
    if problem_tokens(task, a, b) > cfg.block_size:
        raise ValueError(f"{digits}-digit problems take {problem_tokens(task, a, b)} tokens; the model's "
                         f"block_size is {cfg.block_size}")
    if task.gives_positions and max_position_id(digits) >= cfg.n_positions:
        raise ValueError(f"{digits}-digit problems take position ids up to {max_position_id(digits)}; the model's "
                         f"n_positions is {cfg.n_positions}")


@torch.no_grad()
def answer_problems(model: LoopGPT, task: AdditionTask, problems: Sequence[Problem], max_loops: Optional[int] = None,
                    batch_size: int = 256) -> list[Answer]:
    """Greedy answers (`a+b=` -> `c;`) in the order of `problems`, with halting on when the model's
    config names a criterion. Problems are batched by prompt length; each gets as many new tokens
    as its reference answer has (a longer answer is wrong anyway); with an aligned task, exactly its
    digits, and ';' closes them."""
    model.eval()
    device = model.lm_head.weight.device
    for a, b in problems:
        check_fits(model, task, a, b)
    texts = [task.format(a, b) for a, b in problems]
    groups: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(texts):
        groups.setdefault(len(prompt), []).append(i)
    answers: list[Optional[Answer]] = [None] * len(problems)
    for members in groups.values():
        for first in range(0, len(members), batch_size):
            chunk = members[first:first + batch_size]
            prompt_len = len(texts[chunk[0]][0])
            answer_len = torch.tensor([task.written_length(texts[i][1]) for i in chunk], device=device)
            n_new = int(answer_len.max())
            prompts = torch.tensor([encode(texts[i][0]) for i in chunk], device=device)
            pos = None
            if task.gives_positions:  # the layout, hence the ids, follows from the prompt: read them off the reference
                reference = torch.tensor([encode(texts[i][0] + texts[i][1]) for i in chunk], device=device)
                pos = task.get_positions(reference)[:, :prompt_len + n_new]
            seq = model.generate(prompts, n_new, temperature=0.0, n_loops=max_loops, pos=pos)
            # Loops run where the model predicts each answer token of the reference answer. The model is
            # causal, so one pass over the finished sequence decides halting exactly as decoding did.
            _, _, trace = model(seq[:, :-1], n_loops=max_loops, return_trace=True,
                                pos=None if pos is None else pos[:, :-1])
            for row, i in enumerate(chunk):
                a, b = problems[i]
                text = task.decode(seq[row, prompt_len:].tolist()) + (";" if task.aligned else "")
                text = text[:text.index(";") + 1] if ";" in text else text
                steps = trace.steps[row, prompt_len - 1:prompt_len - 1 + int(answer_len[row])].tolist()
                answers[i] = Answer(a, b, text, task.parse_answer(text) == a + b, steps)
    return answers


def _grouped(answers: Sequence[Answer], key) -> list[tuple[int, int, float, float, int]]:
    """Per value of key(answer), ascending: (value, problems, exact match, mean and largest loops per answer token)."""
    groups: dict[int, list[Answer]] = {}
    for answer in answers:
        groups.setdefault(key(answer), []).append(answer)
    rows = []
    for value in sorted(groups):
        group = groups[value]
        steps = [s for answer in group for s in answer.steps]
        rows.append((value, len(group), sum(a.correct for a in group) / len(group), sum(steps) / len(steps),
                     max(steps)))
    return rows


def summarize(answers: Sequence[Answer]) -> list[DigitResult]:
    """Per digit count (the longer operand's): problems, exact match, mean and largest loops per answer token."""
    return [DigitResult(*row) for row in _grouped(answers, lambda answer: answer.digits)]


def summarize_by_carry(answers: Sequence[Answer]) -> list[CarryResult]:
    """Per carry-chain length (data.addition.carry_chain): problems, exact match, mean and largest loops per
    answer token."""
    return [CarryResult(*row) for row in _grouped(answers, lambda answer: answer.carry_chain)]


def depth_correlation(results: Sequence[DigitResult]) -> float:
    """Spearman(digit count, mean loops per answer token) over the digit counts of `results`, ties
    averaged; 0 when either is constant (no halting, or a single digit count)."""
    if len(results) < 2:
        return 0.0
    return spearman(torch.tensor([float(r.digits) for r in results]), torch.tensor([r.mean_steps for r in results]))


@dataclass
class Report:
    """What main prints: the results per digit count and per carry-chain length, and the correlation
    of depth with digit count."""
    by_digits: list[DigitResult]
    by_carry: list[CarryResult]
    spearman_digits_loops: float

    def to_json(self) -> dict:
        return dict(by_digits=[r.to_json() for r in self.by_digits],
                    by_carry_chain=[r.to_json() for r in self.by_carry],
                    spearman_digits_mean_loops=self.spearman_digits_loops)


def evaluate_digits(model: LoopGPT, task: AdditionTask, n_digits: int, max_loops: Optional[int] = None,
                    limit: Optional[int] = None, batch_size: int = 256) -> DigitResult:
    """Greedy answers to the n-digit test set (first `limit` problems)."""
    problems = task.test_set(n_digits)[:limit]
    return summarize(answer_problems(model, task, problems, max_loops, batch_size))[0]


def evaluate(model: LoopGPT, task: AdditionTask, digits: Optional[Sequence[int]] = None,
             max_loops: Optional[int] = None, limit: Optional[int] = None) -> list[DigitResult]:
    return [evaluate_digits(model, task, n, max_loops, limit) for n in (digits or task.test_digits)]


PROBLEM_LINE = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*")


def parse_problems(text: str, source: str = "problems") -> list[tuple[int, Problem]]:
    """One 'a+b' per line (a, b: digits 0-9; spaces around them allowed; blank lines skipped) ->
    [(line number, (a, b))]. A malformed line is a ValueError naming its line number."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = PROBLEM_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{source}, line {number}: expected 'a+b' with a and b written in digits 0-9, "
                             f"got {line.strip()[:60]!r}")
        problems.append((number, (int(match.group(1)), int(match.group(2)))))
    if not problems:
        raise ValueError(f"{source} holds no problems: write one 'a+b' per line")
    return problems


def read_problems(path: Union[str, Path], model: LoopGPT, task: AdditionTask) -> list[Problem]:
    """The problems of a file, each checked against the model's block before any is answered."""
    numbered = parse_problems(Path(path).read_text(), str(path))
    for number, (a, b) in numbered:
        try:
            check_fits(model, task, a, b)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: {e}") from None
    return [problem for _, problem in numbered]


def format_table(results: Sequence[DigitResult]) -> str:
    return tabulate([r.row() for r in results], headers=HEADERS, tablefmt="github")


def format_carry_table(results: Sequence[CarryResult]) -> str:
    return tabulate([r.row() for r in results], headers=CARRY_HEADERS, tablefmt="github")


def task_from_checkpoint(path: Union[str, Path], test_digits: Optional[Sequence[int]] = None) -> AdditionTask:
    """The AdditionTask a checkpoint was trained on (from its metadata), with other test digits if given."""
    doc = read_checkpoint_doc(path)
    meta = doc.get("metadata", {}).get("task", {})
    if meta.get("task") != "addition":
        raise ValueError(f"{path} was not trained on addition (its task: {meta.get('task', 'not recorded')!r})")
    config = read_config(path)
    block_size, n_positions = config.block_size, config.n_positions
    missing = sorted(set(RECORDED_FIELDS) - set(meta) - set(LATER_FIELDS))
    if missing:
        raise ValueError(f"{path}'s task record lacks {missing}; it cannot rebuild the task's data")
    fields = {field: meta[key] for key, field in RECORDED_FIELDS.items() if key in meta}
    if test_digits:
        fields["test_digits"] = test_digits
    try:
        return AdditionTask(**fields, block_size=block_size, n_positions=n_positions)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{checkpoint_dir(path) / CONFIG_FILE}: field 'metadata.task' does not rebuild the task: "
                         f"{e}") from None


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


def main(argv: Optional[Sequence[str]] = None) -> Report:
    parser = ArgumentParser(prog="python -m looplm.eval_addition", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory written by looplm.train on the addition task")
    parser.add_argument("--problems", default=None, help="a file of problems, one 'a+b' per line, answered instead "
                        "of the test sets")
    parser.add_argument("--answers", default=None, help="write each answer to this file, one 'a+b=c' per line "
                        "('?' where the model wrote no number)")
    parser.add_argument("--json", action="store_true", help="print the results per digit count as JSON")
    parser.add_argument("--by-carry", action="store_true", help="also per carry-chain length; with --json, print "
                        "an object: by_digits, by_carry_chain, spearman_digits_mean_loops")
    parser.add_argument("--max-loops", type=int, default=None, help="loop budget (default: the config's)")
    parser.add_argument("--halt", choices=tuple(HALT_CRITERIA), default=None, help="halting criterion (default: "
                        "the checkpoint's)")
    parser.add_argument("--threshold", type=float, default=None, help="halting threshold, in the criterion's units "
                        "(default: the checkpoint's)")
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
    if args.problems is not None and (args.digits is not None or args.limit is not None):
        parser.error("--problems answers the file's problems; --digits and --limit are for the test sets")
    device = resolve_device(args.device)
    task = task_from_checkpoint(args.checkpoint, args.digits)
    model = load_checkpoint(args.checkpoint, backend=args.backend, device=device)
    model.config = halting_config(model.config, args.halt, args.threshold, None)
    if args.problems is not None:
        problems = read_problems(args.problems, model, task)
    else:
        task.check_disjoint()
        for n in task.test_digits:
            check_fits(model, task, *task.test_set(n)[0])
        problems = [p for n in task.test_digits for p in task.test_set(n)[:args.limit]]
    answers = answer_problems(model, task, problems, args.max_loops)
    results = summarize(answers)
    report = Report(results, summarize_by_carry(answers), depth_correlation(results))
    if args.answers is not None:
        atomic_write_text(args.answers, "".join(f"{a.a}+{a.b}={_stated(task, a.text)}\n" for a in answers))
    if args.json:
        print(json.dumps(report.to_json() if args.by_carry else [r.to_json() for r in results], indent=1))
        return report
    cfg = model.config
    after = "".join(f", from {task.decode([token])!r} on {value}" for token, value in cfg.halt_thresholds_after.items())
    halting = f"halt={cfg.halt} (threshold {cfg.halt_threshold}{after})" if cfg.halt != "none" else "no halting"
    print(f"{args.checkpoint}: {cfg.n_layer} layer(s) x {cfg.n_loops} loops, {halting}, "
          f"loop budget {args.max_loops or cfg.max_loops}; positions {task.positions}; trained on "
          f"{task.train_digits[0]}-{task.train_digits[1]} digits")
    print(format_table(results))
    print(f"Spearman(digit count, mean loops) = {report.spearman_digits_loops:+.3f} over {len(results)} digit counts")
    if args.by_carry:
        print()
        print(format_carry_table(report.by_carry))
    return report


def _stated(task: AdditionTask, text: str) -> str:
    value = task.parse_answer(text)
    return "?" if value is None else str(value)


if __name__ == "__main__":
    run_cli(main, prog="looplm.eval_addition")
