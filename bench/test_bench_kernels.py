"""Each op of looplm.ops at the target shapes, on every way of running it.

Variants: "torch" is the registry's default backend (PyTorch's fast ops; the correctness oracle is
the "reference" backend, which is not timed); "eager" the same computation in plain
torch.nn.functional ops at the input dtype (what a model written in PyTorch would run); "compile"
torch.compile of the eager form (of the torch backend's op where there is no eager form); "sdpa"
PyTorch's fused scaled_dot_product_attention; "triton" and "tile" the kernel backends. GPU only:
see bench.harness.GPU_ONLY.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from bench.harness import KERNEL_BACKENDS, backend_or_skip, bench_device, compile_or_skip, device_name, measure, \
    requires_cuda
from bench.schema import CaseInfo, case_label
from bench.workloads import KERNEL_DTYPES, KERNEL_SHAPES, op_cost
from looplm import get_backend
from looplm.ops import BlockWeights

pytestmark = requires_cuda


def make_args(op: str, shape: dict, dtype: torch.dtype, device: torch.device) -> tuple:
    """Positional arguments of op's signature (looplm.ops), unit-scale values."""
    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=device) * scale).to(dtype)

    if op == "softmax_entropy":
        return (randn(shape["N"], shape["V"], scale=2.0),)
    if op == "layer_norm":
        return randn(shape["N"], shape["C"]), randn(shape["C"]), randn(shape["C"]), 1e-5
    if op == "linear":
        m, k, n = shape["M"], shape["K"], shape["N"]
        residual = randn(m, n) if "residual" in shape["epilogue"] else None
        activation = "gelu" if "gelu" in shape["epilogue"] else "none"
        return randn(m, k), randn(n, k, scale=k ** -0.5), randn(n), activation, residual
    if op == "attention":
        size = (shape["B"], shape["H"], shape["T"], shape["D"])
        return randn(*size), randn(*size), randn(*size), True, None
    if op == "halt_update":
        n, c = shape["N"], shape["C"]
        active = torch.rand(n, device=device) < 0.5
        steps = torch.randint(1, 6, (n,), device=device, dtype=torch.int32)
        score, threshold = torch.rand(n, device=device), torch.full((n,), 0.5, device=device)
        return randn(n, c), randn(n, c), active, steps, score, threshold, 6, 2, 12
    if op == "block":
        c = shape["C"]
        ones, zeros = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
        weights = BlockWeights(ones, zeros, randn(3 * c, c, scale=0.02), randn(3 * c, scale=0.02),
                               randn(c, c, scale=0.02), randn(c, scale=0.02), ones, zeros,
                               randn(4 * c, c, scale=0.02), randn(4 * c, scale=0.02),
                               randn(c, 4 * c, scale=0.02), randn(c, scale=0.02))
        return randn(shape["B"], shape["T"], c), weights, shape["H"]
    raise ValueError(f"no inputs for op {op!r}; known: {sorted(KERNEL_SHAPES)}")


# ---- the same computations in plain PyTorch at the input dtype

def eager_layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def eager_linear(x, weight, bias=None, activation="none", residual=None):
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def eager_attention(q, k, v, causal=True, scale=None):
    scores = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5 if scale is None else scale)
    if causal:  # Tq == Tk here, so every row sees a key
        hidden = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_attention(q, k, v, causal=True, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def eager_block(x, w: BlockWeights, n_head: int, dropout_p: float = 0.0):
    """nanoGPT's block in functional form, with SDPA as nanoGPT uses it."""
    B, T, C = x.shape
    q, k, v = F.linear(F.layer_norm(x, (C,), w.ln1_w, w.ln1_b), w.attn_w, w.attn_b).split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    x = x + F.linear(y, w.proj_w, w.proj_b)
    hidden = F.gelu(F.linear(F.layer_norm(x, (C,), w.ln2_w, w.ln2_b), w.fc_w, w.fc_b))
    return x + F.linear(hidden, w.fc2_w, w.fc2_b)


EAGER: dict[str, Callable] = {"layer_norm": eager_layer_norm, "linear": eager_linear,
                              "attention": eager_attention, "block": eager_block}


def variants(op: str) -> list[str]:
    extra = ["eager"] if op in EAGER else []
    return ["torch", *extra, "compile", *(["sdpa"] if op == "attention" else []), *KERNEL_BACKENDS]


CASES = [pytest.param(op, shape, variant, id=f"{case_label(op, shape).replace(' ', '-')}-{variant}")
         for op, shapes in KERNEL_SHAPES.items() for shape in shapes for variant in variants(op)]


def implementation(benchmark, op: str, variant: str) -> Callable:
    if variant == "torch":
        return get_backend("torch").ops[op]
    if variant == "eager":
        return EAGER[op]
    if variant == "sdpa":
        return sdpa_attention
    if variant == "compile":
        return compile_or_skip(benchmark, EAGER.get(op, get_backend("torch").ops[op]))
    return backend_or_skip(variant).ops[op]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op,shape,variant", CASES)
def test_kernel(benchmark, op: str, shape: dict, variant: str, dtype: torch.dtype) -> None:
    fn = implementation(benchmark, op, variant)
    device = bench_device()
    args = make_args(op, shape, dtype, device)
    nbytes, flops = op_cost(op, shape, torch.empty((), dtype=dtype).element_size())
    info = CaseInfo("kernel", op, variant, shape, str(dtype).removeprefix("torch."), device_name(device),
                    bytes=nbytes, flops=flops)
    with torch.inference_mode():
        measure(benchmark, lambda: fn(*args), info)
