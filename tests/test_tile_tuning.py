"""Every cuTile kernel module's TUNING: a sound candidate space, and runs with explicit configs."""
import importlib

import pytest
import torch

import reference
from looplm.testing import assert_close, device_for
from looplm_tile import KERNEL_MODULES, runtime

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

MODULES = [importlib.import_module(f"looplm_tile.{name}") for name in KERNEL_MODULES]
SMALL_SHAPES = {"layer_norm": (5, 40), "linear": (9, 20, 24), "attention": (1, 2, 9, 9, 32),
                "softmax_entropy": (3, 300), "halt_update": (11, 40)}
DEVICE = device_for("tile").type  # the emulator's CPU, or the GPU the kernels run on natively


@pytest.mark.parametrize("module", MODULES, ids=KERNEL_MODULES)
def test_tuning_spec_is_sound(module):
    tuning = module.TUNING
    assert tuning.backend == "tile" and tuning.kernel == module.__name__.rsplit(".", 1)[1]
    assert tuning.default in list(tuning.space)
    assert all(set(c) == set(tuning.default) for c in tuning.space)


# The reference op on the arguments of each kernel's `run` (its make_args), outputs dropped.
REFERENCE_CALLS = {
    "layer_norm": lambda x, w, b, y, eps: reference.layer_norm(x, w, b, eps),
    "linear": lambda x, w, b, r, y, gelu: reference.linear(x, w, b, "gelu" if gelu else "none", r),
    "attention": lambda q, k, v, out, causal, scale: reference.attention(q, k, v, causal, scale),
    "softmax_entropy": lambda logits, entropy, max_prob: reference.softmax_entropy(logits),
    "halt_update": lambda h, h_new, active, steps, score, threshold, h_out, active_out, steps_out, *loops:
        reference.halt_update(h, h_new, active, steps, score, threshold, *loops),
}


@pytest.mark.parametrize("module", MODULES, ids=KERNEL_MODULES)
def test_smallest_and_largest_configs_compute_the_reference(module):
    """The default, smallest and largest candidates each reach the launch and give the reference
    op's result (tile sizes must not matter)."""
    tuning = module.TUNING
    space = sorted(tuning.space, key=lambda c: sum(v for k, v in c.items() if k.startswith("BLOCK")))
    assert space[0] != space[-1]
    for config in (tuning.default, space[0], space[-1]):
        torch.manual_seed(0)
        args = tuning.make_args(SMALL_SHAPES[tuning.kernel], torch.float32, DEVICE)
        with runtime.captured_launches() as launches:
            tuning.run(*args, config=config)
        assert launches and all(launch[3] == config for launch in launches), f"{config} did not reach the launch"
        expected = REFERENCE_CALLS[tuning.kernel](*args)
        actual = tuning.run(*args, config=config)
        expected, actual = (r if isinstance(r, tuple) else (r,) for r in (expected, actual))
        assert len(actual) == len(expected)
        for i, (got, want) in enumerate(zip(actual, expected)):
            assert_close(got, want, dtype=torch.float32, msg=f"{config}: output {i}")


@pytest.mark.parametrize("module", MODULES, ids=KERNEL_MODULES)
def test_shape_key_matches_the_tuned_shape(module):
    tuning = module.TUNING
    shape = SMALL_SHAPES[tuning.kernel]
    op = getattr(module, tuning.kernel)
    args = {"layer_norm": lambda: (torch.randn(*shape), torch.ones(shape[1])),
            "linear": lambda: (torch.randn(shape[0], shape[2]), torch.randn(shape[1], shape[2])),
            "attention": lambda: (torch.randn(*shape[:3], shape[4]), torch.randn(*shape[:2], shape[3], shape[4]),
                                  torch.randn(*shape[:2], shape[3], shape[4])),
            "softmax_entropy": lambda: (torch.randn(*shape),),
            "halt_update": lambda: (torch.randn(*shape), torch.randn(*shape), torch.ones(shape[0], dtype=torch.bool),
                                    torch.zeros(shape[0], dtype=torch.int32), torch.rand(shape[0]),
                                    torch.rand(shape[0]), 1, 1, 4)}[tuning.kernel]()
    assert tuning.shape_key(*args) == shape
    op(*args)  # and the op accepts what the key describes
