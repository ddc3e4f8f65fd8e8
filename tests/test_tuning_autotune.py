"""The tuning CLIs and their parts that need no GPU: GPU names, buckets, dry-run, refusals, show."""
import json
import subprocess
import sys

import pytest
import torch

from tests.test_tuning_search import _fake_package, fake
from looplm import cli
from tuning import autotune, buckets, gpus, show, table


@pytest.mark.parametrize("device_name, short", [
    ("NVIDIA GeForce RTX 5070", "rtx5070"), ("NVIDIA GeForce RTX 5070 Ti", "rtx5070ti"),
    ("NVIDIA GeForce RTX 5070 Laptop GPU", None), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10G", "a10g"), ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA B200", "b200"), ("Tesla T4", None)])
def test_device_names_map_to_one_short_name(device_name, short):
    found = gpus.gpu_for_device(device_name)
    assert (found.name if found else None) == short
    assert sum(g.matches(device_name) for g in gpus.GPUS.values()) == (1 if short else 0)


def test_gpu_names_and_limits():
    assert gpus.gpu("RTX5070").limits.arch == "sm_120"
    assert gpus.gpu("h100").limits.shared_mem_per_block == 227 * 1024
    with pytest.raises(gpus.UnknownGpu, match="known names: .*rtx5070"):
        gpus.gpu("rtx9999")
    assert gpus.arch_for_capability((8, 7)).arch == "sm_86"  # unlisted: the closest lower of its major
    with pytest.raises(gpus.UnknownGpu):
        gpus.arch_for_capability((7, 5))


def test_buckets():
    assert buckets.bucket((4096, 384, 65, 1, 0)) == (4096, 512, 128, 1, 0)
    assert buckets.nearest_bucket((256, 512), [(64, 512), (1024, 512), (256, 512, 1)]) == (64, 512)  # tie: smaller
    assert buckets.nearest_bucket((256,), [(64, 512)]) is None
    assert buckets.parse_shape("16x50304x384") == (16, 50304, 384)
    for bad in ("16x", "a", "-1x2"):
        with pytest.raises(ValueError, match="joined by 'x'"):
            buckets.parse_shape(bad)
    with pytest.raises(ValueError, match="integers >= 0"):
        buckets.bucket((4, -1))


def test_model_shapes_give_each_op_its_launches(tmp_path):
    char = buckets.MODEL_SHAPES["shakespeare-char"]
    linear_key = lambda x, w, b, activation, residual: (x.numel() // x.shape[-1], w.shape[0], w.shape[1])  # noqa
    assert buckets.shape_keys("linear", linear_key, char, torch.bfloat16) == [
        (4096, 1152, 384), (4096, 384, 384), (4096, 1536, 384), (4096, 384, 1536), (4096, 65, 384), (16, 65, 384)]
    calls = buckets.op_calls(char, torch.float16)
    assert set(calls) == set(buckets.SIGNATURES)
    assert calls["attention"][0][0][0].shape == (16, 6, 256, 64)
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"model": {"n_embd": 64, "n_head": 2, "block_size": 32}, "batch_size": 3}))
    assert buckets.model_shape(str(config)) == buckets.ModelShape("small", 3, 32, 64, 2, 65)
    with pytest.raises(ValueError, match="neither a shipped model shape"):
        buckets.model_shape("no-such-model")


def run_cli(capsys, *argv):
    """autotune's entry point as `python -m tuning.autotune` runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(autotune.main, list(argv), prog="autotune")
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_dry_run_prints_the_plan_with_what_was_pruned_and_why(capsys, monkeypatch):
    space = [{"cost": 1.0}, {"cost": 2.0, "smem": 150 * 1024}, {"cost": 3.0, "mode": "nocompile"}]
    _fake_package(monkeypatch, layer_norm={"TUNING": fake(space)})
    code, out, _ = run_cli(capsys, "--gpu", "rtx5070", "--dry-run", "--backend", "triton", "--config", "cpu",
                           "shakespeare-char", "--dtypes", "float32", "--jobs", "1")
    assert code == 0
    assert "plan for rtx5070 (sm_120" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("triton  ")]
    # to time: the one configuration that fits, and the PyTorch op (model shapes: its call is known)
    assert [r[:7] for r in rows[:2]] == [["triton", "fake_double", "float32", "1024x128", "768x128", "2", "2"],
                                     ["triton", "fake_double", "float32", "4096x512", "4096x384", "2", "2"]]
    assert "needs 153600 bytes of shared memory per block; sm_120 allows 101376" in out
    assert "does not compile for sm_120: ValueError: tile shape must be a power of two" in out
    assert ("1 kernels x 2 (dtype, shape bucket) pairs: 4 configurations to time (the PyTorch op among them in 2 "
            "pairs), 4 pruned") in out
    assert "fakebackend.linear: skipped, not written yet" in out
    code, out, _ = run_cli(capsys, "--gpu", "h100", "--dry-run", "--backend", "triton", "--shapes", "100x100",
                           "--jobs", "1")
    assert code == 0 and "plan for h100 (sm_90" in out and "128x128" in out


def test_without_a_gpu_it_fails_clearly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "--gpu", "rtx5070")
    assert code == 2 and "no CUDA GPU here" in err and "--dry-run" in err


def test_another_gpu_is_refused_unless_forced(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    code, _, err = run_cli(capsys, "--gpu", "rtx5070", "--backend", "triton")
    assert code == 2
    assert "'NVIDIA GeForce RTX 4090', not a rtx5070" in err and "--gpu rtx4090" in err and "--force" in err
    assert autotune.check_device(gpus.gpu("rtx5070"), force=True) == ("NVIDIA GeForce RTX 4090", (8, 9))
    assert "measuring 'NVIDIA GeForce RTX 4090', not a rtx5070" in capsys.readouterr().err
    assert autotune.check_device(gpus.gpu("rtx4090"), force=False) == ("NVIDIA GeForce RTX 4090", (8, 9))


def test_unknown_gpu_name_is_an_error(capsys):
    code, _, err = run_cli(capsys, "--gpu", "voodoo5", "--dry-run")
    assert code == 2 and "unknown GPU name 'voodoo5'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_module_entry_point_exits_non_zero_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "tuning.autotune", "--gpu", "rtx5070"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "no CUDA GPU here" in result.stderr


def test_show_lists_and_prints_tables(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(table.USER_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(table, "PACKAGE_TABLES", tmp_path / "none")
    assert show.main([]) == 0 and "no tuning tables" in capsys.readouterr().out
    entry = {"backend": "tile", "kernel": "linear", "dtype": "bfloat16", "bucket": [4096, 512, 512],
             "shape": [4096, 384, 384], "best": {"config": {"TILE_M": 128}, "median_ms": 0.02}, "default_ms": 0.05,
             "runners_up": [], "failed": [{"config": {"TILE_M": 256}, "reason": "x"}], "pruned": []}
    table.record(tmp_path / "h100.json", "h100", "NVIDIA H100 80GB HBM3", (9, 0),
                 {"date": "d", "driver": "580.1", "versions": {"torch": "2.11"}, "forced": False}, [entry])
    assert show.main([]) == 0 and "NVIDIA H100 80GB HBM3" in capsys.readouterr().out
    assert show.main(["h100"]) == 0
    out = capsys.readouterr().out
    assert "compute capability 9.0" in out and "4096x512x512" in out and "2.50x" in out and "580.1" in out
    with pytest.raises(cli.CLIError, match="no tuning table 'rtx5070'"):
        show.main(["rtx5070"])


MAINS = {"tuning.autotune": autotune.main, "tuning.show": show.main}


def _cli(capsys, module: str, *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `python -m MODULE ARGV...`, run in this process through run_cli."""
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(MAINS[module], list(argv), prog=module)
    return exit_.value.code, capsys.readouterr().err


def assert_one_clear_line(result: tuple[int, str], *words: str) -> None:
    code, err = result
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    for word in words:
        assert word in error_lines[0], err


def test_autotune_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    corrupt = tmp_path / "model.json"
    corrupt.write_text("{not json")
    run = lambda *argv: _cli(capsys, "tuning.autotune", "--gpu", "h100", "--dry-run", *argv)  # noqa: E731
    assert_one_clear_line(run("--config", str(tmp_path / "no.json")), "neither a shipped model shape")  # missing
    assert_one_clear_line(run("--config", str(corrupt)), "cannot read model config")  # corrupt
    assert_one_clear_line(run("--jobs", "many"), "--jobs", "invalid int")  # wrong-typed
    assert_one_clear_line(run("--jobs", "0"), "--jobs must be >= 1")  # out of range
    assert_one_clear_line(run("--time-limit", "-1"), "--time-limit must be > 0")


def test_show_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    corrupt = tmp_path / "h100.json"
    corrupt.write_text('{"schema": 1, "entries": [')
    run = lambda *argv: _cli(capsys, "tuning.show", *argv)  # noqa: E731
    assert_one_clear_line(run(str(tmp_path / "missing.json")), "no tuning table")  # a missing file
    assert_one_clear_line(run(str(corrupt)), "not valid JSON")  # a corrupt table
    assert_one_clear_line(run("--limit", "3"), "unrecognized arguments")  # an option it does not take
    assert_one_clear_line(run("h100", "h200"), "unrecognized arguments")  # one name at most
