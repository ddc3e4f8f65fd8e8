"""Every backend against the oracle ("reference"), tier by tier: one suite, parametrised over backends.

tier 1: each op (odd shapes, single rows, masked rows, near-constant rows, -inf logits) in fp32 and
        bf16 (halting also fp16); tier 2: the looped core with halting, for every criterion;
tier 3: the model's logits, loss, halting decisions and greedy generations.

Each test puts its tensors on the device its backend runs on (`looplm.testing.device_for`): on a
CPU machine "torch" runs natively, "triton" in Triton's interpreter and "tile" in the cuTile
emulator, at tiny shapes; on a GPU all three run natively, and the `gpu` tests add the shipped
model's shapes. A case a backend cannot run here is skipped with the reason. Backend-specific checks
live beside their backend: tests/test_torch_backend.py (autocast, torch.compile), the Triton and
cuTile compile and TMA tests, tests/test_tile_emulator.py.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import reference
from looplm import LoopConfig, LoopGPT, LoopTrace
from looplm.backends import KERNEL_PACKAGES, Backend
from looplm.config import HIGHER_IS_SURER
from looplm.engine import halt_score
from looplm.ops import OP_NAMES, BlockWeights, signature_mismatch
from looplm.testing import assert_close, backend_or_skip, device_for, dtype_problem

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

KERNEL_BACKENDS = tuple(KERNEL_PACKAGES)
BACKENDS = ("torch", *KERNEL_BACKENDS)
CRITERIA = ("entropy", "confidence", "delta", "kl", "gate")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="needs a CUDA GPU: every backend natively at the shipped model's shapes")


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return backend_or_skip(request.param)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> Backend:
    return backend_or_skip(request.param)


@pytest.fixture(autouse=True)
def _no_grad():  # kernels run without autograd (looplm.backends: hybrid autograd)
    with torch.no_grad():
        yield


def skip_unless_computes(backend: Backend, dtype: torch.dtype, matmul: bool) -> None:
    problem = dtype_problem(backend, dtype, matmul)
    if problem:
        pytest.skip(problem)


def randn(*shape, device, dtype=torch.float32, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + offset).to(device=device, dtype=dtype)


def test_backend_ops_match_the_signatures(backend):
    assert set(backend.ops) == set(OP_NAMES)
    assert [signature_mismatch(name, backend.ops[name]) for name in OP_NAMES] == [None] * len(OP_NAMES)


def test_backend_mode_on_this_machine(backend):
    from looplm import BackendUnavailable
    expected = {"torch": ("native", None), "triton": ("interpreted", "cpu"), "tile": ("emulated", "cpu")}
    if torch.cuda.is_available() and backend.name != "torch":
        assert (backend.mode, backend.device_type) == ("native", "cuda")
    else:
        assert (backend.mode, backend.device_type) == expected[backend.name]
    if backend.device_type is not None:  # a model elsewhere is told where the kernels run
        with pytest.raises(BackendUnavailable, match=f"{backend.mode} on {backend.device_type}"):
            backend.check_device(torch.device("meta"))


# ---- tier 1: each op

@DTYPES
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (37, 100), (3, 5, 48), (3, 7, 200)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_hierarchical_parity_tier1_layer_norm(backend, dtype, shape, with_bias):
    skip_unless_computes(backend, dtype, matmul=False)
    device, C = device_for(backend), shape[-1]
    x = randn(*shape, device=device, dtype=dtype, scale=3, offset=20)  # an offset mean: the variance is about it
    w, b = randn(C, device=device, dtype=dtype), randn(C, device=device, dtype=dtype) if with_bias else None
    out = backend.ops["layer_norm"](x, w, b)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, reference.layer_norm(x, w, b))


@pytest.mark.parametrize("std", [0.0, 1e-4, 1e-3, 3e-3])
def test_hierarchical_parity_tier1_layer_norm_near_constant_rows(backend, std):
    """Rows whose variance (0 to 1e-5) is at or below eps: where eps decides the output, so that eps
    inside the square root (rsqrt(var + eps)) and outside it (1 / (sqrt(var) + eps)) differ by 3x and
    more. Offsets near 0 keep fp32 rounding of the mean far below the tolerance."""
    device, C = device_for(backend), 100
    offsets = torch.tensor([0.5, -0.25, 0.75, 0.0, -1.0])[:, None]
    x = (offsets + std * torch.randn(5, C)).to(device)
    w, b = randn(C, device=device), randn(C, device=device)
    out = backend.ops["layer_norm"](x, w, b)
    assert torch.isfinite(out).all()
    assert_close(out, reference.layer_norm(x, w, b), msg=f"rows of std {std}")


EPILOGUES = pytest.mark.parametrize("activation,with_bias,with_residual",
                                    [("none", False, False), ("none", True, True), ("gelu", True, False),
                                     ("gelu", False, True)])


@DTYPES
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 5, 7), (1, 70, 33), (37, 65, 50), (33, 130, 64), (130, 20, 7)])
@EPILOGUES
def test_hierarchical_parity_tier1_linear(backend, dtype, M, N, K, activation, with_bias, with_residual):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    x = randn(M, K, device=device, dtype=dtype)
    w = randn(N, K, device=device, dtype=dtype, scale=2 * K ** -0.5)  # outputs of a few units: GELU's curved part
    b = randn(N, device=device, dtype=dtype) if with_bias else None
    r = randn(M, N, device=device, dtype=dtype) if with_residual else None
    out = backend.ops["linear"](x, w, b, activation, r)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, reference.linear(x, w, b, activation, r))


@DTYPES
def test_hierarchical_parity_tier1_linear_leading_dims(backend, dtype):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    x, w = randn(2, 9, 40, device=device, dtype=dtype), randn(24, 40, device=device, dtype=dtype, scale=40 ** -0.5)
    b, r = randn(24, device=device, dtype=dtype), randn(2, 9, 24, device=device, dtype=dtype)
    for bias in (b, None):
        out = backend.ops["linear"](x, w, bias, "gelu", r)
        assert out.shape == (2, 9, 24) and out.dtype == dtype
        assert_close(out, reference.linear(x, w, bias, "gelu", r))


def test_linear_refuses_an_unknown_activation(backend):
    device = device_for(backend)
    with pytest.raises(ValueError, match="activation must be one of"):
        backend.ops["linear"](torch.randn(2, 4, device=device), torch.randn(3, 4, device=device), activation="relu")


@DTYPES
@pytest.mark.parametrize("M,N,K", [(1, 9, 16), (29, 96, 40)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_hierarchical_parity_tier1_layer_norm_linear(backend, dtype, M, N, K, activation):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    x = randn(M, K, device=device, dtype=dtype, scale=2, offset=5)
    ln_w, ln_b = randn(K, device=device, dtype=dtype), randn(K, device=device, dtype=dtype)
    w, b = randn(N, K, device=device, dtype=dtype, scale=K ** -0.5), randn(N, device=device, dtype=dtype)
    assert_close(backend.ops["layer_norm_linear"](x, ln_w, ln_b, w, b, activation),
                 reference.layer_norm_linear(x, ln_w, ln_b, w, b, activation))


@DTYPES
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (1, 2, 1, 1, 16, True),  # a single query and key
    (2, 3, 1, 1, 32, False),
    (2, 2, 13, 13, 16, True),
    (2, 3, 7, 7, 64, True), (2, 3, 7, 7, 64, False),
    (1, 1, 70, 70, 32, True), (2, 3, 70, 70, 32, False),  # crosses the 64-wide blocks
    (1, 1, 1, 9, 64, True), (2, 3, 1, 9, 64, False),  # a cached decode step sees every key
    (1, 2, 5, 67, 32, True), (1, 2, 5, 67, 128, True), (2, 3, 5, 67, 64, False),
    (2, 3, 9, 5, 32, True),  # the first Tq - Tk queries see no key: zeros
    (1, 2, 13, 9, 16, False),
    (2, 3, 3, 3, 128, False), (2, 3, 6, 6, 48, True),  # a head size that is not a power of two
])
def test_hierarchical_parity_tier1_attention(backend, dtype, B, H, Tq, Tk, D, causal):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    q, k, v = (randn(B, H, T, D, device=device, dtype=dtype) for T in (Tq, Tk, Tk))
    out = backend.ops["attention"](q, k, v, causal)
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, reference.attention(q, k, v, causal))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_hierarchical_parity_tier1_attention_rows_without_keys_are_zero(backend, scale):
    device, Tq, Tk = device_for(backend), 20, 7  # the first Tq - Tk queries sit before every key
    q, k = randn(1, 2, Tq, 16, device=device, scale=10), randn(1, 2, Tk, 16, device=device, scale=10)
    v = randn(1, 2, Tk, 16, device=device)
    out = backend.ops["attention"](q, k, v, True, scale)
    assert not out.isnan().any()
    assert (out[:, :, :Tq - Tk] == 0).all()
    assert_close(out, reference.attention(q, k, v, True, scale))


def test_hierarchical_parity_tier1_attention_strided_views_and_scale(backend):
    q, k, v = randn(2, 11, 3, 2, 32, device=device_for(backend)).permute(2, 0, 3, 1, 4)  # views of one qkv buffer
    assert_close(backend.ops["attention"](q, k, v, True, 0.3), reference.attention(q, k, v, True, 0.3))


@pytest.mark.parametrize("section", [1, 4, 6])
def test_hierarchical_parity_tier1_attention_in_any_section_of_heads(kernel_backend, monkeypatch, section):
    """The causal program order (looplm.kernels.attention_program) over 2 x 3 heads in sections of
    one head (head by head), of four (a short last section of two) and of all six: every query
    block of every head is computed once, in its own head."""
    attention = importlib.import_module(f"looplm_{kernel_backend.name}.attention")
    monkeypatch.setattr(attention, "attention_section", lambda heads, kv_bytes_per_head: section)
    q, k, v = (randn(2, 3, 70, 32, device=device_for(kernel_backend)) for _ in range(3))
    assert_close(kernel_backend.ops["attention"](q, k, v, True), reference.attention(q, k, v, True))


def test_hierarchical_parity_tier1_attention_into_strided_output(kernel_backend):
    """The block's path: head views of its qkv projection in, a (B, T, H, D) buffer's view out."""
    attention = importlib.import_module(f"looplm_{kernel_backend.name}.attention")
    qkv = randn(2, 11, 3, 2, 32, device=device_for(kernel_backend))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = torch.zeros(2, 11, 2, 32, device=qkv.device)
    attention.attention_into(q, k, v, out.transpose(1, 2), True, 0.2)
    assert_close(out.transpose(1, 2), reference.attention(q, k, v, scale=0.2))


def cache_with_garbage(B: int, H: int, Tk: int, D: int, key_len: list[int], device, dtype) -> tuple:
    """k, v (B, H, Tk, D) whose places past each row's key_len hold NaN and inf, as a cache's unfilled
    places may; attention with that key_len must never let them in."""
    k, v = (randn(B, H, Tk, D, device=device, dtype=dtype) for _ in range(2))
    for b, n in enumerate(key_len):
        k[b, :, n:], v[b, :, n:] = math.nan, math.inf
    return k, v


@DTYPES
@pytest.mark.parametrize("Tq,Tk,middle,causal", [
    (1, 9, 5, True), (1, 70, 67, False),  # a decode step; 67 ends inside the second 64-wide block
    (3, 9, 4, True), (3, 9, 4, False),  # a row of one key: its first two queries see none (zeros)
    (5, 70, 67, True), (5, 70, 33, True),
])
def test_hierarchical_parity_tier1_attention_key_len_per_row(backend, dtype, Tq, Tk, middle, causal):
    """Batch row b holds its first key_len[b] keys (0, 1, some, all Tk): each row equals the reference
    on its own keys, k[b, :, :key_len[b]], and the NaN and inf past them never reach it."""
    skip_unless_computes(backend, dtype, matmul=True)
    device, B, H, D, lengths = device_for(backend), 4, 2, 16, [0, 1, middle, Tk]
    q = randn(B, H, Tq, D, device=device, dtype=dtype)
    k, v = cache_with_garbage(B, H, Tk, D, lengths, device, dtype)
    key_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = backend.ops["attention"](q, k, v, causal, None, key_len)
    assert out.dtype == dtype and not out.isnan().any()
    for b, n in enumerate(lengths):
        assert_close(out[b:b + 1], reference.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal))
    assert (out[0] == 0).all()  # a row that holds no key: zeros
    assert_close(out, reference.attention(q, k, v, causal, None, key_len))  # the oracle keeps the garbage out too
    assert_close(out[3:], backend.ops["attention"](q[3:], k[3:], v[3:], causal))  # a full row: as without key_len


@pytest.mark.parametrize("Tq,causal", [(1, True), (3, True), (16, True), (16, False)])
def test_hierarchical_parity_tier1_triton_attention_decode_tiles(Tq, causal):
    """Triton's DECODE tiles (16-row query blocks, what a GPU launches up to DECODE_T queries; the
    interpreter otherwise runs its own tiles), with key_len over a cache with garbage past each
    row's keys: as the reference."""
    backend = backend_or_skip("triton")
    attention = importlib.import_module("looplm_triton.attention")
    device, B, H, Tk, D, lengths = device_for(backend), 4, 2, 70, 16, [0, 1, 33, 70]
    assert attention.default_config(Tq, D, torch.bfloat16, "sm_90") == attention.DECODE
    q = randn(B, H, Tq, D, device=device)
    k, v = cache_with_garbage(B, H, Tk, D, lengths, device, torch.float32)
    key_len = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = attention.attention_into(q, k, v, torch.empty_like(q), causal, D ** -0.5, attention.DECODE,
                                   key_len=key_len)
    assert_close(out, reference.attention(q, k, v, causal, None, key_len))


@pytest.mark.parametrize("bad,problem", [
    (lambda d: torch.tensor([1, 2, 3], dtype=torch.int32, device=d), "shape"),
    (lambda d: torch.tensor([[1, 2]], dtype=torch.int32, device=d), "shape"),
    (lambda d: torch.tensor([1, 2], dtype=torch.int64, device=d), "dtype"),
    (lambda d: torch.tensor([1.0, 2.0], device=d), "dtype"),
], ids=["too-many", "2-d", "int64", "float"])
def test_hierarchical_parity_tier1_attention_key_len_of_a_wrong_shape_or_dtype_is_refused(backend, bad, problem):
    device = device_for(backend)
    q, k, v = (randn(2, 2, T, 16, device=device) for T in (1, 5, 5))
    with pytest.raises(ValueError, match=r"attention: key_len must be \(2,\) torch.int32 \(one length per batch row\)"):
        backend.ops["attention"](q, k, v, True, None, bad(device))


def test_hierarchical_parity_tier1_attention_key_len_is_never_read_by_the_host(kernel_backend):
    """The launcher passes key_len to its kernel untouched: recorded (not run) on meta tensors, which
    have no values to read, the launch takes the very tensor, as a captured decode step needs."""
    from looplm.kernels import capture
    attention = importlib.import_module(f"looplm_{kernel_backend.name}.attention")
    q, k = torch.empty(2, 3, 1, 16, device="meta"), torch.empty(2, 3, 9, 16, device="meta")
    key_len = torch.empty(2, dtype=torch.int32, device="meta")
    for arch in ("sm_80", "sm_90"):  # Triton: the pointer kernel, then the descriptor one
        (launch,) = capture(attention.attention, q.bfloat16(), k.bfloat16(), k.bfloat16(), True, None, key_len,
                            arch=arch)
        args = launch.args.values() if kernel_backend.name == "triton" else launch[2]  # Triton's by name
        assert any(a is key_len for a in args)


@DTYPES
@pytest.mark.parametrize("rows,V,magnitude", [(1, 1, 1.0), (7, 65, 1.0), (1, 65, 4.0), (4, 100, 1e3),
                                              (4, 1000, 1e4), (2, 33, 1e-4), (5, 3000, 4.0), (3, 50257, 3.0)])
def test_hierarchical_parity_tier1_softmax_entropy(backend, dtype, rows, V, magnitude):
    skip_unless_computes(backend, dtype, matmul=False)
    logits = randn(rows, V, device=device_for(backend), scale=magnitude)
    logits[0, V // 2] += 30 * magnitude  # one sure row: entropy near 0, max probability near 1
    logits = logits.to(dtype)
    entropy, max_prob = backend.ops["softmax_entropy"](logits)
    expected_entropy, expected_max_prob = reference.softmax_entropy(logits)
    assert entropy.dtype == max_prob.dtype == torch.float32 and entropy.shape == (rows,)
    assert_close(entropy, expected_entropy, dtype=torch.float32)  # both compute in fp32 from the same logits
    assert_close(max_prob, expected_max_prob, dtype=torch.float32)


@DTYPES
def test_hierarchical_parity_tier1_softmax_entropy_leading_dims_and_large_logits(backend, dtype):
    skip_unless_computes(backend, dtype, matmul=False)
    logits = randn(2, 3, 300, device=device_for(backend), scale=2, offset=500).to(dtype)  # far from 0
    entropy, max_prob = backend.ops["softmax_entropy"](logits)
    assert entropy.shape == max_prob.shape == (2, 3)
    expected_entropy, expected_max_prob = reference.softmax_entropy(logits)
    assert_close(entropy, expected_entropy, dtype=torch.float32)
    assert_close(max_prob, expected_max_prob, dtype=torch.float32)


@DTYPES
@pytest.mark.parametrize("V", [65, 300, 5000])
def test_hierarchical_parity_tier1_softmax_entropy_minus_inf(backend, dtype, V):
    """-inf logits (masked vocabulary entries) have probability 0 and add nothing, never NaN; a row
    that is -inf but for one entry is sure: entropy 0, max probability 1."""
    skip_unless_computes(backend, dtype, matmul=False)
    inf = float("-inf")
    logits = randn(7, V, device=device_for(backend), scale=3)
    logits[0, :V // 3] = inf  # a masked prefix
    logits[1, ::2] = inf  # every other entry
    logits[2, V // 2 + 1:] = inf  # a masked tail
    for row, survivor, value in ((3, 17, 1.0), (4, V - 1, -5.0), (5, 0, 40.0)):  # all -inf but one
        logits[row] = inf
        logits[row, survivor] = value
    logits = logits.to(dtype)
    entropy, max_prob = backend.ops["softmax_entropy"](logits)
    assert torch.isfinite(entropy).all() and torch.isfinite(max_prob).all(), (entropy, max_prob)
    assert (entropy[3:6].abs() <= 1e-6).all() and (max_prob[3:6] == 1).all(), (entropy[3:6], max_prob[3:6])
    expected_entropy, expected_max_prob = reference.softmax_entropy(logits.double())
    assert_close(entropy, expected_entropy, dtype=torch.float32)
    assert_close(max_prob, expected_max_prob, dtype=torch.float32)


STEPS = [(1, 2, 4), (2, 1, 4), (3, 2, 3), (5, 1, 8), (2, 2, 5), (5, 1, 5), (3, 1, 9)]  # (step, min_loops, max_loops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,C", [(1, 1), (1, 8), (1, 33), (37, 50), (130, 600)])
def test_hierarchical_parity_tier1_halt_update(backend, dtype, N, C):
    """The state in the model's dtype, scores and per-token thresholds in fp32 (the op's contract):
    a bf16 or fp16 model halts on every backend."""
    device = device_for(backend)
    for step, min_loops, max_loops in STEPS:
        h, h_new = randn(N, C, device=device, dtype=dtype), randn(N, C, device=device, dtype=dtype)
        active = torch.rand(N, device=device) < 0.7
        steps = torch.randint(0, step, (N,), dtype=torch.int32, device=device)
        score, threshold = torch.rand(N, device=device), torch.rand(N, device=device)
        args = (h, h_new, active, steps, score, threshold, step, min_loops, max_loops)
        for got, want, name in zip(backend.ops["halt_update"](*args), reference.halt_update(*args),
                                   ("h", "active", "steps")):
            assert got.dtype == want.dtype and got.shape == want.shape, (name, step, min_loops, max_loops)
            assert torch.equal(got, want), (name, step, min_loops, max_loops)


@pytest.mark.parametrize("wrong,match", [
    (dict(steps=torch.zeros(3, dtype=torch.int64)), "steps must be"),
    (dict(score=torch.zeros(3, dtype=torch.bfloat16)), "score must be"),
    (dict(h_new=torch.zeros(3, 4, dtype=torch.bfloat16)), "must share one dtype"),
    (dict(active=torch.ones(4, dtype=torch.bool)), "active must be"),
], ids=["steps-int64", "score-bf16", "state-pair-dtypes", "active-shape"])
def test_halt_update_names_what_is_wrong(kernel_backend, wrong, match):
    device = device_for(kernel_backend)
    args = dict(h=torch.zeros(3, 4), h_new=torch.zeros(3, 4), active=torch.ones(3, dtype=torch.bool),
                steps=torch.zeros(3, dtype=torch.int32), score=torch.zeros(3), threshold=torch.zeros(3))
    args = {name: t.to(device) for name, t in {**args, **wrong}.items()}
    with pytest.raises(ValueError, match=match):
        kernel_backend.ops["halt_update"](**args, step=1, min_loops=1, max_loops=2)


def block_weights(C: int, bias: bool, dtype=torch.float32, device="cpu") -> BlockWeights:
    def t(*shape, scale=1.0, offset=0.0):
        return randn(*shape, device=device, dtype=dtype, scale=scale, offset=offset)
    maybe = (lambda *shape: t(*shape, scale=0.1)) if bias else (lambda *shape: None)
    return BlockWeights(t(C, scale=0.1, offset=1), maybe(C), t(3 * C, C, scale=C ** -0.5), maybe(3 * C),
                        t(C, C, scale=C ** -0.5), maybe(C), t(C, scale=0.1, offset=1), maybe(C),
                        t(4 * C, C, scale=C ** -0.5), maybe(4 * C), t(C, 4 * C, scale=(4 * C) ** -0.5), maybe(C))


@DTYPES
@pytest.mark.parametrize("B,T,C,H,bias", [(2, 13, 32, 2, True), (1, 1, 32, 2, True), (1, 9, 48, 3, False),
                                          (1, 9, 48, 3, True), (2, 13, 64, 2, True)])
def test_hierarchical_parity_tier1_block(backend, dtype, B, T, C, H, bias):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    x, weights = randn(B, T, C, device=device, dtype=dtype), block_weights(C, bias, dtype, device)
    out = backend.ops["block"](x, weights, H)
    assert out.dtype == dtype
    assert_close(out, reference.block(x, weights, H), composed=True)


# ---- tier 2: the looped core with halting

PLACEHOLDER = dict(entropy=1.0, confidence=0.5, delta=0.5, kl=0.1, gate=0.5)  # replaced per token below
NEVER = dict(entropy=0.0, confidence=1.0, delta=0.0, kl=0.0, gate=1.0)  # a threshold no score passes
LOOP_SHAPES = {"1L": dict(),
               "2L-prelude-coda-euler": dict(n_layer=2, n_prelude=1, n_coda=1, step_encoding="sinusoidal",
                                             update="euler", min_loops=2)}


def sharpened_model(criterion: str | None, dtype=torch.float32, device="cpu", **overrides) -> LoopGPT:
    """A tiny model with weights of about unit gain, in eval mode. At GPT's initialisation the blocks
    barely change the state and every readout is near uniform, so the logits would hardly depend on
    the core and all tokens' halting scores would crowd together."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=3, max_loops=4)
    if criterion is not None:
        cfg.update(halt=criterion, halt_threshold=PLACEHOLDER[criterion])
    model = LoopGPT(LoopConfig(**{**cfg, **overrides}))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model.to(device=device, dtype=dtype).eval()


def scores_per_loop(model: LoopGPT, x0: torch.Tensor, n_loops: int) -> list[torch.Tensor]:
    """The criterion's score (lower is surer) after each loop, every token running every loop."""
    h, prev_log_p, scores = model.initial_state(x0), None, []
    for t in range(1, n_loops + 1):
        h_new = model.update(h, model.core(model.inject(h, x0, torch.full(x0.shape[:2], t, device=x0.device))))
        score, _, log_p = halt_score(model, model.config.halt, h, h_new, model.head(h_new), prev_log_p)
        scores.append(score)
        h, prev_log_p = h_new, log_p
    return scores


def splitting_thresholds(model: LoopGPT, idx: torch.Tensor, loop: int = 2) -> torch.Tensor:
    """Per-token thresholds: for two thirds of the tokens, one in the widest gap of the oracle's
    scores at `loop` among the middle half (some halt there, some run on, none on the edge); the
    rest never halt early."""
    model.set_backend("reference")
    ranked = scores_per_loop(model, model.embed(idx), loop)[-1].flatten().float().sort().values
    n = ranked.numel()
    gaps = ranked[n // 4 + 1:3 * n // 4 + 1] - ranked[n // 4:3 * n // 4]
    assert gaps.max() > 1e-4 * ranked.abs().max(), f"the scores {ranked.tolist()} are too close to split cleanly"
    widest = n // 4 + int(gaps.argmax())
    value = ((ranked[widest] + ranked[widest + 1]) / 2).item()
    thresholds = torch.full(idx.shape, -value if model.config.halt in HIGHER_IS_SURER else value, device=idx.device)
    thresholds[:, ::3] = NEVER[model.config.halt]
    return thresholds


def loop_on(model: LoopGPT, backend, idx: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, LoopTrace]:
    trace = LoopTrace(steps=torch.empty(0))
    model.set_backend(backend)
    h = model.loop(model.embed(idx), idx, model.config.max_loops, True, thresholds, trace)
    return h, trace


def check_loop_parity(model: LoopGPT, backend: Backend, idx: torch.Tensor, dtype: torch.dtype,
                      min_matching: float) -> None:
    thresholds = splitting_thresholds(model, idx)
    h_ref, trace_ref = loop_on(model, "reference", idx, thresholds)
    h, trace = loop_on(model, backend, idx, thresholds)
    halt = model.config.halt
    assert trace_ref.steps.unique().numel() > 1, f"halting with {halt} did not separate the tokens"
    matching = (trace.steps == trace_ref.steps).float().mean().item()
    assert matching >= min_matching, f"{halt}: {matching:.1%} of tokens took the reference's steps"
    same = (trace.steps == trace_ref.steps).flatten()  # a token that stopped a loop apart has another state
    assert_close(h.flatten(0, 1)[same], h_ref.flatten(0, 1)[same], dtype=dtype, composed=True,
                 msg="final states of the tokens whose steps match")


@DTYPES
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("shape", list(LOOP_SHAPES))
def test_hierarchical_parity_tier2_loop_halting(backend, dtype, criterion, shape):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    model = sharpened_model(criterion, dtype, device, **LOOP_SHAPES[shape])
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    # bf16 rounding may move a token near its threshold by a loop: most take the oracle's steps
    check_loop_parity(model, backend, idx, dtype, min_matching=1.0 if dtype == torch.float32 else 0.9)


# ---- tier 3: the model

MODEL_SHAPES = {"1L": dict(),
                "2L-prelude-coda": dict(n_layer=2, n_prelude=1, n_coda=1, inject="norm_add",
                                        step_encoding="sinusoidal", update="euler")}


@DTYPES
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_hierarchical_parity_tier3_logits_and_loss(backend, dtype, shape):
    skip_unless_computes(backend, dtype, matmul=True)
    device = device_for(backend)
    model = sharpened_model(None, dtype, device, **MODEL_SHAPES[shape])
    idx, targets = torch.randint(0, 65, (2, 2, 11), generator=torch.Generator().manual_seed(3)).to(device)
    logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
    logits, loss = model.set_backend(backend)(idx, targets)
    assert logits.dtype == dtype
    assert_close(logits, logits_ref, dtype=dtype, composed=True)
    assert_close(loss, loss_ref, dtype=dtype, composed=True)


@pytest.mark.parametrize("criterion", ["entropy", "delta"])
def test_hierarchical_parity_tier3_halting_decisions(backend, criterion):
    device = device_for(backend)
    model = sharpened_model(criterion, device=device)
    idx = torch.randint(0, 65, (3, 10), generator=torch.Generator().manual_seed(2)).to(device)
    thresholds = splitting_thresholds(model, idx)
    logits_ref, _, trace_ref = model.set_backend("reference")(idx, thresholds=thresholds, return_trace=True)
    logits, _, trace = model.set_backend(backend)(idx, thresholds=thresholds, return_trace=True)
    assert trace_ref.steps.unique().numel() > 1
    assert torch.equal(trace.steps, trace_ref.steps)
    assert trace.loops_run == trace_ref.loops_run
    assert_close(logits, logits_ref, composed=True)


def test_hierarchical_parity_tier3_greedy_generation(backend):
    device = device_for(backend)
    model = sharpened_model("entropy", device=device)
    prompt = torch.randint(0, 65, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    expected = model.set_backend("reference").generate(prompt, 5, temperature=0)
    assert torch.equal(model.set_backend(backend).generate(prompt, 5, temperature=0), expected)


# ---- natively on a GPU, at the shipped model's shapes (batch 16, context 256, 384 wide, 6 heads)

GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
VOCABS = pytest.mark.parametrize("vocab", [65, 50304])


@GPU_ONLY
@GPU_DTYPES
@VOCABS
def test_hierarchical_parity_tier1_gpu_ops_at_shipped_shapes(backend, dtype, vocab):
    B, T, C, H = 16, 256, 384, 6
    g = dict(device=device_for(backend), dtype=dtype)
    ops = backend.ops
    x = torch.randn(B, T, C, **g)
    w_ln, b_ln = torch.randn(C, **g), torch.randn(C, **g)
    assert_close(ops["layer_norm"](x, w_ln, b_ln), reference.layer_norm(x, w_ln, b_ln))
    for N, K, activation in ((3 * C, C, "none"), (4 * C, C, "gelu"), (C, 4 * C, "none"), (vocab, C, "none")):
        xin, w, b = torch.randn(B * T, K, **g), torch.randn(N, K, **g) * K ** -0.5, torch.randn(N, **g)
        r = torch.randn(B * T, N, **g)
        assert_close(ops["linear"](xin, w, b, activation, r), reference.linear(xin, w, b, activation, r),
                     msg=f"linear {N}x{K} {activation}")
    q, k, v = (torch.randn(B, H, T, C // H, **g) for _ in range(3))
    assert_close(ops["attention"](q, k, v), reference.attention(q, k, v))
    logits = torch.randn(B * T, vocab, **g) * 4
    for got, expected in zip(ops["softmax_entropy"](logits), reference.softmax_entropy(logits)):
        assert_close(got, expected, dtype=dtype)
    rows = B * T
    args = (x.view(rows, C), torch.randn_like(x).view(rows, C), torch.rand(rows, device=x.device) < 0.5,
            torch.randint(0, 3, (rows,), device=x.device, dtype=torch.int32), torch.rand(rows, device=x.device),
            torch.rand(rows, device=x.device), 3, 2, 12)
    for got, want in zip(ops["halt_update"](*args), reference.halt_update(*args)):
        assert torch.equal(got, want)
    weights = block_weights(C, True, dtype, x.device)
    assert_close(ops["block"](x, weights, H), reference.block(x, weights, H), composed=True)


@GPU_ONLY
@GPU_DTYPES
@pytest.mark.parametrize("criterion", CRITERIA)
def test_hierarchical_parity_tier2_gpu_loop_halting(backend, dtype, criterion):
    model = sharpened_model(criterion, dtype, device_for(backend), block_size=256, n_embd=384, n_head=6,
                            n_loops=6, max_loops=6)
    idx = torch.randint(0, 65, (16, 256), device=device_for(backend))
    # bf16 rounding may move a token sitting near its threshold by one loop: allow 1% of tokens
    check_loop_parity(model, backend, idx, dtype, min_matching=1.0 if dtype == torch.float32 else 0.99)


@GPU_ONLY
@GPU_DTYPES
@VOCABS
def test_hierarchical_parity_tier3_gpu_model_at_shipped_shapes(backend, dtype, vocab):
    device = device_for(backend)
    model = sharpened_model(None, dtype, device, vocab_size=vocab, block_size=256, n_embd=384, n_head=6,
                            n_loops=4)
    idx, targets = (torch.randint(0, vocab, (16, 256), device=device) for _ in range(2))
    logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
    logits, loss = model.set_backend(backend)(idx, targets)
    assert_close(logits, logits_ref, dtype=dtype, composed=True)
    assert_close(loss, loss_ref, dtype=dtype, composed=True)
    if dtype == torch.float32:  # greedy tokens can flip on bf16 near-ties
        prompt = idx[:2, :32]
        expected = model.set_backend("reference").generate(prompt, 8, temperature=0)
        assert torch.equal(model.set_backend(backend).generate(prompt, 8, temperature=0), expected)
