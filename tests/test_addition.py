"""Addition: formats, answer-only targets, seeds, held-out test sets, random offsets, evaluation."""
import pytest
import torch

from looplm import LoopConfig, LoopGPT
from looplm.data.addition import END, IGNORE, PAD, AdditionTask, carry_chain, decode, sequence_length
from looplm.eval_addition import Answer, DigitResult, answer_problems, depth_correlation, evaluate, format_table, \
    parse_digits, summarize_by_carry


STEPS = 600


def small(**overrides) -> AdditionTask:
    return AdditionTask(**{**dict(n_train=2000, n_test=30, test_digits=(1, 2, 3, 4, 6), block_size=32), **overrides})


def test_formats_reversed_and_plain():
    assert small().format(120, 7) == ("021+7=", "721;")
    assert small(reverse=False).format(120, 7) == ("120+7=", "127;")
    assert small().parse_answer("721;__") == 127 and small(reverse=False).parse_answer("127;") == 127
    assert small().parse_answer("72") is None and small().parse_answer("7a;") is None


def test_rows_put_the_loss_on_the_answer_only():
    task = small()
    problems = task.train_problems[:200]
    x, y = task.encode_rows(problems)
    for (a, b), row, target in zip(problems, x.tolist(), y.tolist()):
        prompt, answer = task.format(a, b)
        assert decode(row).rstrip("_") == prompt + answer
        answer_targets = [t for t in target if t != IGNORE]
        assert decode(answer_targets) == answer and answer_targets[-1] == END
        first = target.index(answer_targets[0])
        assert decode(row[first:first + 1]) == "="  # the '=' predicts the first answer digit


def test_operands_have_the_training_digit_counts_and_both_orders():
    task = small(train_digits=(2, 3))
    lengths = {len(str(n)) for p in task.train_problems for n in p}
    assert lengths == {2, 3}
    pairs = set(task.train_problems)
    assert all((b, a) in pairs for a, b in task.train_problems)
    assert len(small(swap_augment=False).train_problems) == 2000


def test_deterministic_by_seed():
    assert small().train_problems == small().train_problems
    assert small().test_sets == small().test_sets
    assert small(seed=1).train_problems != small().train_problems


def test_test_sets_have_exact_digit_counts_and_never_meet_training():
    task = small()
    task.check_disjoint()
    for n, problems in task.test_sets.items():
        assert all(len(str(a)) == n and len(str(b)) == n for a, b in problems)
    assert len(task.test_sets[1]) < 30  # capped: one-digit problems are few
    # a test set does not depend on which other digit counts are asked for
    assert small(test_digits=(3,)).test_sets[3] == task.test_sets[3]
    assert small(test_digits=(1, 2, 3, 4, 6, 7)).train_problems == task.train_problems


def test_disjointness_check_catches_a_leak():
    task = small()
    leaked = task.test_sets[3][0]
    task.train_problems.append(leaked[::-1])  # the swapped order counts as the same problem
    with pytest.raises(AssertionError, match="3-digit test problems are in the training set"):
        task.check_disjoint()


def test_random_offset_moves_whole_problems():
    task = small()
    x, y = task.get_batch("train", 64, torch.Generator().manual_seed(0))
    starts = (x != PAD).int().argmax(dim=1)
    assert len(set(starts.tolist())) > 5
    for row, target in zip(x.tolist(), y.tolist()):
        text = decode(row).strip("_")
        a, rest = text.split("+")
        b, answer = rest.split("=")
        assert task.parse_answer(answer) == int(a[::-1]) + int(b[::-1])
        assert decode([t for t in target if t != IGNORE]) == answer
    x, _ = small(random_offset=False).get_batch("train", 16, torch.Generator().manual_seed(0))
    assert (x[:, 0] != PAD).all()


def test_zero_pad_puts_each_place_value_at_a_fixed_position():
    task = small(zero_pad=True)
    assert task.format(12, 7) == ("2100+7000=", "91000;") and task.parse_answer("91000;") == 19
    assert small(zero_pad=True, reverse=False).format(12, 7) == ("0012+0007=", "00019;")
    assert task.format(123456, 7) == ("654321+700000=", "3643210;")  # wider than training: its own width
    x, _ = task.encode_rows(task.train_problems[:100])
    plus, equals = (decode(row).index("+") for row in x.tolist()), (decode(row).index("=") for row in x.tolist())
    assert set(plus) == {4} and set(equals) == {9}


def test_batches_are_cut_to_their_longest_row():
    task = small(random_offset=False)
    x, y = task.get_batch("train", 16, torch.Generator().manual_seed(0))
    lengths = (x != PAD).sum(dim=1)
    assert x.size(1) == int(lengths.max()) < task.block_size
    full_x, full_y = task.encode_rows(task.train_problems)
    rows = {tuple(r): t for r, t in zip(full_x[:, :x.size(1)].tolist(), full_y[:, :x.size(1)].tolist())}
    assert all(rows[tuple(r)] == t for r, t in zip(x.tolist(), y.tolist()))  # a prefix of the full rows


def test_a_tiny_model_learns_zero_padded_addition():
    """The task must be learnable in seconds: a plain 2-layer model trained on 1-2 digit sums (without
    zero_pad it gets about a quarter of them after these steps)."""
    torch.manual_seed(0)
    task = small(train_digits=(1, 2), test_digits=(1, 2), zero_pad=True, random_offset=False, block_size=16)
    model = LoopGPT(LoopConfig(vocab_size=task.vocab_size, block_size=16, n_embd=64, n_head=4, n_layer=2,
                               n_loops=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        _, loss = model(*task.get_batch("train", 64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # 1-digit problems are written 2 wide: the answer is longer than n + 2 tokens
    assert [r.accuracy >= 0.8 for r in evaluate(model.eval(), task)] == [True, True]


@pytest.mark.parametrize("overrides, message", [
    (dict(train_digits=(0, 4)), "train_digits must be digit counts >= 1"),
    (dict(train_digits=(4, 1)), "lowest <= highest"),
    (dict(train_digits=(1, 2, 3)), "lowest <= highest"),
    (dict(test_digits=(10,)), "block_size 32 is too short: 10-digit problems take 34"),
    (dict(n_train=0), "n_train must be an integer >= 1"),
])
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_sequence_length_fits_twenty_digits_in_64():
    assert sequence_length(20) == 64
    assert len("".join(AdditionTask(test_digits=(20,)).format(10 ** 20 - 1, 10 ** 20 - 1))) == 64


def test_evaluation_counts_loops_on_answer_tokens():
    task = small()
    model = LoopGPT(LoopConfig(vocab_size=task.vocab_size, block_size=32, n_embd=16, n_head=2, n_loops=3,
                               halt="entropy", halt_threshold=2.0, max_loops=5))
    results = evaluate(model, task, digits=(2, 3), limit=4)
    assert [r.digits for r in results] == [2, 3] and all(r.problems == 4 for r in results)
    for r in results:
        assert 0.0 <= r.accuracy <= 1.0 and 1 <= r.mean_steps <= r.max_steps <= 5
    fixed = evaluate(LoopGPT(LoopConfig(vocab_size=task.vocab_size, block_size=32, n_embd=16, n_head=2, n_loops=3)),
                     task, digits=(2,), max_loops=2, limit=4)[0]
    assert fixed.mean_steps == fixed.max_steps == 2  # no halting: every token runs the budget
    assert "exact match %" in format_table(results)
    with pytest.raises(ValueError, match="block_size is 32"):
        evaluate(model, small(block_size=64, test_digits=(12,)), digits=(12,))


def test_parse_digits():
    assert parse_digits("5-8") == [5, 6, 7, 8] and parse_digits("1,3-4") == [1, 3, 4]
    with pytest.raises(Exception, match="digits must look like"):
        parse_digits("five")


@pytest.mark.parametrize("a, b, chain", [
    (999, 1, 3), (1, 999, 3), (123, 456, 0), (0, 0, 0), (5, 5, 1), (95, 5, 2), (9999, 1, 4), (1, 99999, 5),
    (19, 1, 1), (45, 54, 0), (555, 445, 3), (909, 91, 3), (1909, 1, 1), (18, 82, 2), (5050, 5050, 1),
    (555, 555, 1), (99, 99, 1), (4999, 5001, 4), (9899, 1, 2), (9899, 101, 4),
])
def test_carry_chain_is_the_most_places_one_carry_reaches(a, b, chain):
    assert carry_chain(a, b) == chain == carry_chain(b, a)


def test_carry_fraction_plants_long_carry_chains_in_that_share_of_training():
    plain, planted = small(), small(carry_fraction=0.5)
    problems = planted.train_problems[:2000]  # before the swapped copies
    assert problems[:1000] == plain.train_problems[:1000]  # the others are the default stream's first draws
    assert planted.train_problems[2000:] == [(b, a) for a, b in problems]
    for a, b in problems[1000:]:
        width = max(len(str(a)), len(str(b)))
        assert 1 <= len(str(a)) <= 4 and 1 <= len(str(b)) <= 4 and carry_chain(a, b) >= min(2, width)

    def long_share(task: AdditionTask) -> float:
        return sum(carry_chain(a, b) >= 3 for a, b in task.train_problems) / len(task.train_problems)
    assert long_share(plain) < 0.02 and 0.1 < long_share(planted) < 0.5
    assert {carry_chain(a, b) for a, b in problems[1000:]} >= {2, 3, 4}  # up to the operand width
    assert small(carry_fraction=1.0, n_train=300).train_problems != \
        small(carry_fraction=1.0, n_train=300, seed=1).train_problems
    planted.check_disjoint()  # planted draws that hit a test problem are redrawn as well


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), True, "0.3", None])
def test_carry_fraction_must_be_a_share(fraction):
    with pytest.raises(ValueError, match="carry_fraction must be a number from 0 to 1"):
        small(carry_fraction=fraction)


def test_carry_chain_refuses_negative_operands():
    with pytest.raises(ValueError, match="operands >= 0"):
        carry_chain(-1, 5)


def _loops(pairs) -> list[DigitResult]:
    return [DigitResult(digits, 10, 1.0, loops, int(loops) + 1) for digits, loops in pairs]


def test_depth_correlation_is_spearman_over_digit_counts():
    assert depth_correlation(_loops([(1, 1.0), (2, 1.5), (3, 4.0), (4, 4.2)])) == pytest.approx(1.0)
    assert depth_correlation(_loops([(1, 3.0), (2, 2.5), (3, 1.2), (4, 1.0)])) == pytest.approx(-1.0)
    # ties share their mean rank: loop ranks 1.5, 1.5, 3, 4 against 1, 2, 3, 4
    assert depth_correlation(_loops([(1, 1.0), (2, 1.0), (3, 2.0), (4, 3.0)])) == pytest.approx(4.5 / (5 * 4.5) ** 0.5)
    assert depth_correlation(_loops([(1, 2.0), (3, 1.0), (2, 3.0)])) == pytest.approx(-0.5)  # order given does not matter
    assert depth_correlation(_loops([(1, 2.0), (2, 2.0), (3, 2.0)])) == 0.0  # constant: no halting
    assert depth_correlation(_loops([(5, 2.0)])) == 0.0


def test_summary_by_carry_chain():
    answers = [Answer(999, 1, "1000;", True, [1, 3, 3, 3]), Answer(123, 456, "579;", True, [1, 1, 1]),
               Answer(5, 5, "11;", False, [2, 2]), Answer(95, 5, "100;", False, [1, 2, 6])]
    rows = [(r.carry_chain, r.problems, r.accuracy, r.mean_steps, r.max_steps) for r in summarize_by_carry(answers)]
    assert rows == [(0, 1, 1.0, 1.0, 1), (1, 1, 0.0, 2.0, 2), (2, 1, 0.0, 3.0, 6), (3, 1, 1.0, 2.5, 3)]


@pytest.mark.parametrize("reverse", [True, False])
def test_answers_of_mixed_widths_in_one_batch_are_scored_against_an_oracle(monkeypatch, reverse):
    """One batch (one prompt length) holds answers of 2 and 3 digits. A model that writes each right
    answer is scored right on every one, with loops counted on each answer's own tokens; one that
    writes a wrong answer to one problem is scored wrong on that one only."""
    task = small(reverse=reverse)
    problems = [(12, 34), (99, 99), (10, 10), (55, 55), (21, 30), (5, 7), (1, 2)]
    answers = {task.format(a, b)[0]: task.format(a, b)[1] for a, b in problems}
    widths = {len(answers[task.format(a, b)[0]]) for a, b in problems if a >= 10}
    assert widths == {3, 4}, "the test needs answers of two widths behind prompts of one length"
    model = LoopGPT(LoopConfig(vocab_size=task.vocab_size, block_size=32, n_embd=16, n_head=2, n_loops=2)).eval()
    wrong = task.format(55, 55)[0]

    def oracle(prompts, max_new_tokens, **kwargs):
        """Each prompt's answer (the wrong one's with its first digit changed), as many tokens as asked."""
        rows = []
        for prompt in prompts.tolist():
            text = decode(prompt)
            answer = answers[text] if text != wrong else str((int(answers[text][0]) + 1) % 10) + answers[text][1:]
            written = (answer + ";" * max_new_tokens)[:max_new_tokens]
            rows.append(prompt + task.encode(written))
        return torch.tensor(rows)
    monkeypatch.setattr(model, "generate", oracle)
    results = answer_problems(model, task, problems)
    assert [(r.a, r.b) for r in results] == problems
    assert [r.correct for r in results] == [task.format(a, b)[0] != wrong for a, b in problems]
    for r in results:
        assert r.text == answers[task.format(r.a, r.b)[0]] or task.format(r.a, r.b)[0] == wrong
        assert len(r.steps) == task.written_length(answers[task.format(r.a, r.b)[0]]) and set(r.steps) == {2}
