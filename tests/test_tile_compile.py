"""Tier 0 for the cuTile backend: every kernel compiles to cubin for sm_80, sm_90, sm_100 and sm_120 on
this machine, no GPU needed, at every launch of the shipped model configs (tuning.resources lists
them), specialised as cuTile's JIT specialises a real launch, and fits the architecture's shared memory."""
import pytest
import torch

pytest.importorskip("cuda.tile")

from looplm_tile import runtime  # noqa: E402
from tuning.buckets import MODEL_SHAPES  # noqa: E402
from tuning.gpus import ARCHS  # noqa: E402
from tuning.resources import kernel_launches  # noqa: E402

KERNELS = ("layer_norm", "linear", "attention", "softmax_entropy", "halt_update")
# The GPU model's launches (both vocabularies) for every target; the CPU model's (smaller tiles) once, for the oldest.
MODELS = {"gpu": (MODEL_SHAPES["shakespeare-gpt2"], (65, 50304)), "cpu": (MODEL_SHAPES["cpu"], (65,))}
TARGETS = [("gpu", arch) for arch in runtime.ARCHES] + [("cpu", "sm_80")]


@pytest.mark.parametrize("model, arch", TARGETS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_hierarchical_parity_tier0_compiles(kernel, model, arch):
    launches = [launch for launch in kernel_launches("tile", *MODELS[model]) if launch.kernel == kernel]
    assert launches
    for launch in launches:
        config = launch.config(torch.bfloat16, arch)
        resources = launch.compile(torch.bfloat16, arch, config)
        assert resources["cubin_bytes"] > 0, launch.variant
        if "shared_mem" in resources:
            assert resources["shared_mem"] <= ARCHS[arch].shared_mem_per_block, (launch.variant, resources)
