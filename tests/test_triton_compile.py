"""Tier 0 for the Triton backend: every kernel compiles to a cubin on this machine, no GPU needed,
specialised as the JIT specialises a real launch (the launcher itself runs on meta tensors and its
launch is compiled), and its default configuration fits without spilling.

bf16 at every launch of the shipped GPU model for sm_80, sm_90, sm_100 and sm_120 is checked in
tests/test_kernel_resources.py; here fp32 (the model's own dtype, for evaluation) for sm_90.
LOOPLM_TIER0_EXHAUSTIVE=1 compiles every configuration of every kernel's tuning space for every
shipped shape and dtype (thousands of compiles, about an hour on 2 cores).
"""
from __future__ import annotations

import importlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("triton")

from looplm_triton import KERNEL_MODULES  # noqa: E402
from looplm_triton import attention as attention_module  # noqa: E402
from looplm_triton import linear as linear_module  # noqa: E402
from looplm_triton.aot import ARCHS  # noqa: E402
from tuning.buckets import MODEL_SHAPES, shape_keys  # noqa: E402
from tuning.resources import launch_problem  # noqa: E402

EXHAUSTIVE = os.environ.get("LOOPLM_TIER0_EXHAUSTIVE") == "1"


def _shipped_shapes() -> dict[str, list[tuple]]:
    """Each kernel's shape keys in the forward passes of the shipped models (tuning.buckets): the GPU
    model (batch 16, context 256, 384 wide, 6 heads, vocabularies 65 and 50304) and the CPU one."""
    shapes: dict[str, list[tuple]] = {}
    for module in KERNEL_MODULES:
        op, tuning = module.rsplit(".", 1)[1], importlib.import_module(module).TUNING
        keys = shapes.setdefault(tuning.kernel, [])
        for model in MODEL_SHAPES.values():
            keys += [k for k in shape_keys(op, tuning.shape_key, model, torch.bfloat16) if k not in keys]
    return shapes


SHIPPED_SHAPES = _shipped_shapes()
TUNINGS = {t.kernel: t for t in (importlib.import_module(m).TUNING for m in KERNEL_MODULES)}


def _compile_all(jobs: list) -> list:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one compile worker per thread
        return list(pool.map(lambda job: job[0](*job[1:]), jobs))


def test_every_op_has_a_tuning_entry():
    assert set(TUNINGS) == set(SHIPPED_SHAPES)
    for kernel, tuning in TUNINGS.items():
        assert tuning.backend == "triton"
        for default in tuning.defaults():
            assert default in list(tuning.space), f"{kernel}: the default {default} is not in its space"


def test_hierarchical_parity_tier0_fp32_defaults_compile_and_fit():
    """fp32 (tf32x3 attention, exact fp32 matmuls) with each kernel's fp32 default, for sm_90; attention also
    as a decode step with a key_len."""
    dtype, arch = torch.float32, "sm_90"
    kernels = sorted(TUNINGS) + ["linear", "attention"]
    jobs = [(TUNINGS[kernel].compile, SHIPPED_SHAPES[kernel][0], dtype, TUNINGS[kernel].default_for(dtype), arch)
            for kernel in sorted(TUNINGS)]
    # The epilogue the block uses that the tuning entries leave out: bias + residual.
    jobs += [(_compile_linear_with_residual, SHIPPED_SHAPES["linear"][0], dtype, linear_module.DEFAULT, arch)]
    # A decode step: one query over a static cache, a key_len per batch row.
    B, H, _, Tk, D = SHIPPED_SHAPES["attention"][0]
    jobs += [(_compile_attention_decode, (B, H, 1, Tk, D), dtype, TUNINGS["attention"].default_for(dtype), arch)]
    for kernel, (_, shape, _, config, arch), resources in zip(kernels, jobs, _compile_all(jobs)):
        assert resources["registers"] > 0, (shape, arch)
        problem = launch_problem(resources, config, arch, "triton", kernel, dtype)
        assert problem is None, (kernel, shape, config, problem)


def _compile_linear_with_residual(shape, dtype, config, arch) -> dict:
    return linear_module.compile_variant(shape, dtype, config, arch, residual=True)


def _compile_attention_decode(shape, dtype, config, arch) -> dict:
    return attention_module.compile_variant(shape, dtype, config, arch, key_len=True)


@pytest.mark.skipif(not EXHAUSTIVE, reason="set LOOPLM_TIER0_EXHAUSTIVE=1 to compile every configuration of every "
                                           "tuning space for every architecture (about an hour on 2 cores)")
@pytest.mark.parametrize("kernel", sorted(SHIPPED_SHAPES))
def test_hierarchical_parity_tier0_every_config_compiles(kernel):
    tuning = TUNINGS[kernel]
    jobs = [(tuning.compile, shape, dtype, config, arch)
            for shape, dtype, config, arch in itertools.product(
                SHIPPED_SHAPES[kernel], (torch.float32, torch.float16, torch.bfloat16), tuning.space, ARCHS)]
    for (_, shape, dtype, config, arch), resources in zip(jobs, _compile_all(jobs)):
        assert resources["registers"] > 0, (shape, dtype, config, arch)
