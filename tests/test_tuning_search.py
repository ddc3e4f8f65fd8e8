"""The search on fake kernels: pruning, measuring, selecting; the timer is the only thing faked.

A fake kernel's config says what its launch does: `cost` is the time the fake timer reports, and
`mode` makes it raise, return a wrong answer, hang, or kill its process.
"""
import dataclasses
import os
import sys
import time
import types

import pytest
import torch

from tuning import search
from tuning.gpus import ARCHS
from tuning.search import InProcessRunner, IsolatedRunner, Job, Kernel, Task
from tuning.spec import KernelTuning

_last_cost: list[float] = []


def fake_timer(fn) -> float:
    """Launches once and reports the cost the launch declared."""
    fn()
    return _last_cost.pop()


def _make_args(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device),)


def _run(x, *, config):
    mode = config.get("mode", "ok")
    if mode == "raise":
        raise RuntimeError("out of resources: shared memory\nsecond line")
    if mode == "bug":
        raise AttributeError("'NoneType' object has no attribute 'shape'")
    if mode == "hang":
        time.sleep(600)
    if mode == "crash":
        os._exit(3)
    _last_cost.append(config["cost"])
    return x * 2 + (1.0 if mode == "wrong" else 0.0)


def _compile(shape, dtype, config, arch):
    if config.get("mode") == "nocompile":
        raise ValueError("tile shape must be a power of two")
    return {"shared_mem": config.get("smem", 1024), "registers": config.get("regs", 32)}


def _expected(x):
    """What the reference computes for the fake kernel: x * 2."""
    return x * 2


def fake(space, default=None, kernel="fake_double", expected=_expected) -> KernelTuning:
    return KernelTuning(backend="triton", kernel=kernel, default=default or space[0], space=space,
                        make_args=_make_args, run=_run, compile=_compile,
                        shape_key=lambda x, weight, bias=None, eps=1e-5: (x.numel() // x.shape[-1], x.shape[-1]),
                        expected=expected)


FAKE = fake([{"cost": 3.0}, {"cost": 1.0}, {"cost": 2.0}])


def task_of(tuning, shape=(8, 16), dtype="float32", module=__name__) -> Task:
    kernel = Kernel("layer_norm", module, tuning, attr="FAKE")
    return Task(kernel, dtype, shape, search.candidates_of(tuning))


def run_one(tuning, monkeypatch, shape=(8, 16)):
    monkeypatch.setattr(sys.modules[__name__], "FAKE", tuning)  # where jobs load the tuning from
    (entry,) = search.run_tasks([task_of(tuning, shape)], InProcessRunner(fake_timer), device="cpu")
    return entry


def test_the_fastest_candidate_wins_and_the_rest_are_ranked(monkeypatch):
    entry = run_one(FAKE, monkeypatch)
    assert entry["best"] == {"config": {"cost": 1.0}, "median_ms": 1.0}
    assert [r["median_ms"] for r in entry["runners_up"]] == [2.0, 3.0]
    assert entry["default_ms"] == 3.0
    assert entry["bucket"] == [8, 16] and entry["failed"] == []


def test_failures_and_wrong_outputs_are_recorded_never_fatal(monkeypatch):
    tuning = fake([{"cost": 2.0, "mode": "ok"}, {"cost": 0.5, "mode": "wrong"}, {"cost": 0.1, "mode": "raise"},
                   {"cost": 1.0, "mode": "ok"}])
    entry = run_one(tuning, monkeypatch)
    assert entry["best"]["config"] == {"cost": 1.0, "mode": "ok"}  # the faster ones were wrong or failed
    reasons = {c["mode"]: r for c, r in ((f["config"], f["reason"]) for f in entry["failed"])}
    assert reasons["wrong"].startswith("wrong output: output 0 differs from the reference backend's")
    assert reasons["raise"] == "RuntimeError: out of resources: shared memory"


def test_when_the_default_fails_the_others_are_still_checked(monkeypatch):
    """The yardstick is the reference backend's output, not the default's: a wrong candidate is never
    crowned, even when the default config itself cannot run."""
    tuning = fake([{"cost": 0.1, "mode": "wrong"}, {"cost": 1.0, "mode": "ok"}], default={"cost": 0.5, "mode": "raise"})
    entry = run_one(tuning, monkeypatch)
    assert entry["best"]["config"] == {"cost": 1.0, "mode": "ok"}
    assert {f["config"]["mode"] for f in entry["failed"]} == {"wrong", "raise"}


def test_a_kernel_without_a_reference_check_is_never_timed(monkeypatch):
    entry = run_one(fake([{"cost": 1.0}], expected=None), monkeypatch)
    assert entry["best"] is None and "cannot be checked" in entry["failed"][0]["reason"]


def test_a_bug_in_a_candidate_is_raised_not_recorded(monkeypatch):
    with pytest.raises(AttributeError, match="no attribute 'shape'"):
        run_one(fake([{"cost": 1.0, "mode": "bug"}]), monkeypatch)


def test_a_compile_bug_is_raised_while_toolchain_failures_prune():
    def broken(shape, dtype, config, arch):
        raise KeyError("BLOCK_M")
    kernel = Kernel("layer_norm", __name__, dataclasses.replace(FAKE, compile=broken))
    with pytest.raises(KeyError):
        search.prune(kernel, "float32", (8, 16), [{"cost": 1.0}], ARCHS["sm_90"])


def test_a_module_that_fails_to_import_for_a_reason_other_than_a_package_is_raised(monkeypatch):
    _fake_package(monkeypatch)

    def broken_import(name, *args, **kwargs):
        raise ZeroDivisionError("a bug at import time")
    monkeypatch.setattr(search.importlib, "import_module", broken_import)
    with pytest.raises(ZeroDivisionError):
        search.discover(["triton"])


def test_ties_go_to_the_earlier_candidate_and_the_default_is_always_timed(monkeypatch):
    tuning = fake([{"cost": 1.0, "tag": "a"}, {"cost": 1.0, "tag": "b"}], default={"cost": 5.0, "tag": "d"})
    entry = run_one(tuning, monkeypatch)
    assert entry["best"]["config"]["tag"] == "a"
    assert entry["default_ms"] == 5.0


def test_no_working_candidate_gives_an_entry_without_best(monkeypatch):
    entry = run_one(fake([{"cost": 1.0, "mode": "raise"}]), monkeypatch)
    assert entry["best"] is None and len(entry["failed"]) == 1


def test_prune_drops_what_does_not_fit_or_compile_with_the_reason():
    space = [{"cost": 1.0}, {"cost": 1.0, "smem": 200 * 1024}, {"cost": 1.0, "regs": 300},
             {"cost": 1.0, "regs": 255, "num_warps": 16}, {"cost": 1.0, "mode": "nocompile"}]
    kernel = Kernel("layer_norm", __name__, fake(space))
    kept, pruned = search.prune(kernel, "float32", (8, 16), space, ARCHS["sm_120"])
    assert kept == space[:1]
    reasons = [p["reason"] for p in pruned]
    assert "204800 bytes of shared memory per block; sm_120 allows 101376" in reasons[0]
    assert "300 registers per thread" in reasons[1]
    assert "255 registers x 512 threads" in reasons[2]
    assert reasons[3] == "does not compile for sm_120: ValueError: tile shape must be a power of two"
    kept, _ = search.prune(kernel, "float32", (8, 16), space[:2], ARCHS["sm_90"])
    assert len(kept) == 2  # 200 KiB fits a Hopper block


def test_plan_takes_one_shape_per_bucket_from_the_models():
    from tuning.buckets import MODEL_SHAPES
    kernel = Kernel("layer_norm", __name__, FAKE)
    models = [MODEL_SHAPES["shakespeare-char"], MODEL_SHAPES["shakespeare-gpt2"], MODEL_SHAPES["cpu"]]
    tasks, notes = search.plan([kernel], ["float32", "bfloat16"], ARCHS["sm_90"], models)
    assert [(t.dtype, t.shape) for t in tasks] == [("float32", (4096, 384)), ("float32", (768, 128)),
                                                   ("bfloat16", (4096, 384)), ("bfloat16", (768, 128))]
    assert notes == []


def _fake_package(monkeypatch, **modules):
    package = types.ModuleType("fakebackend")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "fakebackend", package)
    for op, attrs in modules.items():
        module = types.ModuleType(f"fakebackend.{op}")
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, f"fakebackend.{op}", module)
    monkeypatch.setitem(search.KERNEL_PACKAGES, "triton", "fakebackend")


def test_discover_skips_missing_modules_and_tunings_with_a_note(monkeypatch):
    _fake_package(monkeypatch, layer_norm={"TUNING": FAKE}, linear={},
                  attention={"TUNING": dataclasses.replace(FAKE, backend="tile")})
    kernels, notes = search.discover(["triton"])
    assert [k.name for k in kernels] == ["fake_double"]
    assert any("fakebackend.linear: skipped" in n and "TUNING" in n for n in notes)
    assert any("fakebackend.attention: skipped, its TUNING says backend 'tile'" in n for n in notes)
    assert "fakebackend.softmax_entropy: skipped, not written yet" in notes
    assert search.discover(["triton"], ["fake_double"])[0] == kernels
    with pytest.raises(ValueError, match="unknown kernels"):
        search.discover(["triton"], ["no_such_kernel"])


def test_isolated_runner_abandons_hangs_and_survives_crashes():
    def job(**config):
        return Job(__name__, "FAKE", (4, 4), "float32", {"cost": 1.0, **config}, "cpu")
    with IsolatedRunner(fake_timer, time_limit_s=120.0) as runner:
        assert runner(job(cost=2.5)).median_ms == 2.5  # the first job imports torch in the worker: slow when busy
        runner.time_limit_s = 3.0
        started = time.monotonic()
        hung = runner(job(mode="hang"))
        assert "no result within the 3 s time limit" in hung.reason
        assert time.monotonic() - started < 30
        runner.time_limit_s = 120.0  # a fresh worker imports again
        crashed = runner(job(mode="crash"))
        assert crashed.reason == "the measuring process died (exit code 3)"
        assert runner(job(cost=0.25)).median_ms == 0.25  # a fresh worker took over


def test_a_measured_entry_goes_through_the_table_to_the_launch_lookup(monkeypatch, tmp_path):
    from tuning import table
    from tuning.lookup import ConfigLookup, Device
    entry = run_one(FAKE, monkeypatch, shape=(4000, 300))
    device = Device("NVIDIA GeForce RTX 5070", (12, 0))
    path = tmp_path / "rtx5070.json"
    table.record(path, "rtx5070", device.name, device.capability, {"date": "d"}, [entry])
    found = ConfigLookup(device, [path]).find("triton", "fake_double", "float32", (4096, 384), FAKE.default)
    assert found == {"cost": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a real kernel on a CUDA GPU")
def test_autotune_on_this_gpu_writes_a_table_the_lookup_uses(tmp_path):
    import subprocess
    from tuning import table
    from tuning.gpus import gpu_for_device
    known = gpu_for_device(torch.cuda.get_device_name())
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, "-m", "tuning.autotune", "--gpu", known.name if known else "h100",
                             "--force", "--backend", "triton", "--kernels", "layer_norm", "--shapes", "1000x384",
                             "--dtypes", "float32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (entry,) = table.load(out)["entries"]
    assert entry["bucket"] == [1024, 512] and entry["best"]["median_ms"] > 0
    assert entry["best"]["median_ms"] <= entry["default_ms"]


def test_the_pytorch_op_is_a_candidate_for_every_model_shape_and_wins_where_it_is_fastest(monkeypatch):
    """plan() adds TORCH_IMPL wherever the op call behind the shape is known; the tuner runs the
    "torch" backend's op on that call (checked against the reference like every candidate) and the
    table crowns it when it is the fastest."""
    from tuning.buckets import MODEL_SHAPES
    from tuning.spec import TORCH_IMPL
    monkeypatch.setattr(sys.modules[__name__], "FAKE", FAKE)
    kernel = Kernel("layer_norm", __name__, FAKE, attr="FAKE")
    (task,), _ = search.plan([kernel], ["float32"], ARCHS["sm_90"], [MODEL_SHAPES["cpu"]])
    assert task.candidates[-1] == TORCH_IMPL and task.op_call is not None
    def timer(fn):
        declared = len(_last_cost)
        fn()
        return _last_cost.pop() if len(_last_cost) > declared else 0.5  # the torch op declares no cost
    (entry,) = search.run_tasks([task], InProcessRunner(timer), device="cpu")
    assert entry["best"] == {"config": TORCH_IMPL, "median_ms": 0.5}
    assert [r["config"]["cost"] for r in entry["runners_up"]] == [1.0, 2.0, 3.0] and not entry["failed"]
    (task,), notes = search.plan([kernel], ["float32"], ARCHS["sm_90"], shapes=[(8, 16)])
    assert TORCH_IMPL not in task.candidates and any("PyTorch op is not timed" in n for n in notes)


@pytest.mark.parametrize("op", ["layer_norm", "linear", "layer_norm_linear", "attention", "softmax_entropy",
                                "halt_update", "block"])
def test_the_pytorch_candidate_runs_each_ops_model_calls_on_fresh_inputs(op):
    from tuning.buckets import MODEL_SHAPES, describe_call, op_calls
    from tuning.spec import TORCH_IMPL
    timed = []
    for args, kwargs in op_calls(MODEL_SHAPES["cpu"], torch.float32)[op][:2]:
        job = Job("unused", "TUNING", (1,), "float32", dict(TORCH_IMPL), "cpu", op, describe_call(args, kwargs))
        outcome = search.measure(job, lambda fn: timed.append(fn()) or 0.25)
        assert outcome.reason is None and outcome.median_ms == 0.25, outcome
    assert timed
