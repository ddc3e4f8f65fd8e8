"""The adaptive experiment: its goal table on hand-made sweeps, and the whole experiment on tiny runs."""
import json

import pytest
import torch
import torch.nn.functional as F

from looplm import experiments
from looplm.experiments import FIXED, goal_table
from tests.test_train_experiments import TINY


def sweep_row(criterion, threshold, val_loss, loops, full_loss=2.0, full_loops=8.0):
    return dict(criterion=criterion, threshold=threshold, val_loss=val_loss,
                loss_vs_fixed_pct=100 * (val_loss / full_loss - 1), loops_per_token=loops,
                loop_reduction=full_loops / loops, forward_ms=10.0 * loops, speedup=full_loops / loops)


SWEEP = [sweep_row(FIXED, None, 2.0, 8), sweep_row(FIXED, None, 2.01, 4), sweep_row(FIXED, None, 2.1, 2),
         sweep_row("kl", 0.1, 2.03, 2.0), sweep_row("kl", 0.01, 2.015, 4.5),
         sweep_row("entropy", 1.0, 2.019, 4.2), sweep_row("entropy", 0.5, 2.005, 6.0),
         sweep_row("delta", 0.3, 2.5, 3.0)]


def test_goal_table_takes_each_criterions_fewest_loops_within_the_loss_bound():
    goal = {r["criterion"]: r for r in goal_table(SWEEP)}
    assert list(goal) == [FIXED, "kl", "entropy", "delta"]  # in order of appearance
    assert (goal[FIXED]["loops_per_token"], goal[FIXED]["goal_met"]) == (4, True)  # exactly 2x counts
    assert (goal["kl"]["threshold"], goal["kl"]["goal_met"]) == (0.01, False)  # 2.03 is over 1% above 2.0
    assert (goal["entropy"]["threshold"], goal["entropy"]["loop_reduction"]) == (1.0, 8 / 4.2)
    assert not goal["entropy"]["goal_met"]
    assert goal["delta"] == dict(criterion="delta", threshold=None, loops_per_token=None, loop_reduction=None,
                                 loss_vs_fixed_pct=None, speedup=None, goal_met=False)


@pytest.mark.parametrize("max_loss_increase, target, kl_threshold, kl_met", [
    (0.05, 2.0, 0.1, True), (0.05, 4.5, 0.1, False), (0.0, 2.0, None, False)])
def test_goal_table_follows_its_bound_and_target(max_loss_increase, target, kl_threshold, kl_met):
    kl = next(r for r in goal_table(SWEEP, max_loss_increase, target) if r["criterion"] == "kl")
    assert (kl["threshold"], kl["goal_met"]) == (kl_threshold, kl_met)


@pytest.mark.parametrize("sweep", [[], SWEEP[3:], [sweep_row(FIXED, None, 2.0, 4, full_loops=8)]])
def test_goal_table_needs_the_full_fixed_depth_first(sweep):
    with pytest.raises(ValueError, match="starts with its full fixed-depth row"):
        goal_table(sweep)


def halving_entropy_threshold(entropy: torch.Tensor) -> float:
    """A threshold between two neighbouring token entropies near the median, at the widest gap there,
    so that about half the tokens fall below it and rounding cannot move one across."""
    ordered = entropy.flatten().sort().values
    middle = torch.arange(2 * len(ordered) // 5, 3 * len(ordered) // 5)
    widest = middle[(ordered[middle + 1] - ordered[middle]).argmax()]
    return ((ordered[widest] + ordered[widest + 1]) / 2).item()


def test_adaptive_experiment_on_tiny_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in dict(EVAL_BATCHES=1, TIMING_REPEATS=1, PROMPT_TOKENS=4, NEW_TOKENS=3,
                            GENERATION_BATCHES=(1, 2)).items():
        monkeypatch.setattr(experiments, name, value)
    # Trained hard enough that the second loop changes the loss, so that rows which halt differently differ.
    loop = dict(TINY, n_loops=2, threads=1, max_iters=10, lr_decay_iters=10, eval_interval=10, learning_rate=1e-1)
    monkeypatch.setitem(experiments.EXPERIMENTS, "adaptive", [
        experiments.Run("loop", "shakespeare_cpu_loop1x4.py", dict(loop, loss_weights="ramp")),
        experiments.Run("gate", "shakespeare_cpu_loop1x4.py",
                        dict(loop, max_iters=2, lr_decay_iters=2, eval_interval=2, halt="gate", halt_threshold=0.5,
                             gate_only=True, init_from=experiments.run_dir("adaptive", "loop") + "/last"))])

    # The sweep's val batch, drawn as the sweep draws it, and what 1 and 2 loops give on it without halting.
    # Its entropy threshold halts about half the tokens after loop 1 and the rest at the budget of 2;
    # delta < 2 holds for every token after loop 1 (the state starts at zero): it halts all at once;
    # entropy < 0.01 holds for none.
    seen = {}
    real_sweep = experiments.adaptive_sweep

    def sweep(model, task, seed=0):
        x, y = task.get_batch("val", 12, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = [model(x, y, halt=False, n_loops=n)[0] for n in (1, 2)]
        losses = [F.cross_entropy(t.transpose(1, 2), y, reduction="none") for t in logits]
        entropy_1 = torch.distributions.Categorical(logits=logits[0].double()).entropy()
        threshold = halving_entropy_threshold(entropy_1)
        halted = entropy_1 < threshold
        with torch.no_grad():  # the model's own halting forward at that threshold (its semantics: tests/test_model.py)
            halting_loss = experiments.with_halting(model, "entropy", threshold)(x, y)[1].item()
        seen.update(threshold=threshold, halted=halted, batch=(x, y), drawn=[], loss=halting_loss,
                    mixed=torch.where(halted, losses[0], losses[1]).mean().item())
        monkeypatch.setattr(experiments, "ADAPTIVE_SWEEP", {"entropy": (0.01, threshold), "delta": (2.0,),
                                                            "gate": (0.5,)})
        real_get_batch = task.get_batch

        def recorded_get_batch(*args, **kwargs):
            seen["drawn"].append(real_get_batch(*args, **kwargs))
            return seen["drawn"][-1]

        task.get_batch = recorded_get_batch
        try:
            return real_sweep(model, task, seed)
        finally:
            del task.get_batch

    monkeypatch.setattr(experiments, "adaptive_sweep", sweep)
    summary = experiments.main(["adaptive", "--out", "results"])["adaptive"]

    assert seen["drawn"] and all(torch.equal(x, seen["batch"][0]) for x, _ in seen["drawn"]), "the sweep's batch moved"
    assert 0.35 < seen["halted"].float().mean() < 0.65
    sweep = summary["adaptive_sweep"]
    assert [(r["criterion"], r["threshold"]) for r in sweep] == [
        (FIXED, None), (FIXED, None), ("entropy", 0.01), ("entropy", seen["threshold"]), ("delta", 2.0), ("gate", 0.5)]
    full, fixed_1, never, half, delta = sweep[:5]
    assert [r["loops_per_token"] for r in sweep[:2]] == [2, 1]
    assert abs(fixed_1["val_loss"] - full["val_loss"]) > 2e-3, "the second loop must change the loss"
    assert delta["loops_per_token"] == 1 and delta["val_loss"] == pytest.approx(fixed_1["val_loss"], abs=1e-4)
    assert never["loops_per_token"] == 2 and never["val_loss"] == pytest.approx(full["val_loss"], abs=1e-4)
    # Halted tokens keep their loop-1 state and offer their loop-1 keys and values to the others' loop 2,
    # so the loss is the model's halting forward, near (not equal to) the per-token mix of 1 and 2 loops.
    assert half["loops_per_token"] == pytest.approx(2 - seen["halted"].float().mean().item(), abs=1e-3)
    assert half["val_loss"] == pytest.approx(seen["loss"], abs=1e-4)
    assert half["val_loss"] == pytest.approx(seen["mixed"], abs=0.05)
    assert half["loop_reduction"] == pytest.approx(2 / half["loops_per_token"], abs=0.01)
    assert all(r["forward_ms"] > 0 for r in sweep)
    assert summary["adaptive_goal"] == goal_table(sweep)

    generation = summary["generation"]
    picked = [(r["criterion"], r["threshold"]) for r in summary["adaptive_goal"]
              if r["criterion"] != FIXED and r["threshold"] is not None]
    assert [(r["batch"], r["criterion"]) for r in generation] == [
        (batch, criterion) for batch in (1, 2) for criterion in [FIXED] + [c for c, _ in picked]]
    assert all(r["tokens_per_s"] > 0 and 1 <= r["loops_per_token"] <= 2 for r in generation)
    assert [r["loops_per_token"] for r in generation if r["criterion"] == FIXED] == [2, 2]

    trace = json.loads((tmp_path / "results" / "adaptive" / "trace.json").read_text())
    assert "adaptive_sweep" in trace["gate"] and "adaptive_sweep" not in trace["loop"]
    text = (tmp_path / "results" / "summary.md").read_text()
    assert "## adaptive" in text and "goal_met" in text and "tokens_per_s" in text
