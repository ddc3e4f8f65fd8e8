"""Tier 0 on what runs: each kernel's default configuration, at every launch the shipped GPU model
makes, compiled for sm_80, sm_90, sm_100 and sm_120 as a real launch specialises it, must fit the
architecture without spilling (tuning.resources); and the rules that decide it."""
import json

import pytest
import torch

from tuning import gpus, table
from tuning.gpus import ARCHS, COMPILE_TARGETS, arch_for_capability, occupancy, resource_problem
from tuning.resources import LAUNCHES, markdown, measure

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")


def _backend_or_skip(backend: str) -> None:
    pytest.importorskip("triton" if backend == "triton" else "cuda.tile")


@pytest.mark.parametrize("arch", COMPILE_TARGETS)
@pytest.mark.parametrize("backend", sorted(LAUNCHES))
def test_hierarchical_parity_tier0_defaults_fit_without_spilling(backend, arch):
    _backend_or_skip(backend)
    rows = measure(LAUNCHES[backend](), [arch], torch.bfloat16)
    assert {r["kernel"] for r in rows} >= {"layer_norm", "linear", "attention", "softmax_entropy", "halt_update"}
    problems = [(r["kernel"], r["variant"], r["problem"]) for r in rows if r["problem"]]
    assert not problems, problems  # on sm_120: every default fits its 99 KiB of shared memory
    for r in rows:
        assert r["registers"] and r["registers"] > 0, r
        assert r["blocks_per_sm"] is None or r["blocks_per_sm"] >= 1, r
    assert "| " + backend in markdown(rows, "test")
    assert {r["variant"] for r in rows if r["kernel"] == "attention"} >= {"causal", "decode key_len"}
    if backend == "triton":  # attention's load path: TMA on sm_90; pointers elsewhere and for views TMA cannot take
        tma = {r["variant"]: r["tma"] for r in rows if r["kernel"] == "attention"}
        assert tma == {"causal": arch == "sm_90", "causal pointers": False, "decode key_len": arch == "sm_90"}, tma


def shipped_table_configs() -> list:
    """(gpu, arch, backend, kernel, dtype, config) of every distinct kernel configuration the
    shipped tuning tables hold (a PyTorch winner, {"impl": "torch"}, compiles nothing)."""
    params, seen = [], set()
    for path in sorted(table.PACKAGE_TABLES.glob("*.json")):
        shipped = table.load(path)
        arch = arch_for_capability(tuple(shipped["device"]["capability"])).arch
        for entry in shipped["entries"]:
            config = entry["best"]["config"]
            key = (path.stem, entry["backend"], entry["kernel"], entry["dtype"], json.dumps(config, sort_keys=True))
            if "impl" in config or key in seen:
                continue
            seen.add(key)
            case_id = "-".join(map(str, (*key[:4], len(seen))))
            params.append(pytest.param(path.stem, arch, *key[1:4], config, id=case_id))
    return params


@pytest.mark.parametrize("gpu, arch, backend, kernel, dtype, config", shipped_table_configs())
def test_hierarchical_parity_tier0_shipped_table_configs_fit_every_launch_of_their_kernel(gpu, arch, backend, kernel,
                                                                                         dtype, config):
    """A table's configuration can serve any launch of its kernel on its GPU (the lookup falls back
    to the nearest bucket), on whichever load path the launcher takes there (the Triton linear's
    persistent TMA kernel on sm_90, though h200.json's linear entries were timed on the pointer
    kernel): compiled for the table's architecture at every launch of that kernel in the shipped
    GPU model's forward, it fits without spilling."""
    _backend_or_skip(backend)
    launches = [launch for launch in LAUNCHES[backend]() if launch.kernel == kernel]
    assert launches, f"no launch of {backend} {kernel} in the model's forward"
    rows = measure(launches, [arch], getattr(torch, dtype), config=config)
    problems = [(r["variant"], r["problem"]) for r in rows if r["problem"]]
    assert not problems, (gpu, config, problems)


LIMITS = ARCHS["sm_90"]


def test_a_spill_or_local_memory_is_a_problem():
    fits = {"registers": 128, "shared_mem": 1024, "threads": 256}
    assert resource_problem(fits, {}, LIMITS) is None
    assert "spills: 64 bytes" in resource_problem({**fits, "stack": 64}, {}, LIMITS)
    assert "spills: 24 bytes" in resource_problem({**fits, "spill_stores": 24, "stack": 16}, {}, LIMITS)
    assert "spills" in resource_problem({**fits, "local_mem": 8}, {}, LIMITS)
    assert "shared memory" in resource_problem({**fits, "shared_mem": 300 * 1024}, {}, LIMITS)
    assert "registers x 512 threads" in resource_problem({**fits, "threads": 512, "registers": 255}, {}, LIMITS)


@pytest.mark.parametrize("resources,config,arch,blocks", [
    ({"registers": 32, "shared_mem": 0}, {"num_warps": 4}, "sm_90", 16),  # warps: 64 / 4
    ({"registers": 128, "shared_mem": 0}, {"num_warps": 8}, "sm_90", 2),  # registers: 65536 / (128 * 256)
    ({"registers": 64, "shared_mem": 48 * 1024}, {"num_warps": 4}, "sm_90", 4),  # shared: 228K / 49K
    ({"registers": 64, "shared_mem": 48 * 1024}, {"num_warps": 4}, "sm_120", 2),  # shared: 100K / 49K
    ({"registers": 16, "shared_mem": 0}, {"num_warps": 1}, "sm_90", 32),  # the block limit
    ({"registers": 40, "shared_mem": 0, "threads": 96}, {}, "sm_120", 16),  # warps: 48 / 3
])
def test_occupancy_follows_the_cuda_rules(resources, config, arch, blocks):
    assert occupancy(resources, config, ARCHS[arch]) == blocks


def test_occupancy_is_unknown_without_a_thread_count():
    assert occupancy({"registers": 32}, {}, ARCHS["sm_90"]) is None


def test_every_compile_target_has_limits():
    assert set(gpus.COMPILE_TARGETS) <= set(ARCHS)
    for arch in gpus.COMPILE_TARGETS:
        limits = ARCHS[arch]
        assert limits.shared_mem_per_block < limits.shared_mem_per_sm
