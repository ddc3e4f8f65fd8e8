"""The experiments runner, the addition evaluation CLI and the command entry points, on tiny runs."""
import csv
import json
import subprocess
import sys

import pytest

from looplm import eval_addition, experiments
from looplm.train import main as train_main

TINY = dict(max_iters=2, eval_interval=2, eval_iters=1, batch_size=2, block_size=16, n_embd=16, n_head=2,
            warmup_iters=1)


def test_experiment_writes_metrics_trace_and_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiments, "EVAL_BATCHES", 1)
    # entropy is never below 0: no token halts; the loop-1 change from a zero state is 1 < 2: all halt
    monkeypatch.setattr(experiments, "HALTING_SWEEP", {"entropy": (0.0,), "delta": (2.0,)})
    monkeypatch.setitem(experiments.EXPERIMENTS, "halting", [
        experiments.Run("loop", "shakespeare_cpu_loop1x4.py", dict(TINY, n_loops=2, loss_weights="ramp")),
        experiments.Run("gpt", "shakespeare_cpu_gpt1l.py", TINY)])
    summary = experiments.main(["halting", "--out", "results"])
    with open(tmp_path / "results" / "halting" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["loop", "gpt"] and [r["loops"] for r in rows] == ["2", "1"]
    trace = json.loads((tmp_path / "results" / "halting" / "trace.json").read_text())
    assert [len(trace[run]["per_loop"]) for run in ("loop", "gpt")] == [2, 1]
    sweep = summary["halting"]["halting"]
    assert [(r["criterion"], r["threshold"]) for r in sweep] == [("entropy", 0.0), ("delta", 2.0)]
    assert [r["mean_steps"] for r in sweep] == [2, 1]
    assert json.loads((tmp_path / "results" / "summary.json").read_text()) == summary
    assert "## halting" in (tmp_path / "results" / "summary.md").read_text()


def test_unknown_experiment_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        experiments.main(["warp_drive"])
    assert exited.value.code == 2 and "invalid choice: 'warp_drive'" in capsys.readouterr().err


def test_eval_addition_cli_on_a_trained_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train_main(["--task=addition", f"--out_dir={run}", "--train_digits=(1,2)", "--test_digits=(1,2)",
                "--n_train=200", "--n_test=8", "--batch_size=4", "--max_iters=2", "--eval_interval=2",
                "--eval_iters=1", "--progress=False", "--report=False", "--device=cpu", "--block_size=32",
                "--n_embd=16", "--n_head=2", "--n_loops=2", "--halt=entropy", "--halt_threshold=1.0"])
    report = eval_addition.main([str(run / "best"), "--digits", "1-3", "--max-loops", "4"])
    out = capsys.readouterr().out
    results = report.by_digits
    assert [r.digits for r in results] == [1, 2, 3] and all(r.max_steps <= 4 for r in results)
    assert "exact match %" in out and "loop budget 4" in out and "over 3 digit counts" in out
    assert sum(r.problems for r in report.by_carry) == sum(r.problems for r in results)
    with pytest.raises(ValueError, match="block_size 32 is too short: 12-digit problems take 40 tokens"):
        eval_addition.main([str(run / "best"), "--digits", "12"])
    train_main(["--task=shakespeare", f"--out_dir={tmp_path / 's'}", f"--data_dir={tmp_path / 'data'}",
                "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--batch_size=2", "--progress=False",
                "--report=False", "--device=cpu", "--block_size=16", "--n_embd=16", "--n_head=2"])
    with pytest.raises(ValueError, match="not trained on addition"):
        eval_addition.task_from_checkpoint(tmp_path / "s" / "best")


@pytest.mark.parametrize("module", ["looplm.train", "looplm.eval_addition", "looplm.experiments"])
def test_modules_run_as_commands(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "python -m " + module in done.stdout
