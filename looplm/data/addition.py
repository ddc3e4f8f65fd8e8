"""Multi-digit addition `a+b=c;` for length generalization.

Digits are written least significant first by default (`reverse=True`), the order in which carries
propagate, so each answer digit depends on digits already seen; `reverse=False` writes them as
usual. Training problems have operands of `train_digits` digits (each operand's length drawn on its
own); test sets hold problems whose two operands both have exactly n digits, for each n in
`test_digits` (e.g. 5 to 12, or up to 20: out of distribution). Everything is drawn from `seed`, each
test set from its own stream; training draws that hit a test problem of the training digit counts
(in either operand order) are redrawn, so no test problem is ever trained on, and `check_disjoint`
asserts it.

With `zero_pad`, operands are written with leading zeros to one width (at least the longest
training operand; `007+120=` read plain) and the answer one digit wider, so a digit's place value
is its distance from the start of its number, the same in every problem of that width: a model with
absolute positions then finds the digits to add at fixed offsets. Without it the operand lengths
vary and the digits to add must be found by content, which a small model learns far more slowly.

Each problem is one row of `block_size` tokens, padded with `_`; a batch is cut to its longest row.
The loss is on the answer only: targets are -1 except where the next token is an answer digit or
the closing `;`. With `random_offset`, training rows start at a random position, so every position
embedding up to `block_size` is trained, not only the first few; with learned absolute positions
this makes the task translation invariant, which is much slower to learn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import numpy as np
import torch
from torch import Tensor

VOCAB = "0123456789+=;_"
END, PAD = VOCAB.index(";"), VOCAB.index("_")
IGNORE = -1  # the model's cross entropy ignores this target
SPLITS = ("train", "val")
Problem = tuple[int, int]


def sequence_length(n_digits: int) -> int:
    """Tokens of an n+n digit problem: n, '+', n, '=', up to n+1 answer digits, ';'."""
    return 3 * n_digits + 4


def encode(text: str) -> list[int]:
    unknown = sorted(set(text) - set(VOCAB))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the addition vocabulary {VOCAB!r}")
    return [VOCAB.index(c) for c in text]


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


def _digit_range(name: str, value) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list, range)) else (value,)
    if not values or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in values):
        raise ValueError(f"{name} must be digit counts >= 1, got {value!r}")
    return values


@dataclass(frozen=True)
class AdditionTask:
    train_digits: tuple[int, int] = (1, 4)  # inclusive range of operand lengths in training
    test_digits: tuple[int, ...] = tuple(range(1, 13))  # one test set per digit count
    reverse: bool = True
    zero_pad: bool = False  # operands padded to one width, at least the longest training operand
    swap_augment: bool = True  # train on b+a as well as a+b
    random_offset: bool = True
    n_train: int = 100_000
    n_test: int = 200  # per digit count (fewer where the digit count has few problems)
    block_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        train = _digit_range("train_digits", self.train_digits)
        if len(train) != 2 or train[0] > train[1]:
            raise ValueError(f"train_digits must be (lowest, highest) with lowest <= highest, got {self.train_digits!r}")
        test = _digit_range("test_digits", self.test_digits)
        object.__setattr__(self, "train_digits", train)
        object.__setattr__(self, "test_digits", tuple(sorted(set(test))))
        for name in ("n_train", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        longest = sequence_length(max(train[1], max(test)))
        if self.block_size < longest:
            raise ValueError(f"block_size {self.block_size} is too short: {max(train[1], max(test))}-digit "
                             f"problems take {longest} tokens")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    # ---- problems

    def format(self, a: int, b: int) -> tuple[str, str]:
        """(prompt 'a+b=', answer 'c;') in this task's digit order; with zero_pad, both operands are
        written `width` digits wide and the answer width + 1 (`width`: the longest training operand,
        or more for longer operands)."""
        width = max(self.train_digits[1], len(str(a)), len(str(b))) if self.zero_pad else 0

        def digits(n: int, pad: int) -> str:
            text = str(n).zfill(pad)
            return text[::-1] if self.reverse else text
        return f"{digits(a, width)}+{digits(b, width)}=", f"{digits(a + b, width + 1 if width else 0)};"

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def parse_answer(self, text: str) -> int | None:
        """The number an answer 'c;...' states, or None if it is not digits closed by ';'."""
        head, sep, _ = text.partition(";")
        if not sep or not head.isdigit():
            return None
        return int(head[::-1] if self.reverse else head)

    def test_set(self, n_digits: int) -> list[Problem]:
        """The test problems whose operands both have exactly n_digits digits; each digit count has its
        own random stream, so a test set does not depend on which others are drawn."""
        rng = random.Random(f"addition-test-{self.seed}-{n_digits}")
        count = 10 if n_digits == 1 else 9 * 10 ** (n_digits - 1)
        size = min(self.n_test, max(1, count * count // 20))  # at most a tenth of the unordered pairs
        problems: set[Problem] = set()
        while len(problems) < size:
            problems.add((_draw(rng, n_digits), _draw(rng, n_digits)))
        return sorted(problems)

    @cached_property
    def test_sets(self) -> dict[int, list[Problem]]:
        return {n: self.test_set(n) for n in self.test_digits}

    @cached_property
    def train_problems(self) -> list[Problem]:
        """Held out: the test sets of every training digit count, whichever test_digits are asked for,
        so the training set is the same whatever is evaluated later."""
        lo, hi = self.train_digits
        held_out = {_key(p) for n in range(lo, hi + 1) for p in self.test_set(n)}
        rng = random.Random(f"addition-train-{self.seed}")
        problems = []
        while len(problems) < self.n_train:
            p = (_draw(rng, rng.randint(lo, hi)), _draw(rng, rng.randint(lo, hi)))
            if _key(p) not in held_out:
                problems.append(p)
        if self.swap_augment:
            problems += [(b, a) for a, b in problems]
        return problems

    def check_disjoint(self) -> None:
        """Raise if any test problem, in either operand order, is in the training set."""
        trained = {_key(p) for p in self.train_problems}
        for n, problems in self.test_sets.items():
            leaked = [p for p in problems if _key(p) in trained]
            if leaked:
                raise AssertionError(f"{len(leaked)} of the {n}-digit test problems are in the training set, "
                                     f"e.g. {leaked[0]}")

    # ---- tensors

    def encode_rows(self, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray]:
        """Rows x (N, block_size) padded with PAD, and targets y: the next token on the answer, else -1."""
        x = np.full((len(problems), self.block_size), PAD, dtype=np.int64)
        y = np.full_like(x, IGNORE)
        for row, (a, b) in enumerate(problems):
            prompt, answer = self.format(a, b)
            ids = encode(prompt + answer)
            x[row, :len(ids)] = ids
            first = len(prompt) - 1  # the '=' predicts the first answer digit
            y[row, first:len(ids) - 1] = ids[first + 1:]
        return x, y

    @cached_property
    def _rows(self) -> dict[str, tuple[Tensor, Tensor]]:
        self.check_disjoint()
        lo, hi = self.train_digits
        val = [p for n in range(lo, hi + 1) for p in self.test_set(n)]
        return {split: tuple(torch.from_numpy(a) for a in self.encode_rows(problems))
                for split, problems in (("train", self.train_problems), ("val", val))}

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator,
                  device: Union[str, torch.device] = "cpu") -> tuple[Tensor, Tensor]:
        """Random rows of a split: 'train' or 'val' (the test problems of the training digit counts)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        x, y = self._rows[split]
        rows = torch.randint(len(x), (batch_size,), generator=generator)
        x, y = x[rows], y[rows]
        if self.random_offset and split == "train":
            # Roll each row right into its trailing padding: the problem starts at a random position.
            used = (x != PAD).sum(dim=1)
            offset = (torch.rand(batch_size, generator=generator) * (self.block_size - used + 1)).long()
            cols = (torch.arange(self.block_size) - offset[:, None]) % self.block_size
            x, y = x.gather(1, cols), y.gather(1, cols)
        # Columns past the last token of every row are padding with no loss, and the model is causal,
        # so cutting them changes nothing but the cost: rows of short problems in a 64-wide block.
        width = int((x != PAD).any(dim=0).nonzero().max()) + 1
        return x[:, :width].to(device), y[:, :width].to(device)


def _draw(rng: random.Random, n_digits: int) -> int:
    return rng.randint(0 if n_digits == 1 else 10 ** (n_digits - 1), 10 ** n_digits - 1)


def _key(problem: Problem) -> Problem:
    return (min(problem), max(problem))
