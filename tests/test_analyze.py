"""The analysis CLI on a tiny saved model, and the probes and fixed points it reports."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from looplm import LoopConfig, LoopGPT
from looplm.analyze import PLOTS, SUMMARY, main
from looplm.checkpoint import load_checkpoint, save_checkpoint
from looplm.data.shakespeare import CharTokenizer, corpus_text
from looplm.probes import fixed_points, loop_states, probe_accuracy, readout_accuracy, spearman
from looplm.testing import assert_close

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = LoopConfig(vocab_size=65, block_size=64, n_embd=32, n_head=4, n_loops=3, max_loops=6,
                        step_encoding="learned", halt="entropy", halt_threshold=0.2)
    model = LoopGPT(config)
    with torch.no_grad():  # sharper than at initialisation, where every loop reads out nearly uniform
        for p in model.parameters():
            p.mul_(10)
    return save_checkpoint(model, tmp_path / "ckpt")


def test_analysis_writes_tables_plots_and_summary(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(checkpoint), "--text", TEXT, "--out", str(out), "--loops", "5", "--tol", "0.3"])
    printed = capsys.readouterr().out
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
    summary = json.loads((out / SUMMARY).read_text())
    chars = summary["characters"]
    assert "".join(c["char"] for c in chars) == TEXT[:-1]
    assert [c["next_char"] for c in chars] == list(TEXT[1:])
    assert all(1 <= c["steps"] <= 6 for c in chars) and len({c["steps"] for c in chars}) >= 2
    assert summary["n_loops"] == 5 and [r["loop"] for r in summary["per_loop"]] == [1, 2, 3, 4, 5]
    assert len(summary["entropy"]) == len(summary["state_change"]) == 5
    assert all(len(row) == len(chars) for row in summary["entropy"])
    assert all(0 <= r["probe_accuracy"] <= 1 and 0 <= r["readout_accuracy"] <= 1 for r in summary["per_loop"])
    converged = [c["converged_at"] for c in chars if c["converged_at"] is not None]
    assert all(2 <= t <= 5 for t in converged)
    assert summary["fixed_points"]["converged_fraction"] == pytest.approx(len(converged) / len(chars))
    assert "steps" in printed and "probe acc" in printed and "Fixed points" in printed
    assert f"{summary['per_loop'][0]['entropy']:.4f}" in printed

    # The same numbers from the model's own forward: halting as configured, and t = 1..5 loops without.
    model = load_checkpoint(checkpoint).eval()
    idx = torch.tensor([CharTokenizer.from_text(corpus_text()).encode(TEXT)])
    inputs, targets = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        _, _, trace = model(inputs, return_trace=True)
        logits = [model(inputs, targets, halting=False, n_loops=t)[0][0] for t in range(1, 6)]
    assert [c["steps"] for c in chars] == trace.steps[0].tolist()
    assert max(c["steps"] for c in chars) > model.config.n_loops  # the budget is max_loops, not n_loops
    entropy = [torch.distributions.Categorical(logits=t.double()).entropy().float() for t in logits]
    for t, row in enumerate(summary["per_loop"]):
        assert_close(torch.tensor(summary["entropy"][t]), entropy[t], composed=True, msg=f"loop {t + 1}")
        assert row["entropy"] == pytest.approx(entropy[t].mean().item(), rel=1e-4)
        assert row["readout_accuracy"] == pytest.approx((logits[t].argmax(-1) == targets[0]).float().mean().item())
    loss = F.cross_entropy(logits[-1], targets[0], reduction="none")
    assert_close(torch.tensor([c["loss"] for c in chars]), loss, composed=True)
    assert_close(torch.tensor([c["final_entropy"] for c in chars]), entropy[-1], composed=True)
    # The state starts at zero, so loop 1 moves every state by exactly its own size; a fixed point is the
    # first loop whose change is below --tol.
    change = torch.tensor(summary["state_change"])
    assert change.shape == (5, len(chars)) and torch.allclose(change[0], torch.ones(len(chars)))
    assert [r["delta"] for r in summary["per_loop"]] == pytest.approx(change.mean(1).tolist(), rel=1e-5)
    below = [[t + 1 for t in range(1, 5) if change[t, p] < 0.3] for p in range(len(chars))]
    assert [c["converged_at"] for c in chars] == [b[0] if b else None for b in below]


def test_analysis_refuses_a_vocabulary_that_does_not_fit(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="the vocabulary has 3 characters but the model expects 65"):
        main([str(checkpoint), "--text", "abc", "--vocab", "abc", "--out", str(tmp_path)])


def test_fixed_points_find_where_states_stop_moving():
    torch.manual_seed(0)
    moving = [torch.randn(1, 3, 8) for _ in range(6)]
    states = [s.clone() for s in moving]
    for t in range(2, 6):  # token 0 stops after loop 2, token 1 after loop 4, token 2 never
        states[t][0, 0] = states[1][0, 0]
    for t in range(4, 6):
        states[t][0, 1] = states[3][0, 1]
    points = fixed_points(states, hardness=torch.tensor([[0.1, 0.5, 2.0]]), tolerance=1e-6)
    assert points.converged_at.tolist() == [[3, 5, 7]]
    assert points.converged_fraction == pytest.approx(2 / 3)
    assert points.rank_correlation == pytest.approx(1.0)  # the harder, the later


def test_probe_reads_a_loop_that_encodes_the_target_and_not_one_that_does_not():
    """States wider than the fitted positions: a probe scored where it was fit reads even noise perfectly."""
    torch.manual_seed(0)
    targets = torch.randint(0, 5, (1, 60))
    informative = F.pad(F.one_hot(targets, 5).float() * 3, (0, 59)) + 0.1 * torch.randn(1, 60, 64)
    noise = torch.randn(1, 60, 64)
    chance, readable = probe_accuracy([noise, informative], targets, vocab_size=5)
    assert readable == 1.0 and chance < 0.5


def test_readout_accuracy_reads_each_loop_through_the_models_head(checkpoint):
    model = load_checkpoint(checkpoint).eval()
    idx = torch.randint(0, 65, (2, 40))
    states, _ = loop_states(model, idx, 3)
    with torch.no_grad():
        targets = model.head(states[1]).argmax(-1)  # what loop 2 predicts
        accuracy = readout_accuracy(model, states, targets)
    assert accuracy[1] == 1.0 and accuracy[0] < 0.9 and accuracy[2] < 0.9


def test_spearman():
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([5.0, 5, 5])) == 0.0
