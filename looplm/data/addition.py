"""Multi-digit addition `a+b=c;` for length generalization.

Digits are written least significant first by default (`reverse=True`), the order in which carries
propagate, so each answer digit depends on digits already seen; `reverse=False` writes them as
usual. Training problems have operands of `train_digits` digits (each operand's length drawn on its
own); test sets hold problems whose two operands both have exactly n digits, for each n in
`test_digits` (e.g. 5 to 12, or up to 20: out of distribution). Everything is drawn from `seed`, each
test set from its own stream; training draws that hit a test problem of the training digit counts
(in either operand order) are redrawn, so no test problem is ever trained on, and `check_disjoint`
asserts it.

With `carry_fraction`, that fraction of the training problems is drawn with a planted carry chain
(`_draw_carry_chain`): a place whose digits sum to 10 or more, and above it a run of places
summing to exactly 9, so that the carry travels to the top of the run; the chain's length (see
`carry_chain`) is drawn uniformly from 2 to the longer operand's width. Drawn at random, chains of
3 or more places are about half a percent of 1-4 digit problems, too few to learn from. The other
problems are the first ones the default stream draws, so with 0 (the default) the training set is
the same as without the option.

With `zero_pad`, operands are written with leading zeros to one width (at least the longest
training operand; `007+120=` read plain) and the answer one digit wider, so a digit's place value
is its distance from the start of its number, the same in every problem of that width: a model with
absolute positions then finds the digits to add at fixed offsets. Without it the operand lengths
vary and the digits to add must be found by content, which a small model learns far more slowly.

Positions the task gives (`positions`). "absolute": none, the model uses 0..T-1. "coupled"
(position coupling, Cho et al. 2024): digits of one place value share one id across both operands
and the answer, shifted so that the token that predicts an answer digit carries that digit's id:
operand digit of significance j -> 2 + j; the token predicting answer digit j (the '=' or the
answer digit before it) -> 2 + j; the last answer digit, which predicts ';' -> 2 + (n + 1) reversed,
1 plain; '+', ';' and padding -> 0. "abacus" (McLeish et al. 2024): every digit's id is 2 + its
significance, answer digits too (unshifted), and '=' is the answer's digit before the first (id 1
reversed, the top's id + 1 plain): a query at id 0 could not tell its own problem's digits from
those of the others packed in its row, since offsets shift only nonzero ids (with '=' at 0 the
first answer digit kept a loss of 1.5 nats in packed rows while every other was learned); '+',
';' and padding -> 0. With either, operands
are zero-padded to the longer one's width (at least the longest training operand with zero_pad)
and the answer to one digit more, so the ids of the answer are known from the prompt.
With `aligned`, every answer digit has operand digits of its place value: operands get one more
leading zero than the longer needs (room for the carry), the answer is exactly as wide as they are,
and its length is given by the task: evaluation writes that many digits. (Training still asks for
the ';': the token that predicts it holds an id at which no operand has a digit, and learning that
nothing there matches is what teaches the model, early, to find digits by their ids; without that
target a 1-layer model at learning rate 1e-2 did not learn in 1000 iterations.) Without `aligned`,
the token that predicts the top carry digit holds an id at which neither operand has a digit, so
its attention finds nothing to match and averages whatever the row holds, which differs between
short training rows and long test problems.
`random_offset` then adds one random shift per training problem to every nonzero id, up to the
position table (`n_positions`), so every id the test range needs is trained; evaluation centres
each problem in the table instead (the ids at its ends are trained least). The tokens themselves
are never shifted in the row. With `pack`, each training row holds that many problems with
disjoint id ranges in random order: a problem's queries then meet digits at every id distance
and in numbers like a long problem's, which a row of one short problem never shows them.

Each problem is one row of `block_size` tokens, padded with `_`; a batch is cut to its longest row.
The loss is on the answer only: targets are -1 except where the next token is an answer digit or
the closing `;`. With `random_offset` and absolute positions, training rows start at a random position, so every position
embedding up to `block_size` is trained, not only the first few; with learned absolute positions
this makes the task translation invariant, which is much slower to learn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

VOCAB = "0123456789+=;_"
PLUS, EQUALS, END, PAD = (VOCAB.index(c) for c in "+=;_")
POSITIONS = ("absolute", "coupled", "abacus")
IGNORE = -1  # the model's cross entropy ignores this target
SPLITS = ("train", "val")
Problem = tuple[int, int]


def sequence_length(n_digits: int, aligned: bool = False) -> int:
    """Tokens of an n+n digit problem: n, '+', n, '=', up to n+1 answer digits, ';' (aligned: every
    part n+1 wide)."""
    return 3 * n_digits + (6 if aligned else 4)


def max_position_id(n_digits: int) -> int:
    """The largest position id an n-digit problem takes with task-given positions, without offset
    (aligned or not: the token after the answer's top digit)."""
    return n_digits + 3


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


# What a checkpoint records of its addition task, under the trainer's names (TrainConfig), and the
# AdditionTask field each one fills; block_size and n_positions come from the model's config instead.
RECORDED_FIELDS = {"train_digits": "train_digits", "test_digits": "test_digits", "reverse_digits": "reverse",
                   "zero_pad": "zero_pad", "swap_augment": "swap_augment", "random_offset": "random_offset",
                   "n_train": "n_train", "n_test": "n_test", "seed": "seed", "positions": "positions",
                   "pack": "pack", "aligned": "aligned", "carry_fraction": "carry_fraction"}
# Options added after the first checkpoints: a record without one was made with the task's default.
LATER_FIELDS = ("zero_pad", "positions", "pack", "aligned", "carry_fraction")


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
    positions: str = "absolute"  # one of POSITIONS: who gives the model its position ids
    n_positions: Optional[int] = None  # the model's position table (None: block_size); ids < this
    pack: int = 1  # training problems per row (task-given positions only): distractors at every distance
    aligned: bool = False  # one more leading zero per operand, answer as wide, its length given
    carry_fraction: float = 0.0  # training problems drawn with a planted carry chain of 2 or more places

    @property
    def gives_positions(self) -> bool:
        return self.positions != "absolute"

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
        longest = sequence_length(max(train[1], max(test)), self.aligned)
        if self.block_size < longest:
            raise ValueError(f"block_size {self.block_size} is too short: {max(train[1], max(test))}-digit "
                             f"problems take {longest} tokens")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.n_positions is None:
            object.__setattr__(self, "n_positions", self.block_size)
        if not isinstance(self.n_positions, int) or self.n_positions < 1:
            raise ValueError(f"n_positions must be an integer >= 1, got {self.n_positions!r}")
        if not isinstance(self.pack, int) or self.pack < 1 or (self.pack > 1 and not self.gives_positions):
            raise ValueError(f"pack must be an integer >= 1, and 1 with absolute positions, got {self.pack!r}")
        if self.pack * sequence_length(train[1], self.aligned) > self.block_size:
            raise ValueError(f"block_size {self.block_size} is too short for {self.pack} packed {train[1]}-digit "
                             f"problems ({self.pack * sequence_length(train[1], self.aligned)} tokens)")
        if self.gives_positions and self.pack * max_position_id(train[1]) >= self.n_positions:
            raise ValueError(f"n_positions {self.n_positions} is too small for {self.pack} packed {train[1]}-digit "
                             f"problems (disjoint position ids up to {self.pack * max_position_id(train[1])})")
        if (isinstance(self.carry_fraction, bool) or not isinstance(self.carry_fraction, (int, float))
                or not 0.0 <= self.carry_fraction <= 1.0):
            raise ValueError(f"carry_fraction must be a number from 0 to 1 (the share of training problems "
                             f"with a planted carry chain), got {self.carry_fraction!r}")
        longest_ids = max_position_id(max(train[1], max(test)))
        if self.gives_positions and longest_ids >= self.n_positions:
            raise ValueError(f"n_positions {self.n_positions} is too small: {max(train[1], max(test))}-digit "
                             f"problems take position ids up to {longest_ids}")

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    # ---- problems

    def format(self, a: int, b: int) -> tuple[str, str]:
        """(prompt 'a+b=', answer 'c;') in this task's digit order; with zero_pad, both operands are
        written `width` digits wide and the answer width + 1 (`width`: the longest training operand,
        or more for longer operands). With task-given positions, `width` is at least the longer
        operand's, whether zero_pad or not. With `aligned`, operands are one digit wider still and
        the answer exactly as wide."""
        longer = max(len(str(a)), len(str(b)))
        width = longer if self.gives_positions or self.aligned else 0
        if self.zero_pad:
            width = max(width, self.train_digits[1], longer)
        answer_width = width + 1 if width else 0
        if self.aligned:
            width = answer_width

        def digits(n: int, pad: int) -> str:
            text = str(n).zfill(pad)
            return text[::-1] if self.reverse else text
        return f"{digits(a, width)}+{digits(b, width)}=", f"{digits(a + b, answer_width)};"

    def written_length(self, answer: str) -> int:
        """Tokens the model writes of an answer 'c;' at evaluation: all of it, or with `aligned` its
        digits (the task gives their count, and ';' follows)."""
        return len(answer) - 1 if self.aligned else len(answer)

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
        planted = round(self.carry_fraction * self.n_train)
        rng = random.Random(f"addition-train-{self.seed}")
        problems = []
        while len(problems) < self.n_train - planted:
            p = (_draw(rng, rng.randint(lo, hi)), _draw(rng, rng.randint(lo, hi)))
            if _key(p) not in held_out:
                problems.append(p)
        chains = random.Random(f"addition-train-carry-{self.seed}")  # its own stream: the rest stay as drawn
        while len(problems) < self.n_train:
            p = _draw_carry_chain(chains, lo, hi)
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
        if split == "train" and self.pack > 1:
            x, y = self._packed(x, y, torch.randint(len(x), (batch_size, self.pack), generator=generator))
        else:
            rows = torch.randint(len(x), (batch_size,), generator=generator)
            x, y = x[rows], y[rows]
        if self.random_offset and split == "train" and not self.gives_positions:
            # Roll each row right into its trailing padding: the problem starts at a random position.
            used = (x != PAD).sum(dim=1)
            offset = (torch.rand(batch_size, generator=generator) * (self.block_size - used + 1)).long()
            cols = (torch.arange(self.block_size) - offset[:, None]) % self.block_size
            x, y = x.gather(1, cols), y.gather(1, cols)
        # Columns past the last token of every row are padding with no loss, and the model is causal,
        # so cutting them changes nothing but the cost: rows of short problems in a 64-wide block.
        width = int((x != PAD).any(dim=0).nonzero().max()) + 1
        return x[:, :width].to(device), y[:, :width].to(device)

    def get_positions(self, x: Tensor, split: str = "val", generator: Optional[torch.Generator] = None
                      ) -> Optional[Tensor]:
        """The position ids (B, T) this task gives the rows x (as get_batch and format write them), or
        None with absolute positions. Training rows ('train' with random_offset and a generator) get
        random shifts, one per problem, as large as the position table allows; the problems of a
        packed row get disjoint id ranges, so a problem never shares an id with another. Other rows
        are centred in the table: the ids at its ends are the least trained."""
        if not self.gives_positions:
            return None
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        shuffle = random.Random(int(torch.randint(2 ** 62, (1,), generator=generator))) \
            if self.random_offset and split == "train" and generator is not None else None
        rows = []
        for tokens in x.tolist():
            pieces = row_positions(tokens, self.positions, self.reverse, self.aligned)  # [(first column, ids)] per problem
            widths = [max(ids) for _, ids in pieces]
            free = self.n_positions - 1 - sum(widths)
            if free < 0:
                raise ValueError(f"a row of {len(pieces)} problem(s) needs position ids up to {sum(widths)}; "
                                 f"n_positions is {self.n_positions}")
            if shuffle is None:  # evaluation: the rows' problems one after another, centred in the table
                shifts = [free // 2 + sum(widths[:k]) for k in range(len(pieces))]
            else:  # disjoint ranges in random order, random gaps between them
                shifts = [0] * len(pieces)
                cuts = sorted(shuffle.randint(0, free) for _ in pieces)
                order = list(range(len(pieces)))
                shuffle.shuffle(order)
                start = 0
                for gap_end, piece in zip(cuts, order):
                    shifts[piece] = start + gap_end
                    start += widths[piece]
            row = [0] * len(tokens)
            for (first, ids), shift in zip(pieces, shifts):
                row[first:first + len(ids)] = [i + shift if i else 0 for i in ids]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long, device=x.device)

    def _packed(self, x: Tensor, y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Rows holding the problems rows[i] (B, pack) one after another, padded to block_size."""
        B, width = rows.size(0), x.size(1)
        lengths = (x[rows] != PAD).sum(dim=2)  # (B, pack)
        start = lengths.cumsum(dim=1) - lengths
        col = torch.arange(width)
        dest = torch.where(col < lengths[..., None], start[..., None] + col, self.block_size)  # spare column
        packed = []
        for source, fill in ((x, PAD), (y, IGNORE)):
            out = torch.full((B, self.block_size + 1), fill, dtype=source.dtype)
            out.scatter_(1, dest.view(B, -1), source[rows].view(B, -1))
            packed.append(out[:, :-1])
        return packed[0], packed[1]


def row_positions(tokens: list[int], scheme: str, reverse: bool, aligned: bool = False
                  ) -> list[tuple[int, list[int]]]:
    """Split a row into its problems 'a+b=c;' (padding ends it) -> [(first column, ids without offset)]."""
    pieces, first = [], 0
    while first < len(tokens) and tokens[first] != PAD:
        end = tokens.index(END, first) + 1 if END in tokens[first:] else len(tokens)
        while end < len(tokens) and tokens[end - 1] != END and tokens[end] != PAD:
            end += 1
        pieces.append((first, problem_positions(tokens[first:end], scheme, reverse, aligned)))
        first = end
    return pieces


def problem_positions(tokens: list[int], scheme: str, reverse: bool, aligned: bool = False) -> list[int]:
    """Position ids without offset of one problem 'a+b=c;' (the answer may be partial) whose operands
    have one width n and whose answer is n + 1 wide, or n with `aligned` (see the module docstring):
    scheme "coupled" or "abacus", reversed or plain."""
    if tokens.count(PLUS) != 1 or tokens.count(EQUALS) != 1 or tokens.index(PLUS) > tokens.index(EQUALS):
        raise ValueError(f"task-given positions need problems 'a+b=c;', got {decode(tokens)!r}")
    plus, equals = tokens.index(PLUS), tokens.index(EQUALS)
    n = plus
    top = n - 1 if aligned else n  # significance of the answer's top digit
    if equals - plus - 1 != n:
        raise ValueError(f"task-given positions need operands of one width, got {decode(tokens)!r}")
    ids = []
    for col, token in enumerate(tokens):
        if token >= 10 and token != EQUALS:  # '+', ';', '_'
            ids.append(0)
            continue
        if col < plus:  # significance of the digit, or for the answer of the digit the token holds
            sig = col if reverse else n - 1 - col
        elif col < equals:
            sig = col - plus - 1 if reverse else n - 1 - (col - plus - 1)
        else:  # '=' is the answer digit "-1" (reversed) or "top + 1" (plain), before the first
            sig = col - equals - 1 if reverse else top - (col - equals - 1)
        if scheme == "abacus" or (col < equals and scheme == "coupled"):
            ids.append(sig + 2)
        elif scheme == "coupled":  # the token predicting answer digit j carries j's id
            ids.append((sig + 1 if reverse else sig - 1) + 2)
        else:
            raise ValueError(f"scheme must be 'coupled' or 'abacus', got {scheme!r}")
    return ids


def carry_chain(a: int, b: int) -> int:
    """The longest carry chain of a+b: the most place values one carry reaches, i.e. the place
    above where it is made (digits summing to 10 or more) plus each place above that whose digits
    sum to exactly 9, through which it travels on; 0 without a carry. 999+1 -> 3 (made in the ones,
    reaching the tens, hundreds and thousands), 95+5 -> 2, 5+5 -> 1, 555+555 -> 1 (every carry
    made afresh, none travels), 123+456 -> 0, 0+0 -> 0; the operands may differ in length (9999+1
    -> 4). In plain digit order this is how far an answer digit must look down the operands to know
    its carry: the place below, and one more for each place summing to 9. (The longest run of places
    that receive a carry, 3 for 555+555, would count carries that a single place below settles.)"""
    if a < 0 or b < 0:
        raise ValueError(f"carry_chain needs operands >= 0, got {a} and {b}")
    longest = run = carry = 0  # run: the places the carry now travelling has reached
    while a or b or carry:
        if carry:
            run += 1
            longest = max(longest, run)
        place_sum = a % 10 + b % 10
        if place_sum >= 10:  # a carry made here, whatever came in: a new chain starts
            run, carry = 0, 1
        elif place_sum + carry < 10:  # no carry out: the chain ends here
            run, carry = 0, 0
        a, b = a // 10, b // 10
    return longest


def _draw(rng: random.Random, n_digits: int) -> int:
    return rng.randint(0 if n_digits == 1 else 10 ** (n_digits - 1), 10 ** n_digits - 1)


def _draw_carry_chain(rng: random.Random, lo: int, hi: int) -> Problem:
    """A problem with operands of lo-hi digits (each length drawn on its own) and a planted carry
    chain of `chain` places, drawn uniformly from 2 to the longer operand's width (1 when that is
    1): the digits of one place sum to 10 or more, those of the chain - 1 places above it to
    exactly 9 (above the shorter operand, the longer's digit is 9), so `carry_chain` is at least
    `chain`; every other digit is drawn as usual. The carry is made where both operands have a
    digit, at a random place low enough for the chain to fit; the place the chain reaches may be
    the answer's extra top digit (9999+1)."""
    while True:
        lengths = (rng.randint(lo, hi), rng.randint(lo, hi))
        width, shorter = max(lengths), min(lengths)
        chain = rng.randint(min(2, width), width)
        start = rng.randint(0, min(shorter - 1, width - chain))
        digits = [[(_draw(rng, n) // 10 ** place) % 10 for place in range(width)] for n in lengths]
        digits[0][start] = rng.randint(1, 9)
        digits[1][start] = rng.randint(10 - digits[0][start], 9)
        for place in range(start + 1, start + chain):
            if place < shorter:
                digits[0][place] = rng.randint(0, 9)
                digits[1][place] = 9 - digits[0][place]
            else:
                digits[lengths.index(width)][place] = 9
        a, b = (sum(d * 10 ** place for place, d in enumerate(ds)) for ds in digits)
        if (len(str(a)), len(str(b))) == lengths:  # no operand lost its top digit to a planted 0
            return a, b


def _key(problem: Problem) -> Problem:
    return (min(problem), max(problem))
