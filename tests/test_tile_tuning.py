"""Every cuTile kernel module's TUNING: a sound candidate space, and runs with explicit configs."""
import pytest
import torch

from looplm_tile import KERNEL_MODULES
import importlib

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

MODULES = [importlib.import_module(f"looplm_tile.{name}") for name in KERNEL_MODULES]
SMALL_SHAPES = {"layer_norm": (5, 40), "linear": (9, 20, 24), "attention": (1, 2, 9, 9, 32),
                "softmax_entropy": (3, 300), "halt_update": (11, 40)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("module", MODULES, ids=KERNEL_MODULES)
def test_tuning_spec_is_sound(module):
    tuning = module.TUNING
    assert tuning.backend == "tile" and tuning.kernel == module.__name__.rsplit(".", 1)[1]
    assert tuning.default in list(tuning.space)
    assert all(set(c) == set(tuning.default) for c in tuning.space)


@pytest.mark.parametrize("module", MODULES, ids=KERNEL_MODULES)
def test_smallest_and_largest_configs_compute_the_same(module):
    """The smallest and the largest candidate give the default's result (tile sizes must not matter)."""
    tuning = module.TUNING
    space = sorted(tuning.space, key=lambda c: sum(v for k, v in c.items() if k.startswith("BLOCK")))
    results = []
    for config in (tuning.default, space[0], space[-1]):
        torch.manual_seed(0)
        args = tuning.make_args(SMALL_SHAPES[tuning.kernel], torch.float32, DEVICE)
        tuning.run(*args, config=config)
        results.append([a.clone() for a in args if isinstance(a, torch.Tensor)])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=False)


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
