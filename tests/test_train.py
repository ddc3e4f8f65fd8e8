"""The trainer: configuration, schedule, the looped objective, checkpoints and exact resume."""
import csv
import json
import math
import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from looplm import ConfigError, LoopConfig, LoopGPT
from looplm.checkpoint import CheckpointError, load_checkpoint
from looplm.experiments import CONFIGS
from looplm.train import (LoopObjective, TrainConfig, curriculum_loops, exit_distribution, learning_rate,
                          loop_weights, main, parse_args, split_config, train)

TINY_MODEL = dict(block_size=16, n_embd=16, n_head=2, n_layer=1, n_loops=3)


def tiny_run(tmp_path, **overrides):
    """Training settings for a run of a few iterations on tiny addition problems."""
    values = dict(out_dir=str(tmp_path / "run"), task="addition", train_digits=(1, 2), test_digits=(1, 2, 3),
                  n_train=300, n_test=20, batch_size=4, max_iters=4, eval_interval=2, eval_iters=2, log_interval=1,
                  warmup_iters=1, progress=False, report=False, device="cpu", **TINY_MODEL)
    values.update(overrides)
    return split_config(values)


# ---- configuration


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("import math\nbatch_size = 7\nn_loops = 5\nlearning_rate = 2e-3\n_private = 1\n")
    cfg, model = parse_args([str(path), "--batch_size=9", "--task=addition", "--max_seconds=None",
                             "--loop_curriculum=[1,2]", "--learning_rate=1"])
    assert cfg.batch_size == 9 and cfg.task == "addition" and cfg.max_seconds is None
    assert cfg.loop_curriculum == (1, 2) and cfg.learning_rate == 1.0 and model == {"n_loops": 5}


def test_a_config_file_changes_its_base(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "loop.py").write_text("batch_size = 7\nn_loops = 4\nlearning_rate = 2e-3\n")
    (tmp_path / "runs" / "gpt.py").write_text("base = '../loop.py'\nn_loops = 1\n")
    (tmp_path / "runs" / "gpt_small.py").write_text("base = 'gpt.py'\nbatch_size = 3\n")
    monkeypatch.chdir(tmp_path / "runs")  # a base is found from its file's folder, not from here
    cfg, model = parse_args([str(tmp_path / "runs" / "gpt_small.py"), "--learning_rate=1e-3"])
    assert (cfg.batch_size, cfg.learning_rate, model) == (3, 1e-3, {"n_loops": 1})


@pytest.mark.parametrize("text, message", [
    ("base = 'cfg.py'\n", "config files may not be each other's base"),
    ("base = 'missing.py'\n", "base config file 'missing.py' does not exist"),
    ("base = 3\n", "base must be the path of a config file"),
])
def test_a_bad_base_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "cfg.py").write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args([str(tmp_path / "cfg.py")])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_reads_and_checks(path):
    cfg, model = parse_args([str(path)])
    LoopConfig(vocab_size=65, **model)  # the model keys make a model config
    assert cfg.out_dir == f"out/{path.stem}"


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=3"], "unknown config key 'batch_sise'; did you mean batch_size"),
    (["--batch_size=3.5"], "batch_size must be int, got 3.5"),
    (["--compile=1"], "compile must be bool, got 1"),
    (["--task=poetry"], "task must be one of"),
    (["--loss_weights=first"], "loss_weights must be one of"),
    (["--min_lr=1", "--learning_rate=0.1"], "min_lr"),
    (["--loop_curriculum=(2,0)"], "loop_curriculum must hold loop counts >= 1"),
    (["--batch_size"], "expected --key=value"),
    (["no_such_file.py"], "does not exist"),
])
def test_bad_settings_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)




def test_model_keys_are_checked_by_loop_config(tmp_path):
    cfg, model = tiny_run(tmp_path, n_loops=0)
    with pytest.raises(ConfigError, match="n_loops must be an integer >= 1"):
        train(cfg, model)


# ---- schedule and objective


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    warm = [learning_rate(cfg, it, it / 100) for it in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert learning_rate(cfg, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(0.1)


def test_curriculum_stages_cover_training_in_equal_parts():
    cfg = TrainConfig(loop_curriculum=(2, 4, 8, 12))
    assert [curriculum_loops(cfg, 12, p) for p in (0.0, 0.24, 0.25, 0.6, 0.99, 1.0)] == [2, 2, 4, 8, 12, 12]
    assert curriculum_loops(TrainConfig(), 12, 0.3) == 12


def test_loop_weights():
    assert loop_weights("last", 3) == [0.0, 0.0, 1.0]
    assert loop_weights("all", 4) == [0.25] * 4
    assert loop_weights("ramp", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_exit_distribution_is_a_distribution_over_loops():
    halt = torch.rand(5, 7)
    exit_probs = exit_distribution(halt)
    assert torch.allclose(exit_probs.sum(0), torch.ones(7))
    assert torch.allclose(exit_probs[1], halt[1] * (1 - halt[0]))
    assert torch.allclose(exit_probs[-1], torch.prod(1 - halt[:-1], dim=0))


def model_and_batch(**overrides):
    model = LoopGPT(LoopConfig(vocab_size=11, **{**TINY_MODEL, **overrides}))
    x = torch.randint(0, 11, (3, 16))
    y = torch.randint(0, 11, (3, 16))
    y[:, :4] = -1
    return model, x, y


def test_every_loop_is_supervised_as_the_model_reads_it_out():
    """loss_weights='all' is the mean of the losses the model gives when stopped after each loop."""
    model, x, y = model_and_batch()
    loss, last = LoopObjective(model, TrainConfig(loss_weights="all"))(x, y, 3)
    per_loop = [model(x, y, n_loops=t, halt=False)[1] for t in (1, 2, 3)]
    assert loss.item() == pytest.approx(sum(l.item() for l in per_loop) / 3, rel=1e-5)
    assert last.item() == pytest.approx(per_loop[-1].item(), rel=1e-5)


def test_only_the_weighted_loops_get_a_head_pass(monkeypatch):
    model, x, y = model_and_batch()
    calls = []
    head = model.head
    monkeypatch.setattr(model, "head", lambda h: calls.append(h) or head(h))
    for kind, passes in (("last", 1), ("ramp", 3), ("all", 3)):
        calls.clear()
        LoopObjective(model, TrainConfig(loss_weights=kind))(x, y, 3)
        assert len(calls) == passes, kind


def test_gate_objective_is_the_expected_loss_over_the_tokens_with_targets():
    """Masking by ignore_index and sums gives what selecting the tokens with a target gives."""
    model, x, y = model_and_batch(halt="gate", halt_threshold=0.5)
    torch.nn.init.normal_(model.halt_gate.weight, std=0.5)
    cfg = TrainConfig(loss_weights="ramp", gate_loss_weight=0.7, gate_entropy_weight=0.1)
    loss, last = LoopObjective(model, cfg)(x, y, 3)
    states = []
    model.loop(model.embed(x), x, 3, halting=False, states=states)
    valid = y.reshape(-1) != -1
    per_loop = [torch.nn.functional.cross_entropy(model.head(h).reshape(-1, 11), y.reshape(-1), ignore_index=-1,
                                                  reduction="none")[valid] for h in states]
    halt = torch.stack([torch.sigmoid(model.halt_gate(h).squeeze(-1)).reshape(-1)[valid] for h in states])
    exit_probs = exit_distribution(halt)
    expected = (exit_probs * torch.stack(per_loop)).sum(0).mean()
    entropy = -(exit_probs * exit_probs.log()).sum(0).mean()
    want = sum(w * l.mean() for w, l in zip(loop_weights("ramp", 3), per_loop)) + 0.7 * (expected - 0.1 * entropy)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert last.item() == pytest.approx(per_loop[-1].mean().item(), rel=1e-5)


def core_grad(model, x, y, **objective_args):
    model.zero_grad()
    LoopObjective(model, TrainConfig())(x, y, 3, **objective_args)[0].backward()
    return model.transformer.core[0].mlp.c_fc.weight.grad.clone()


def test_truncated_backprop_cuts_the_early_loops():
    """grad_loops=k keeps exactly the last k of 3 loops: each k gives its own gradient, k=3 the full one."""
    model, x, y = model_and_batch()
    full = core_grad(model, x, y)
    grads = [core_grad(model, x, y, grad_loops=k) for k in (1, 2, 3)]
    assert torch.allclose(grads[2], full)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.allclose(grads[a], grads[b]), f"grad_loops={a + 1} and {b + 1} give the same gradient"


# ---- training runs


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_training_writes_checkpoints_and_logs(tmp_path):
    cfg, model_keys = tiny_run(tmp_path)
    result = train(cfg, model_keys)
    run = tmp_path / "run"
    assert result.iter_num == 4 and math.isfinite(result.best_val_loss)
    assert [int(r["iter"]) for r in read_metrics(run)] == [0, 2, 4]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    best = load_checkpoint(run / "best")
    assert best.config.n_loops == 3 and best.config.vocab_size == 14
    assert (run / "last" / "train_state.pt").is_file() and not (run / "best" / "train_state.pt").exists()
    assert not list(run.glob(".*"))  # no temporary files left behind


def test_resume_is_exact(tmp_path):
    """3 iterations, then 3 more from the checkpoint, equal 6 in one go (dropout draws included)."""
    run = dict(eval_interval=3, lr_decay_iters=6, dropout=0.1)
    straight, model_keys = tiny_run(tmp_path / "a", max_iters=6, **run)
    result = train(straight, model_keys)
    first, _ = tiny_run(tmp_path / "b", max_iters=3, **run)
    train(first, model_keys)
    resumed, _ = tiny_run(tmp_path / "b", max_iters=6, init_from="resume", **run)
    result_resumed = train(resumed, model_keys)
    for (name, a), (_, b) in zip(result.model.state_dict().items(), result_resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    def losses(run_dir):
        return [(r["iter"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_metrics(run_dir)]
    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    cfg, model_keys = tiny_run(tmp_path, init_from="resume")
    with pytest.raises(CheckpointError, match="train_state.pt is missing"):
        train(cfg, model_keys)


def test_curriculum_and_random_depth_set_the_loops_per_batch(tmp_path):
    cfg, model_keys = tiny_run(tmp_path, max_iters=6, loop_curriculum=(1, 2, 3), grad_loops=1)
    train(cfg, model_keys)
    loops = [json.loads(line)["n_loops"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert loops == [1, 1, 2, 2, 3, 3]
    cfg, model_keys = tiny_run(tmp_path, max_iters=8, random_depth=True, overwrite=True)
    train(cfg, model_keys)
    loops = {json.loads(line)["n_loops"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()}
    assert len(loops) > 1 and loops <= {1, 2, 3}


def test_time_budget_stops_training(tmp_path):
    cfg, model_keys = tiny_run(tmp_path, max_iters=10_000, max_seconds=0.5)
    result = train(cfg, model_keys)
    assert 0 < result.iter_num < 10_000
    assert int(read_metrics(tmp_path / "run")[-1]["iter"]) == result.iter_num  # a last evaluation at the stop


def test_gate_training_then_gate_only_stage(tmp_path):
    cfg, model_keys = tiny_run(tmp_path, halt="gate", halt_threshold=0.5)
    first = train(cfg, model_keys).model
    assert first.halt_gate.weight.abs().sum() > 0  # the gate starts at zero and has learned
    stage2, _ = tiny_run(tmp_path / "stage2", init_from=str(tmp_path / "run" / "last"), gate_only=True,
                         halt="gate", halt_threshold=0.5, learning_rate=0.01, min_lr=0.001)
    second = train(stage2, model_keys).model
    for (name, before), after in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(before, after) == (not name.startswith("halt_gate.")), name


def test_fine_tuning_may_add_a_gate_but_not_change_the_architecture(tmp_path):
    cfg, model_keys = tiny_run(tmp_path)
    train(cfg, model_keys)
    stage2, _ = tiny_run(tmp_path / "s", init_from=str(tmp_path / "run" / "last"), gate_only=True, halt="gate",
                         halt_threshold=0.5, max_iters=1)
    assert train(stage2, {**model_keys, "halt": "gate", "halt_threshold": 0.5}).model.config.halt == "gate"
    wider, _ = tiny_run(tmp_path / "w", init_from=str(tmp_path / "run" / "last"))
    with pytest.raises(ConfigError, match="another architecture"):
        train(wider, {**model_keys, "n_embd": 32})


def test_main_trains_and_reports_on_shakespeare(tmp_path, capsys):
    result = main(["--task=shakespeare", f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'data'}",
                   "--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--batch_size=2", "--progress=False",
                   "--sample_tokens=20", "--block_size=16", "--n_embd=16", "--n_head=2", "--n_loops=2",
                   "--halt=entropy", "--halt_threshold=3.0", "--device=cpu"])
    out = capsys.readouterr().out
    assert "== loss curve" in out and "mean state delta" in out and "loops per token" in out
    assert "== sample (20 characters" in out and result.model.config.vocab_size == 65
    assert (tmp_path / "run" / "report.txt").read_text().strip() in out


def _cpp_compiler():
    return next((shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c and shutil.which(c)),
                None)


@pytest.mark.skipif(_cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler for inductor's "
                                                    "C++ backend; none found (CXX, g++, c++, clang++)")
def test_a_compiled_run_trains_and_evaluates_as_the_eager_one(tmp_path):
    """compile=True: the training step and the evaluations run through torch.compile (inductor's C++
    backend on a CPU), with the eager run's numbers."""
    run = dict(task="shakespeare", data_dir=str(tmp_path / "data"), max_iters=2, eval_interval=2, eval_iters=1,
               batch_size=2)
    eager_cfg, model_keys = tiny_run(tmp_path / "eager", **run)
    compiled_cfg, _ = tiny_run(tmp_path / "compiled", compile=True, **run)
    eager = train(eager_cfg, model_keys)
    counters.clear()
    compiled = train(compiled_cfg, model_keys)
    assert counters["stats"]["unique_graphs"] >= 2  # the training step's graph and the evaluation's
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(eager.history, compiled.history):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert compiled.history[-1]["iter"] == 2


def test_tokens_per_second_counts_the_tokens_run(tmp_path):
    """Addition batches are cut to their longest row: the log counts those tokens, not batch x block_size."""
    cfg, model_keys = tiny_run(tmp_path, random_offset=False, block_size=32)
    train(cfg, model_keys)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in records if r["kind"] == "train"]
    assert len(tokens) == 4 and all(t % 4 == 0 and 0 < t < 4 * 32 for t in tokens), tokens


def test_the_summary_rate_is_the_runs_average(tmp_path):
    cfg, model_keys = tiny_run(tmp_path, random_offset=False, block_size=32, log_interval=3)
    result = train(cfg, model_keys)  # 4 iterations: one logged window of 3, one unlogged iteration
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = sum(r["tokens"] for r in records if r["kind"] == "train")
    run_tokens = result.tokens_per_s * result.elapsed_s
    assert logged < run_tokens <= logged + 4 * 32 + 1e-6, "the unlogged last iteration counts too"


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys):
    cfg, model_keys = tiny_run(tmp_path, progress=True, log_interval=2)
    train(cfg, model_keys)  # pytest captures stderr: not a terminal
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("iter") and "tokens/s" in line]
    assert [line.split(":")[0] for line in lines] == ["iter 2", "iter 4"]
    assert "it/s" not in captured.err and "\r" not in captured.err  # no tqdm bar
