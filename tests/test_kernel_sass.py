"""Tier 0 on the machine code: what the compiler made of the default launches of the Triton matmul
kernels, read from their SASS (`tests/kernel_sass.py`), no GPU needed.

- sm_90: the linear layer's persistent kernel and attention multiply on the Hopper warpgroup
  tensor cores (HGMMA) and move their tiles with the copy engine (UTMALDG loads, UTMASTG stores);
  the pointer paths (views TMA cannot address) issue no tensor-memory copies.
- sm_100: the linear layer's persistent kernel loads through the copy engine too and multiplies
  with tcgen05 (UTC*MMA); sm_80 and sm_120 keep the pointer kernel (cp.async, mma.sync).
- Layer norm and the entropy move 16-byte vectors (the entropy's chunks prefetched with cp.async
  on sm_90).
- Every default launch at the issue's shapes (linear 8192x4096x4096 +bias+residual and
  16384x1536x384 +GELU, the fused LayerNorm + linear, attention at head sizes 64 and 128, layer
  norm 8192x4096, entropy 8192x50304) compiles for sm_80, sm_90, sm_100 and sm_120 without
  spilling and within the architecture's limits.
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernel_sass import (AMPERE_MMA, ASYNC_COPY, BLACKWELL_MMA, HOPPER_MMA, TMA_LOAD,  # noqa: E402
                               TMA_STORE, compiler_or_skip, count_prefix, sass_report, sass_reports)
from tuning.gpus import ARCHS, COMPILE_TARGETS, resource_problem  # noqa: E402


def _fits(entry: dict, arch: str) -> None:
    config = {"num_warps": entry["options"].get("num_warps", 4)}
    problem = resource_problem({**entry, "threads": 32 * config["num_warps"]}, config, ARCHS[arch])
    assert problem is None, (arch, entry["kernel"], problem, {k: v for k, v in entry.items() if k != "ops"})


ISSUE_LAUNCHES = [  # (kernel, shape, flags): the shapes issue 20 measured on the H200
    ("linear", (8192, 4096, 4096), {"residual": True}),
    ("linear", (16384, 1536, 384), {"activation": "gelu"}),
    ("linear", (16384, 1536, 384), {"activation": "gelu", "norm": True}),
    ("attention", (16, 32, 1024, 1024, 64), {}),
    ("attention", (8, 16, 2048, 2048, 128), {}),
    ("layer_norm", (8192, 4096), {}),
    ("softmax_entropy", (8192, 50304), {}),
]


@pytest.mark.parametrize("arch", COMPILE_TARGETS)
def test_hierarchical_parity_tier0_issue_shapes_fit_without_spilling(arch):
    compiler_or_skip(disassembler=True)
    reports = sass_reports([(kernel, shape, "bfloat16", arch, flags) for kernel, shape, flags in ISSUE_LAUNCHES])
    for (kernel, shape, _), entries in zip(ISSUE_LAUNCHES, reports):
        assert entries, (kernel, shape)
        for entry in entries:
            _fits(entry, arch)


@pytest.mark.parametrize("flags", [{"residual": True}, {"activation": "gelu", "norm": True}])
def test_hierarchical_parity_tier0_sm90_linear_is_persistent_on_tma_and_wgmma(flags):
    compiler_or_skip(disassembler=True)
    shape = (8192, 4096, 4096) if flags.get("residual") else (16384, 1536, 384)
    entries = sass_report("linear", shape, "bfloat16", "sm_90", **flags)
    (matmul,) = [e for e in entries if e["kernel"] != "_layer_norm_kernel"]  # the norm adds its statistics pass
    assert matmul["kernel"] == "_linear_persistent_kernel", matmul["kernel"]
    assert matmul["grid"] == [132], matmul["grid"]  # one program per SM of an H100/H200
    ops = matmul["ops"]
    assert count_prefix(ops, HOPPER_MMA) > 0, ops
    assert count_prefix(ops, TMA_LOAD) >= 2, ops  # x and W tiles
    assert count_prefix(ops, TMA_STORE) >= 2, ops  # the two epilogue slices
    if flags.get("residual"):
        assert count_prefix(ops, TMA_LOAD) >= 3, ops  # and the residual slices
    _fits(matmul, "sm_90")


def test_hierarchical_parity_tier0_sm100_linear_loads_through_tma():
    compiler_or_skip(disassembler=True)
    (matmul,) = sass_report("linear", (8192, 4096, 4096), "bfloat16", "sm_100", residual=True)
    assert matmul["kernel"] == "_linear_persistent_kernel"
    assert count_prefix(matmul["ops"], TMA_LOAD) >= 2 and count_prefix(matmul["ops"], TMA_STORE) >= 1, matmul["ops"]
    assert count_prefix(matmul["ops"], BLACKWELL_MMA) > 0, matmul["ops"]  # tcgen05 tensor-memory MMAs


@pytest.mark.parametrize("arch", ["sm_80", "sm_120"])
def test_hierarchical_parity_tier0_linear_keeps_pointers_without_deep_shared_memory(arch):
    compiler_or_skip(disassembler=True)
    (matmul,) = sass_report("linear", (8192, 4096, 4096), "bfloat16", arch, residual=True)
    assert matmul["kernel"] == "_linear_kernel"
    assert count_prefix(matmul["ops"], TMA_LOAD) == 0
    assert count_prefix(matmul["ops"], ASYNC_COPY) > 0, matmul["ops"]  # cp.async pipelining instead
    assert count_prefix(matmul["ops"], AMPERE_MMA) > 0, matmul["ops"]


def test_hierarchical_parity_tier0_sm90_linear_of_an_unaligned_width_takes_pointers():
    compiler_or_skip(disassembler=True)
    # The lm_head of a 65-character vocabulary: output rows of 130 bytes, which TMA cannot address.
    (matmul,) = sass_report("linear", (4096, 65, 384), "bfloat16", "sm_90")
    assert matmul["kernel"] == "_linear_kernel"
    assert count_prefix(matmul["ops"], TMA_LOAD) == 0
    assert count_prefix(matmul["ops"], HOPPER_MMA) > 0, matmul["ops"]
    _fits(matmul, "sm_90")


@pytest.mark.parametrize("head_size", [64, 128])
def test_hierarchical_parity_tier0_sm90_attention_uses_hgmma_and_tma(head_size):
    compiler_or_skip(disassembler=True)
    shape = (16, 32, 1024, 1024, 64) if head_size == 64 else (8, 16, 2048, 2048, 128)  # as ISSUE_LAUNCHES
    (entry,) = sass_report("attention", shape, "bfloat16", "sm_90")
    assert entry["kernel"] == "_attention_tma_kernel"
    ops = entry["ops"]
    assert count_prefix(ops, HOPPER_MMA) > 0, ops
    assert count_prefix(ops, TMA_LOAD) >= 3, ops  # Q, K and V
    assert count_prefix(ops, TMA_STORE) >= 1, ops
    (pointers,) = sass_report("attention", shape, "bfloat16", "sm_90", tensor_descriptors=False)
    assert pointers["kernel"] == "_attention_kernel"
    assert count_prefix(pointers["ops"], TMA_LOAD) == count_prefix(pointers["ops"], TMA_STORE) == 0
    assert count_prefix(pointers["ops"], HOPPER_MMA) > 0, pointers["ops"]


@pytest.mark.parametrize("C", [384, 4096])
def test_hierarchical_parity_tier0_layer_norm_moves_16_byte_vectors(C):
    compiler_or_skip(disassembler=True)
    (entry,) = sass_report("layer_norm", (8192, C), "bfloat16", "sm_90")
    accesses = entry["accesses"]
    assert accesses.get("LDG.128", 0) > 0 and accesses.get("STG.128", 0) > 0, accesses
    assert accesses.get("LDG.64", 0) == accesses.get("STG.64", 0) == accesses.get("STG.32", 0) == 0, accesses
    _fits(entry, "sm_90")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_hierarchical_parity_tier0_entropy_streams_the_vocabulary_in_16_byte_vectors(arch):
    compiler_or_skip(disassembler=True)
    (entry,) = sass_report("softmax_entropy", (8192, 50304), "bfloat16", arch)
    accesses, ops = entry["accesses"], entry["ops"]
    if arch == "sm_90":  # chunks prefetched into shared memory (cp.async)
        assert count_prefix(ops, ASYNC_COPY) > 0, ops
    else:
        assert accesses.get("LDG.128", 0) > 0, accesses
    assert not any(k.startswith("LDG.") and k != "LDG.128" for k in accesses), accesses
    _fits(entry, arch)
