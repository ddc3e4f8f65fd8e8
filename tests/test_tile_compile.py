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


# ---- the launcher's own default, chosen for the architecture compiled for

LONG_T = 2048  # past attention.SHORT_T: the architectures listed in attention.LONG take larger tiles


def _recorded_config(run, *args, arch):
    """The config of the one launch `run(*args)` makes, recorded for `arch` (meta tensors)."""
    (launch,) = runtime.capture(run, *args, arch=arch)
    return launch[3]


def _meta(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16, device="meta")


def test_an_ahead_of_time_compile_for_sm90_at_a_long_sequence_takes_attentions_sm90_long_tiles():
    from looplm_tile import attention
    q = _meta(2, 4, LONG_T, 64)
    args = (q, q, q, torch.empty_like(q), True, 0.125)
    assert _recorded_config(attention.attention_into, *args, arch="sm_90") == attention.LONG[("sm_90", 64)]
    # sm_80 is not in LONG: it keeps its architecture's default, which is not sm_90's
    sm80 = _recorded_config(attention.attention_into, *args, arch="sm_80")
    assert sm80 == attention.TUNING.default_for(torch.bfloat16, "sm_80") != attention.LONG[("sm_90", 64)]
    resources = runtime.compile_run(attention.attention_into, "sm_90", *args)  # what is compiled is that launch
    assert resources["cubin_bytes"] > 0 and resources["launches"] == 1


@pytest.mark.parametrize("arch", runtime.ARCHES)
@pytest.mark.parametrize("kernel", ["linear", "halt_update"])
def test_a_launchers_default_follows_the_architecture_compiled_for(kernel, arch):
    import importlib
    module = importlib.import_module(f"looplm_tile.{kernel}")
    n, c = 256, 384
    if kernel == "linear":
        args = (_meta(n, c), _meta(3 * c, c))
    else:
        flags = torch.empty(n, dtype=torch.bool, device="meta")
        args = (_meta(n, c), _meta(n, c), flags, torch.empty(n, dtype=torch.int32, device="meta"),
                *torch.empty(2, n, device="meta"), 3, 2, 12)
    expected = module.TUNING.default_for(torch.bfloat16, arch)
    assert _recorded_config(getattr(module, kernel), *args, arch=arch) == expected


def test_both_backends_take_the_architecture_from_one_place(monkeypatch):
    """looplm.kernels.launch_arch: the recorded architecture inside a recording, the GPU's own (as
    the closest listed architecture) on CUDA, None on the CPU; cuTile's arch_of and Triton's
    target_arch both answer it."""
    pytest.importorskip("triton")
    from looplm import kernels
    from looplm_triton.common import target_arch
    meta = _meta(1)
    for arch in runtime.ARCHES:
        with runtime.captured_launches(arch):
            assert runtime.arch_of(meta) == target_arch(meta.device) == kernels.launch_arch(meta.device) == arch
    assert runtime.arch_of(torch.empty(1)) is None and target_arch(torch.device("cpu")) is None
    capabilities = {0: (9, 0), 1: (10, 3), 2: (7, 5)}  # an H200, a later Blackwell, a Turing
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(kernels, "_device_arch", kernels._device_arch.__wrapped__)  # no answers cached across tests
    assert [kernels.launch_arch(torch.device("cuda", i)) for i in capabilities] == ["sm_90", "sm_100", "sm_75"]
