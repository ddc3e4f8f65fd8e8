"""The backend registry: lookup, listing, refusals, signatures, hybrid autograd."""
import pytest
import torch

import reference
from looplm import torch_ops
from looplm import Availability, Backend, BackendUnavailable, LoopConfig, LoopGPT, available_backends, get_backend
from looplm import backends as backends_module
from looplm.ops import OP_NAMES, signature_mismatch


@pytest.fixture
def scratch_registry(monkeypatch):
    """A private copy of the registry, so a test can register backends without leaking them."""
    monkeypatch.setattr(backends_module, "_REGISTRY", dict(backends_module._REGISTRY))


@pytest.mark.parametrize("name", sorted(available_backends()))
def test_every_backend_implements_every_op_with_the_shared_signature(name):
    availability = available_backends()[name]
    if not availability.available:
        pytest.skip(f"backend {name!r} is unavailable here: {availability.reason}")
    backend = get_backend(name)
    assert set(OP_NAMES) <= set(backend.ops)
    for op in OP_NAMES:
        assert signature_mismatch(op, backend.ops[op]) is None


def _renamed(x, weight, bias=None, epsilon=1e-5):
    return x


def _other_default(x, weight, bias=None, eps=1e-6):
    return x


def _keyword_only(x, weight, *, bias=None, eps=1e-5):
    return x


def _missing_eps(x, weight, bias=None):
    return x


@pytest.mark.parametrize("fn", [_renamed, _other_default, _keyword_only, _missing_eps])
def test_signature_check_catches_a_mismatch(fn):
    assert "layer_norm" in signature_mismatch("layer_norm", fn)


def test_signature_check_accepts_the_same_signature_under_another_name():
    def kernel_layer_norm(x, weight, bias=None, eps=1e-5):
        return x
    assert signature_mismatch("layer_norm", kernel_layer_norm) is None


def test_builtin_backends_are_listed_with_a_reason_when_unavailable():
    listing = available_backends()
    assert {"torch", "reference", "triton", "tile"} <= set(listing)
    assert listing["torch"].available and listing["reference"].available
    for name, a in listing.items():
        assert a.available or a.reason, f"{name} is unavailable without a reason"


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendUnavailable, match="unknown backend 'cuda-magic'") as err:
        get_backend("cuda-magic")
    for name in ("torch", "reference", "triton", "tile"):
        assert f"  {name}: " in str(err.value)
    with pytest.raises(BackendUnavailable):
        LoopGPT(LoopConfig(n_embd=32, n_head=2, block_size=8), backend="cuda-magic")


def test_unavailable_backend_says_why(scratch_registry):
    backends_module.register_backend("needs-gpu", probe=lambda: Availability(False, reason="no CUDA device"),
                                     load=lambda: pytest.fail("an unavailable backend must not be loaded"))
    with pytest.raises(BackendUnavailable, match="'needs-gpu' is unavailable here: no CUDA device"):
        get_backend("needs-gpu")


def test_a_broken_probe_does_not_hide_the_others(scratch_registry):
    def probe():
        raise ImportError("libcuda.so not found")
    backends_module.register_backend("broken", probe=probe, load=lambda: None)
    listing = available_backends()
    assert not listing["broken"].available and "libcuda.so" in listing["broken"].reason
    assert listing["torch"].available


def test_a_backend_missing_an_op_is_refused(scratch_registry):
    partial = dict(reference.OPS)
    del partial["attention"]
    backends_module.register_backend("partial", probe=lambda: Availability(True, "native"),
                                     load=lambda: Backend("partial", partial))
    with pytest.raises(BackendUnavailable, match="attention"):
        get_backend("partial")


def test_hybrid_autograd_uses_the_fast_torch_ops_while_grad_is_enabled():
    def kernel_layer_norm(x, weight, bias=None, eps=1e-5):
        return torch.zeros_like(x)
    backend = Backend("fake", {**reference.OPS, "layer_norm": kernel_layer_norm}, differentiable=frozenset())
    assert backend.op("layer_norm") is torch_ops.layer_norm
    with torch.no_grad():
        assert backend.op("layer_norm") is kernel_layer_norm
    with torch.inference_mode():
        assert backend.op("layer_norm") is kernel_layer_norm
    with_backward = Backend("fake", {**reference.OPS, "layer_norm": kernel_layer_norm},
                            differentiable=frozenset({"layer_norm"}))
    assert with_backward.op("layer_norm") is kernel_layer_norm


@pytest.mark.parametrize("name,ops", [("reference", reference.OPS), ("torch", torch_ops.OPS)])
def test_the_oracle_and_the_torch_backend_keep_their_own_ops_while_grad_is_enabled(name, ops):
    """Parity tests run the oracle with gradients on: handing out another backend's ops there would
    compare the kernels with something other than the oracle."""
    backend = get_backend(name)
    assert torch.is_grad_enabled()
    for op in OP_NAMES:
        assert backend.op(op) is ops[op], op


def test_model_refuses_a_backend_on_the_wrong_device():
    backend = Backend("gpu-only", reference.OPS, device_type="cuda")
    model = LoopGPT(LoopConfig(n_embd=32, n_head=2, block_size=8, n_loops=2), backend=backend)
    with pytest.raises(BackendUnavailable, match="runs native on cuda tensors, but the model is on cpu"):
        model(torch.zeros(1, 4, dtype=torch.long))
