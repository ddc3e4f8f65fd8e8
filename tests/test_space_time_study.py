"""The space-time study's runner on a tiny budget: its tables, its cache and its goal."""
import json

import pytest

from looplm import experiments
from looplm.experiments import Arm

TINY = dict(max_iters=2, eval_interval=2, eval_iters=1, batch_size=2, block_size=16, n_embd=16, n_head=2,
            warmup_iters=1)
SEEDS = (1, 2)


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiments, "EVAL_BATCHES", 1)
    monkeypatch.setattr(experiments, "STUDY_SEEDS", SEEDS)
    monkeypatch.setattr(experiments, "STUDY_ARMS", [
        Arm("GPT-1L", "shakespeare_cpu_gpt1l.py", "baseline", TINY, seeds=SEEDS),
        Arm("GPT-4L", "shakespeare_cpu_gpt4l.py", "baseline", dict(TINY, n_layer=2), seeds=SEEDS),
        Arm("loop", experiments.LOOP_1X4, "base", dict(TINY, n_loops=2), seeds=SEEDS),
        Arm("loop lr", experiments.LOOP_1X4, "lr", dict(TINY, n_loops=2, learning_rate=3e-3), seeds=SEEDS[:1]),
    ])
    return tmp_path


def test_study_writes_its_tables_and_runs(tiny_study):
    summary = experiments.main(["space_time_study", "--out", "results"])["space_time_study"]
    directory = tiny_study / "results" / "space_time_study"
    assert json.loads((directory / "results.json").read_text()) == summary
    assert "## space_time_study" in (directory / "results.md").read_text()
    assert "## space_time_study" in (tiny_study / "results" / "summary.md").read_text()
    assert [(r["arm"], r["seeds"]) for r in summary["runs"]] == [("GPT-1L", 2), ("GPT-4L", 2), ("loop", 2),
                                                                 ("loop lr", 1)]
    assert summary["runs"][0]["vs_gpt1l"] == 0 and summary["runs"][3]["spread"] is None
    assert [r["arm"] for r in summary["study_goal"]] == ["loop"]  # a spread needs two seeds
    assert len(list((directory / "runs").glob("*.json"))) == 7
    loop_run = json.loads((directory / "runs" / "loop_seed_1.json").read_text())
    assert loop_run["settings"]["inject"] == "add" and loop_run["settings"]["n_loops"] == 2
    assert loop_run["row"]["iters"] == 2 and len(loop_run["per_loop"]) == 2


def test_study_reuses_finished_runs_and_reruns_changed_ones(tiny_study, monkeypatch):
    experiments.main(["space_time_study", "--out", "results"])
    trained = []
    real_train = experiments.train
    monkeypatch.setattr(experiments, "train", lambda cfg, keys: trained.append(cfg.out_dir) or real_train(cfg, keys))
    experiments.main(["space_time_study", "--out", "results"])
    assert trained == []
    experiments.STUDY_ARMS[3].overrides["learning_rate"] = 2e-3
    experiments.main(["space_time_study", "--out", "results"])
    assert trained == [experiments.run_dir("space_time_study", "loop lr seed 1")]


def _row(arm, seed, best, params=100):
    return dict(arm=arm, seed=seed, params=params, depth=1, val_loss=best, best_val_loss=best, wall_s=1.0)


@pytest.mark.parametrize("loop_losses, loop_params, met", [
    ((1.80, 1.81, 1.82), 100, True),
    ((1.875, 1.885, 1.865), 100, False),  # below GPT-1L, but by less than the seed spread
    ((1.80, 1.81, 1.82), 300, False),  # more than half of GPT-4L's parameters
    ((1.84, 1.85, 1.83), 100, False),  # beats GPT-1L, not GPT-4L
])
def test_study_goal(monkeypatch, loop_losses, loop_params, met):
    seeds = (1, 2, 3)
    monkeypatch.setattr(experiments, "STUDY_SEEDS", seeds)
    arms = [Arm(name, f"{name}.py", "", seeds=seeds) for name in ("GPT-1L", "GPT-4L", "loop")]
    rows = {}
    for seed, gpt1l, gpt4l, loop in zip(seeds, (1.89, 1.88, 1.90), (1.83, 1.82, 1.84), loop_losses):
        rows.update({("GPT-1L", seed): _row("GPT-1L", seed, gpt1l), ("GPT-4L", seed): _row("GPT-4L", seed, gpt4l, 400),
                     ("loop", seed): _row("loop", seed, loop, loop_params)})
    goal = experiments.study_tables(arms, rows)["study_goal"]
    assert [(r["arm"], r["goal_met"]) for r in goal] == [("loop", met)]


def test_study_goal_holds_a_loop_against_gpt1l_at_its_learning_rate(monkeypatch):
    seeds = (1, 2)
    monkeypatch.setattr(experiments, "STUDY_SEEDS", seeds)
    arms = [Arm("GPT-1L", "gpt1l.py", "", seeds=seeds), Arm("GPT-4L", "gpt4l.py", "", seeds=seeds),
            Arm("GPT-1L fast", "gpt1l.py", "", dict(learning_rate=4e-3), seeds=seeds),
            Arm("loop fast", "loop.py", "", dict(learning_rate=4e-3), seeds=seeds),
            Arm("loop", "loop.py", "", seeds=seeds)]
    losses = {"GPT-1L": 1.89, "GPT-4L": 1.87, "GPT-1L fast": 1.76, "loop fast": 1.78, "loop": 1.91}
    rows = {(name, seed): _row(name, seed, loss + 0.001 * seed, 400 if name == "GPT-4L" else 100)
            for name, loss in losses.items() for seed in seeds}
    goal = {r["arm"]: r for r in experiments.study_tables(arms, rows)["study_goal"]}
    assert sorted(goal) == ["loop", "loop fast"]  # the GPTs are references, not candidates
    assert goal["loop fast"]["goal_met"] and goal["loop fast"]["below_gpt1l_same_lr"] == -0.02
    assert goal["loop fast"]["beats_gpt1l_same_lr"] is False
    assert goal["loop"]["beats_gpt1l_same_lr"] is None and not goal["loop"]["goal_met"]
