"""Launch-time lookup: precedence, refusal of bad tables, never another GPU's table in silence, CPU."""
import contextlib
import logging

import pytest
import torch

import tuning
from tuning import lookup, table
from tuning.lookup import ConfigLookup, Device
from tuning.spec import TORCH_IMPL

RTX5070 = Device("NVIDIA GeForce RTX 5070", (12, 0))
RTX5090 = Device("NVIDIA GeForce RTX 5090", (12, 0))  # same capability, another GPU
H100 = Device("NVIDIA H100 80GB HBM3", (9, 0))
DEFAULT = {"BLOCK_M": 4, "num_warps": 4}
RUN = {"date": "2025-01-01", "driver": None, "versions": {}, "forced": False}


def entry(bucket, block_m, kernel="layer_norm", dtype="bfloat16"):
    return {"backend": "triton", "kernel": kernel, "dtype": dtype, "bucket": list(bucket), "shape": list(bucket),
            "best": {"config": {"BLOCK_M": block_m, "num_warps": 4}, "median_ms": 1.0}, "default_ms": 2.0,
            "runners_up": [], "failed": [], "pruned": []}


def write(path, device, entries):
    table.record(path, path.stem, device.name, device.capability, RUN, entries)
    return path


@pytest.fixture(autouse=True)
def _fresh_lookup():
    lookup.reset()
    yield
    lookup.reset()


def find(lk, shape, dtype="bfloat16", default=DEFAULT):
    return lk.find("triton", "layer_norm", dtype, shape, default)


def test_precedence_exact_then_nearest_then_same_capability_then_default(tmp_path, caplog):
    own = write(tmp_path / "rtx5070.json", RTX5070, [entry((4096, 512), 8), entry((64, 512), 1)])
    kin = write(tmp_path / "rtx5090.json", RTX5090, [entry((4096, 512), 16), entry((16, 16), 2, dtype="float32")])
    other = write(tmp_path / "h100.json", H100, [entry((4096, 512), 32, dtype="float16")])
    lk = ConfigLookup(RTX5070, [own, kin, other])
    caplog.set_level(logging.INFO, logger="tuning")

    assert find(lk, (4000, 384))["BLOCK_M"] == 8  # exact bucket 4096x512
    assert find(lk, (100, 512))["BLOCK_M"] == 1  # nearest: 128x512 is one doubling from 64x512
    assert "nearest bucket 64x512" in caplog.text
    assert find(lk, (16, 16), dtype="float32")["BLOCK_M"] == 2  # only a same-capability table has it
    assert "another GPU of the same compute capability" in caplog.text
    assert find(lk, (4096, 512), dtype="float16") is None  # only the H100 has it: never applied
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([m for m in warnings if "RTX 5090" in m]) == 1, warnings


def test_a_table_of_another_capability_never_applies(tmp_path, caplog):
    h100 = write(tmp_path / "h100.json", H100, [entry((4096, 512), 32)])
    caplog.set_level(logging.WARNING, logger="tuning")
    assert find(ConfigLookup(RTX5070, [h100]), (4096, 512)) is None
    assert "no tuning table measured on NVIDIA GeForce RTX 5070" in caplog.text


def test_earlier_tables_win_and_configs_with_other_knobs_are_skipped(tmp_path, caplog):
    user = write(tmp_path / "user.json", RTX5070, [entry((4096, 512), 8)])
    shipped = write(tmp_path / "shipped.json", RTX5070, [entry((4096, 512), 2), entry((64, 512), 1)])
    lk = ConfigLookup(RTX5070, [user, shipped])
    assert find(lk, (4096, 512))["BLOCK_M"] == 8
    assert find(lk, (64, 512))["BLOCK_M"] == 1  # entries the user table lacks still come from the shipped one
    stale_default = {"BLOCK_M": 4, "BLOCK_C": 512, "num_warps": 4}
    caplog.set_level(logging.WARNING, logger="tuning")
    assert find(lk, (4096, 512), default=stale_default) is None
    assert "has knobs" in caplog.text


@pytest.mark.parametrize("text, match", [("{torn", "not valid JSON"), (
    '{"schema": 2, "device": {"name": "NVIDIA GeForce RTX 5070", "capability": [12, 0]}, "runs": [], "entries": []}',
    "newer")])
def test_corrupt_or_newer_tables_warn_and_fall_back(tmp_path, caplog, text, match):
    bad = tmp_path / "rtx5070.json"
    bad.write_text(text)
    good = write(tmp_path / "other.json", RTX5070, [entry((4096, 512), 8)])
    caplog.set_level(logging.WARNING, logger="tuning")
    lk = ConfigLookup(RTX5070, [bad, good])
    assert find(lk, (4096, 512))["BLOCK_M"] == 8
    assert match in caplog.text and "ignoring it" in caplog.text
    assert find(ConfigLookup(RTX5070, [bad]), (4096, 512)) is None


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """lookup_config as on an RTX 5070, tables from a user dir and a package dir under tmp_path."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setenv(table.USER_DIR_ENV, str(user))
    monkeypatch.setattr(table, "PACKAGE_TABLES", shipped)
    monkeypatch.setattr(lookup, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    loads = []
    monkeypatch.setattr(lookup, "_device_info", lambda index: loads.append(index) or RTX5070)
    return user, shipped, loads


def test_lookup_config_searches_the_user_dir_first_and_caches(on_gpu, caplog):
    user, shipped, loads = on_gpu
    write(user / "mine.json", RTX5070, [entry((4096, 512), 8)])
    write(shipped / "rtx5070.json", RTX5070, [entry((4096, 512), 2), entry((64, 512), 1)])
    caplog.set_level(logging.INFO, logger="tuning")
    assert tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (4096, 384), DEFAULT)["BLOCK_M"] == 8
    assert tuning.lookup_config("triton", "layer_norm", "bfloat16", (100, 384), DEFAULT)["BLOCK_M"] == 1
    assert tuning.lookup_config("triton", "linear", torch.bfloat16, (64, 384, 384), DEFAULT) is DEFAULT
    (user / "mine.json").unlink()  # answers and tables are cached: no re-read per launch
    for _ in range(3):
        assert tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (4096, 384), DEFAULT)["BLOCK_M"] == 8
        tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (100, 384), DEFAULT)
    assert loads == [0]
    assert caplog.text.count("nearest bucket") == 1  # each fallback logged once


def test_lookup_config_survives_a_broken_table_dir(on_gpu, monkeypatch, caplog):
    def broken():
        raise PermissionError("tables unreadable")
    monkeypatch.setattr(table, "table_paths", broken)
    caplog.set_level(logging.WARNING, logger="tuning")
    assert tuning.lookup_config("triton", "layer_norm", torch.float32, (8, 8), DEFAULT) is DEFAULT
    assert "tables unreadable" in caplog.text


def test_on_cpu_the_default_comes_back_without_reading_tables(monkeypatch):
    monkeypatch.setattr(lookup, "_cuda_available", lambda: False)
    monkeypatch.setattr(table, "table_paths", lambda: pytest.fail("tables read on a CPU machine"))
    assert tuning.lookup_config("tile", "linear", torch.float32, (4, 4, 4), DEFAULT) is DEFAULT


def test_a_bug_in_the_lookup_is_raised_not_swallowed(on_gpu, monkeypatch):
    """Only an unreadable table or device falls back to the defaults; a bug in the lookup surfaces."""
    def buggy(self, *args):
        raise AttributeError("'dict' object has no attribute 'bucket'")
    monkeypatch.setattr(ConfigLookup, "find", buggy)
    with pytest.raises(AttributeError, match="no attribute 'bucket'"):
        tuning.lookup_config("triton", "layer_norm", torch.float32, (8, 8), DEFAULT)


SHIPPED_H200 = table.PACKAGE_TABLES / "h200.json"


def test_the_shipped_h200_table_records_where_it_came_from():
    shipped = table.load(SHIPPED_H200)
    assert shipped["device"] == {"name": "NVIDIA H200", "capability": [9, 0]}
    provenance = shipped["provenance"]
    for field in ("source", "date", "gpu", "toolchain", "partial", "command"):
        assert provenance.get(field), field
    assert provenance["toolchain"]["triton"] == shipped["runs"][0]["versions"]["triton"]
    assert {e["backend"] for e in shipped["entries"]} == {"triton"} and len(shipped["entries"]) == 6


def test_an_h100_without_a_table_uses_the_h200_table_with_one_warning(caplog):
    """Same architecture (sm_90): the H200's measured configs apply to an H100, said once; the
    launches it has no entry for take the nearest bucket, still without another warning."""
    caplog.set_level(logging.INFO, logger="tuning")
    shipped = table.load(SHIPPED_H200)
    lk = ConfigLookup(H100, [SHIPPED_H200])
    for e in shipped["entries"]:
        config = lk.find(e["backend"], e["kernel"], e["dtype"], tuple(e["shape"]), e["best"]["config"])
        assert config == e["best"]["config"], e["shape"]
    first = shipped["entries"][0]
    nearby = tuple(2 * d for d in first["shape"])
    assert lk.find("triton", first["kernel"], first["dtype"], nearby, first["best"]["config"]) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "NVIDIA H200" in warnings[0] and "9.0" in warnings[0], warnings


@pytest.mark.parametrize("device", [Device("NVIDIA A100-SXM4-80GB", (8, 0)), Device("NVIDIA B200", (10, 0)),
                                    RTX5070], ids=["sm_80", "sm_100", "sm_120"])
def test_the_h200_table_never_applies_to_another_architecture(device, caplog):
    caplog.set_level(logging.WARNING, logger="tuning")
    lk = ConfigLookup(device, [SHIPPED_H200])
    for e in table.load(SHIPPED_H200)["entries"]:
        assert lk.find(e["backend"], e["kernel"], e["dtype"], tuple(e["shape"]), e["best"]["config"]) is None
    assert "NVIDIA H200" not in caplog.text


def torch_won(bucket, kernel="layer_norm"):
    """An entry where the PyTorch op beat every kernel configuration (the tuner's TORCH_IMPL)."""
    return {**entry(bucket, 0, kernel), "best": {"config": dict(TORCH_IMPL), "median_ms": 0.5},
            "runners_up": [{"config": {"BLOCK_M": 16, "num_warps": 8}, "median_ms": 0.7}]}


def test_where_pytorch_won_the_kernel_config_is_still_its_fastest_and_runs_torch_says_so(on_gpu):
    user, _, _ = on_gpu
    write(user / "rtx5070.json", RTX5070, [torch_won((4096, 512)), entry((64, 512), 1)])
    assert lookup.runs_torch("triton", "layer_norm", torch.bfloat16, (4096, 384))
    assert not lookup.runs_torch("triton", "layer_norm", torch.bfloat16, (64, 384))
    assert not lookup.runs_torch("triton", "layer_norm", torch.float32, (4096, 384))  # no fp32 entry
    # a launch that runs the kernel anyway (inside a fused block) takes the fastest kernel config measured
    assert tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (4096, 384), DEFAULT) == \
        {"BLOCK_M": 16, "num_warps": 8}


def kernel_won(bucket):
    """A halt_update entry where a kernel configuration won."""
    return {**entry(bucket, 1, kernel="halt_update"),
            "best": {"config": {"BLOCK_N": 4, "BLOCK_C": 8, "num_warps": 1}, "median_ms": 0.1}}


def halt_update_args(n, c, device):
    """halt_update's arguments for n tokens of width c on `device`: fake tensors (shapes, dtypes and a
    device, no data) for a CUDA device this machine need not have."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() if device != "cpu" else contextlib.nullcontext():
        state = torch.zeros(n, c, dtype=torch.bfloat16, device=device)  # bf16 state, fp32 scores
        return (state, state, torch.ones(n, dtype=torch.bool, device=device),
                torch.zeros(n, dtype=torch.int32, device=device), torch.zeros(n, device=device),
                torch.ones(n, device=device), 1, 1, 2)


@pytest.fixture
def routed_halt_update(on_gpu, monkeypatch):
    """The Triton backend's halt_update op, its kernel and the PyTorch op replaced by recorders:
    (op, calls), calls holding ("kernel" | "torch", device, shape) per call."""
    from looplm import backends
    from looplm.backends import kernel_ops
    from looplm.torch_ops import OPS as TORCH_OPS
    from looplm_triton import halt_update
    calls = []
    monkeypatch.setattr(backends, "_LAUNCHERS", dict(backends._LAUNCHERS))  # the custom ops' launchers, restored
    monkeypatch.setitem(TORCH_OPS, "halt_update", lambda *a, **k: calls.append(("torch", str(a[0].device),
                                                                                 tuple(a[0].shape))))
    monkeypatch.setattr(halt_update, "halt_update", lambda *a, **k: calls.append(("kernel", str(a[0].device),
                                                                                   tuple(a[0].shape))))
    return kernel_ops("looplm_triton")["halt_update"], calls


def test_a_kernel_op_calls_the_torch_op_where_the_table_says_pytorch_wins(on_gpu, routed_halt_update):
    """The backend runs the winner: the op sends the buckets PyTorch won to the "torch" backend's op."""
    user, _, _ = on_gpu
    op, calls = routed_halt_update
    write(user / "rtx5070.json", RTX5070, [torch_won((64, 128), kernel="halt_update"), kernel_won((4, 8))])
    op(*halt_update_args(50, 100, "cuda:0"))  # bucket 64x128: PyTorch won
    op(*halt_update_args(3, 8, "cuda:0"))  # a bucket a kernel config won
    op(*halt_update_args(50, 100, "cpu"))  # CPU tensors: the interpreter's kernel, whatever a GPU's table says
    assert calls == [("torch", "cuda:0", (50, 100)), ("kernel", "cuda:0", (3, 8)), ("kernel", "cpu", (50, 100))]


def test_each_call_is_routed_by_the_table_of_the_gpu_its_tensors_live_on(on_gpu, routed_halt_update, monkeypatch):
    """With two GPUs, a call on cuda:1 follows cuda:1's table whatever the current device is; the
    routing never asks for the current device."""
    user, _, _ = on_gpu
    op, calls = routed_halt_update
    monkeypatch.setattr(lookup, "_device_info", {0: RTX5070, 1: H100}.__getitem__)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("the routing asked for the current device"))
    write(user / "rtx5070.json", RTX5070, [torch_won((64, 128), kernel="halt_update"), kernel_won((4, 8))])
    write(user / "h100.json", H100, [kernel_won((64, 128)), torch_won((4, 8), kernel="halt_update")])
    for device in ("cuda:0", "cuda:1"):
        op(*halt_update_args(50, 100, device))
        op(*halt_update_args(3, 8, device))
    assert calls == [("torch", "cuda:0", (50, 100)), ("kernel", "cuda:0", (3, 8)),
                     ("kernel", "cuda:1", (50, 100)), ("torch", "cuda:1", (3, 8))]


def test_without_cuda_a_kernel_op_is_not_wrapped(monkeypatch):
    from looplm_triton import halt_update
    monkeypatch.setattr(lookup, "_cuda_available", lambda: False)
    op = halt_update.halt_update
    assert lookup.prefer_torch_where_tuned("halt_update", op, halt_update.TUNING) is op


def test_no_table_applies_while_launches_are_recorded_for_an_ahead_of_time_compile(on_gpu):
    """A compile for a named architecture takes that architecture's defaults, not this GPU's table."""
    from looplm.kernels import captured_launches
    user, _, _ = on_gpu
    write(user / "rtx5070.json", RTX5070, [entry((4096, 512), 8)])
    with captured_launches("sm_120"):
        assert tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (4096, 384), DEFAULT) is DEFAULT
    assert tuning.lookup_config("triton", "layer_norm", torch.bfloat16, (4096, 384), DEFAULT)["BLOCK_M"] == 8
