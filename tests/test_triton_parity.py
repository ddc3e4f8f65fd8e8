"""Tiers 1 to 3 for the Triton backend against the oracle ("reference") backend.

On a CPU machine the kernels run in Triton's interpreter, in fp32, at tiny shapes. On a GPU the
same tiers run natively in fp32 and bf16 at the shipped model's shapes (the `gpu` tests).
Kernels run only without gradients (`looplm.backends`), hence torch.no_grad() throughout.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import reference  # noqa: E402
from looplm import LoopConfig, LoopGPT, get_backend  # noqa: E402
from looplm.config import HIGHER_IS_SURER  # noqa: E402
from looplm.ops import OP_NAMES, BlockWeights, signature_mismatch  # noqa: E402
from looplm.testing import assert_close  # noqa: E402
from looplm_triton.linear import layer_norm_linear  # noqa: E402
from tests.test_torch_parity import scores_per_loop  # noqa: E402

TRITON = get_backend("triton").ops
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: native Triton kernels at "
                                                                     "realistic shapes, fp32 and bf16")
GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
CRITERIA = ("entropy", "confidence", "delta", "kl", "gate")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_triton_backend_ops_match_the_signatures():
    backend = get_backend("triton")
    assert set(backend.ops) == set(OP_NAMES)
    assert [signature_mismatch(name, backend.ops[name]) for name in OP_NAMES] == [None] * len(OP_NAMES)
    assert backend.mode == ("native" if torch.cuda.is_available() else "interpreted")


# ---- tier 1: each kernel against its reference op

@pytest.mark.parametrize("shape", [(1, 7), (37, 100), (3, 5, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_hierarchical_parity_tier1_layer_norm(shape, with_bias):
    C = shape[-1]
    x = torch.randn(shape) * 3 + 20  # an offset mean: the variance must be taken about it
    w, b = torch.randn(C), (torch.randn(C) if with_bias else None)
    assert_close(TRITON["layer_norm"](x, w, b), reference.layer_norm(x, w, b))


@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (37, 65, 50), (33, 130, 64)])
@pytest.mark.parametrize("activation,with_bias,with_residual",
                         [("none", False, False), ("none", True, True), ("gelu", True, False), ("gelu", False, True)])
def test_hierarchical_parity_tier1_linear(M, N, K, activation, with_bias, with_residual):
    x, w = torch.randn(M, K), torch.randn(N, K) * K ** -0.5
    b = torch.randn(N) if with_bias else None
    r = torch.randn(M, N) if with_residual else None
    assert_close(TRITON["linear"](x, w, b, activation, r), reference.linear(x, w, b, activation, r))


def test_hierarchical_parity_tier1_linear_batched_input():
    x, w, b, r = torch.randn(2, 3, 40), torch.randn(24, 40) * 0.2, torch.randn(24), torch.randn(2, 3, 24)
    assert_close(TRITON["linear"](x, w, b, "gelu", r), reference.linear(x, w, b, "gelu", r))


@pytest.mark.parametrize("M,N,K", [(1, 9, 16), (29, 96, 40)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_hierarchical_parity_tier1_layer_norm_linear(M, N, K, activation):
    x = torch.randn(M, K) * 2 + 5
    ln_w, ln_b, w, b = torch.randn(K), torch.randn(K), torch.randn(N, K) * K ** -0.5, torch.randn(N)
    expected = reference.linear(reference.layer_norm(x, ln_w, ln_b), w, b, activation)
    assert_close(layer_norm_linear(x, ln_w, ln_b, w, b, activation), expected)


def test_linear_refuses_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        TRITON["linear"](torch.randn(2, 4), torch.randn(3, 4), activation="relu")


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (1, 2, 1, 1, 16, True),  # a single query and key
    (2, 2, 13, 13, 16, True),
    (1, 1, 70, 70, 32, True),  # crosses the 64-wide blocks
    (1, 1, 1, 9, 64, True),  # a cached decode step sees every key
    (1, 2, 5, 67, 128, True),
    (1, 2, 13, 9, 16, False),
])
def test_hierarchical_parity_tier1_attention(B, H, Tq, Tk, D, causal):
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, H, Tk, D), torch.randn(B, H, Tk, D)
    assert_close(TRITON["attention"](q, k, v, causal), reference.attention(q, k, v, causal))


def test_hierarchical_parity_tier1_attention_rows_without_keys_are_zero():
    Tq, Tk = 20, 7  # the first Tq - Tk queries sit before every key
    q, k, v = torch.randn(1, 2, Tq, 16) * 10, torch.randn(1, 2, Tk, 16) * 10, torch.randn(1, 2, Tk, 16)
    out = TRITON["attention"](q, k, v)
    assert not out.isnan().any()
    assert (out[:, :, :Tq - Tk] == 0).all()
    assert_close(out, reference.attention(q, k, v))


def test_hierarchical_parity_tier1_attention_strided_views_and_scale():
    qkv = torch.randn(2, 11, 3, 2, 32).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D) views of one buffer
    q, k, v = qkv
    assert_close(TRITON["attention"](q, k, v, True, 0.3), reference.attention(q, k, v, True, 0.3))


@pytest.mark.parametrize("rows,V,magnitude", [(1, 1, 1.0), (7, 65, 1.0), (3, 50257, 3.0), (4, 1000, 1e4),
                                              (2, 33, 1e-4)])
def test_hierarchical_parity_tier1_softmax_entropy(rows, V, magnitude):
    logits = torch.randn(rows, V) * magnitude
    entropy, max_prob = TRITON["softmax_entropy"](logits)
    expected_entropy, expected_max_prob = reference.softmax_entropy(logits)
    assert entropy.dtype == max_prob.dtype == torch.float32
    assert_close(entropy, expected_entropy)
    assert_close(max_prob, expected_max_prob)


def test_hierarchical_parity_tier1_softmax_entropy_leading_dims_and_masked_logits():
    logits = torch.randn(2, 3, 300)
    logits[0, 0, :100] = float("-inf")  # masked vocabulary entries have probability 0, not NaN
    entropy, max_prob = TRITON["softmax_entropy"](logits)
    assert entropy.shape == max_prob.shape == (2, 3)
    finite = logits.masked_fill(logits.isinf(), -1e30)
    expected_entropy, expected_max_prob = reference.softmax_entropy(finite)
    assert_close(entropy, expected_entropy)
    assert_close(max_prob, expected_max_prob)


@pytest.mark.parametrize("step,min_loops,max_loops", [(1, 2, 4), (2, 1, 4), (3, 2, 3), (5, 1, 8)])
@pytest.mark.parametrize("N,C", [(1, 8), (37, 50)])
def test_hierarchical_parity_tier1_halt_update(step, min_loops, max_loops, N, C):
    h, h_new = torch.randn(N, C), torch.randn(N, C)
    active = torch.rand(N) < 0.7
    steps = torch.randint(0, step, (N,), dtype=torch.int32)
    score, threshold = torch.rand(N), torch.rand(N)  # per-token thresholds
    got = TRITON["halt_update"](h, h_new, active, steps, score, threshold, step, min_loops, max_loops)
    expected = reference.halt_update(h, h_new, active, steps, score, threshold, step, min_loops, max_loops)
    for g, e, name in zip(got, expected, ("h", "active", "steps")):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.equal(g, e), name


def test_halt_update_names_a_wrong_dtype():
    with pytest.raises(ValueError, match="steps must be"):
        TRITON["halt_update"](torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, dtype=torch.bool),
                              torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3), 1, 1, 2)


def _block_weights(C: int, bias: bool, dtype=torch.float32, device="cpu") -> BlockWeights:
    def t(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
    return BlockWeights(1 + t(C, scale=0.1), t(C, scale=0.1) if bias else None, t(3 * C, C, scale=C ** -0.5),
                        t(3 * C, scale=0.1) if bias else None, t(C, C, scale=C ** -0.5),
                        t(C, scale=0.1) if bias else None, 1 + t(C, scale=0.1), t(C, scale=0.1) if bias else None,
                        t(4 * C, C, scale=C ** -0.5), t(4 * C, scale=0.1) if bias else None,
                        t(C, 4 * C, scale=(4 * C) ** -0.5), t(C, scale=0.1) if bias else None)


@pytest.mark.parametrize("B,T,C,H,bias", [(2, 13, 32, 2, True), (1, 1, 32, 2, True), (1, 9, 48, 3, False)])
def test_hierarchical_parity_tier1_block(B, T, C, H, bias):
    x, weights = torch.randn(B, T, C), _block_weights(C, bias)
    assert_close(TRITON["block"](x, weights, H), reference.block(x, weights, H), composed=True)


# ---- tier 2: the looped core with halting

def _tiny_config(**overrides) -> LoopConfig:
    settings = dict(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_layer=1, n_loops=3)
    return LoopConfig(**{**settings, **overrides})


def _sharpened(config: LoopConfig, device=DEVICE, dtype=torch.float32) -> LoopGPT:
    """The model with weights of about unit gain, in eval mode. At GPT's initialisation the blocks
    barely change the state and every readout is near uniform, so the logits would hardly depend on
    the core, and all tokens' halting scores (gates alike) would crowd together."""
    model = LoopGPT(config, backend="torch")
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model.to(device=device, dtype=dtype).eval()


def _model(criterion: str, device=DEVICE, dtype=torch.float32, **overrides) -> LoopGPT:
    placeholder = dict(entropy=1.0, confidence=0.5, delta=0.5, kl=0.1, gate=0.5)[criterion]
    return _sharpened(_tiny_config(halt=criterion, halt_threshold=placeholder, **overrides), device, dtype)




def _threshold_splitting(model: LoopGPT, x0: torch.Tensor, idx: torch.Tensor, loop: int) -> float:
    """A threshold (criterion units) in the widest gap between the reference's scores at `loop`
    among the middle half of the tokens: some tokens halt there, others run on, none is on the edge."""
    model.set_backend("reference")
    ranked = scores_per_loop(model, x0, loop)[-1].flatten().float().sort().values
    n = ranked.numel()
    gaps = ranked[n // 4 + 1:3 * n // 4 + 1] - ranked[n // 4:3 * n // 4]
    widest = n // 4 + int(gaps.argmax())
    assert gaps.max() > 1e-4 * ranked.abs().max(), f"the scores {ranked.tolist()} are too close to split the tokens cleanly"
    threshold = ((ranked[widest] + ranked[widest + 1]) / 2).item()
    return -threshold if model.config.halt in HIGHER_IS_SURER else threshold


def _loop_on(model: LoopGPT, backend: str, x0, idx, n_loops: int, thresholds):
    from looplm.model import LoopTrace
    trace = LoopTrace(steps=torch.empty(0))
    h = model.set_backend(backend).loop(x0, idx, n_loops, halting=True, thresholds=thresholds, trace=trace)
    return h, trace


def _check_loop_parity(model: LoopGPT, idx: torch.Tensor, dtype: torch.dtype, min_matching: float = 1.0):
    cfg = model.config
    x0 = model.set_backend("reference").embed(idx)
    thresholds = torch.full(idx.shape, _threshold_splitting(model, x0, idx, loop=2), device=idx.device)
    h_ref, trace_ref = _loop_on(model, "reference", x0, idx, cfg.max_loops, thresholds)
    h, trace = _loop_on(model, "triton", x0, idx, cfg.max_loops, thresholds)
    assert trace_ref.steps.unique().numel() > 1, f"halting with {cfg.halt} did not separate the tokens"
    matching = (trace.steps == trace_ref.steps).float().mean().item()
    assert matching >= min_matching, f"{cfg.halt}: {matching:.1%} of tokens took the reference's steps"
    same = trace.steps == trace_ref.steps  # a token that stopped a loop apart has another state
    assert_close(h[same], h_ref[same], dtype=dtype, composed=True, msg="final states of the tokens whose steps match")


@pytest.mark.parametrize("criterion", CRITERIA)
def test_hierarchical_parity_tier2_loop_halting(criterion):
    model = _model(criterion, max_loops=4, min_loops=2 if criterion == "delta" else 1)
    _check_loop_parity(model, torch.randint(0, 65, (2, 12), device=DEVICE), torch.float32)


# ---- tier 3: the model

def test_hierarchical_parity_tier3_logits_and_loss():
    model = _sharpened(_tiny_config(inject="norm_add", step_encoding="sinusoidal", update="euler"))
    idx, targets = torch.randint(0, 65, (2, 11), device=DEVICE), torch.randint(0, 65, (2, 11), device=DEVICE)
    logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
    logits, loss = model.set_backend("triton")(idx, targets)
    assert_close(logits, logits_ref, composed=True)
    assert_close(loss, loss_ref, composed=True)


def test_hierarchical_parity_tier3_halting_decisions_and_greedy_generation():
    model = _model("entropy", max_loops=4)
    idx = torch.randint(0, 65, (2, 10), device=DEVICE)
    x0 = model.set_backend("reference").embed(idx)
    thresholds = torch.full(idx.shape, _threshold_splitting(model, x0, idx, loop=2), device=DEVICE)
    _, _, trace_ref = model.set_backend("reference")(idx, thresholds=thresholds, return_trace=True)
    _, _, trace = model.set_backend("triton")(idx, thresholds=thresholds, return_trace=True)
    assert trace_ref.steps.unique().numel() > 1
    assert torch.equal(trace.steps, trace_ref.steps)
    prompt = idx[:, :6]
    expected = model.set_backend("reference").generate(prompt, 3, temperature=0)
    assert torch.equal(model.set_backend("triton").generate(prompt, 3, temperature=0), expected)


# ---- the same tiers natively on a GPU, at the shipped model's shapes

@GPU_ONLY
@GPU_DTYPES
@pytest.mark.parametrize("vocab", [65, 50304])
def test_hierarchical_parity_tier1_gpu_kernels(dtype, vocab):
    B, T, C, H = 16, 256, 384, 6
    g = dict(device="cuda", dtype=dtype)
    x = torch.randn(B, T, C, **g)
    w_ln, b_ln = torch.randn(C, **g), torch.randn(C, **g)
    assert_close(TRITON["layer_norm"](x, w_ln, b_ln), reference.layer_norm(x, w_ln, b_ln))
    for N, K, activation in ((3 * C, C, "none"), (4 * C, C, "gelu"), (C, 4 * C, "none"), (vocab, C, "none")):
        xin, w, b = torch.randn(B * T, K, **g), torch.randn(N, K, **g) * K ** -0.5, torch.randn(N, **g)
        r = torch.randn(B * T, N, **g)
        assert_close(TRITON["linear"](xin, w, b, activation, r), reference.linear(xin, w, b, activation, r))
    q, k, v = (torch.randn(B, H, T, C // H, **g) for _ in range(3))
    assert_close(TRITON["attention"](q, k, v), reference.attention(q, k, v))
    logits = torch.randn(B * T, vocab, **g) * 4
    for got, expected in zip(TRITON["softmax_entropy"](logits), reference.softmax_entropy(logits)):
        assert_close(got, expected, dtype=dtype)
    weights = _block_weights(C, True, dtype, "cuda")
    assert_close(TRITON["block"](x, weights, H), reference.block(x, weights, H), composed=True)


@GPU_ONLY
@GPU_DTYPES
@pytest.mark.parametrize("criterion", CRITERIA)
def test_hierarchical_parity_tier2_gpu_loop_halting(dtype, criterion):
    model = _model(criterion, "cuda", dtype, vocab_size=65, block_size=256, n_embd=384, n_head=6, n_loops=6,
                   max_loops=6)
    idx = torch.randint(0, 65, (16, 256), device="cuda")
    # bf16 rounding may move a token sitting near its threshold by one loop: allow 1% of tokens
    _check_loop_parity(model, idx, dtype, min_matching=1.0 if dtype == torch.float32 else 0.99)


@GPU_ONLY
@GPU_DTYPES
@pytest.mark.parametrize("vocab", [65, 50304])
def test_hierarchical_parity_tier3_gpu_model(dtype, vocab):
    cfg = _tiny_config(vocab_size=vocab, block_size=256, n_embd=384, n_head=6, n_loops=4)
    model = _sharpened(cfg, "cuda", dtype)
    idx, targets = (torch.randint(0, vocab, (16, 256), device="cuda") for _ in range(2))
    logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
    logits, loss = model.set_backend("triton")(idx, targets)
    assert_close(logits, logits_ref, dtype=dtype, composed=True)
    assert_close(loss, loss_ref, dtype=dtype, composed=True)
    if dtype == torch.float32:  # greedy tokens can flip on bf16 near-ties
        prompt = idx[:2, :32]
        expected = model.set_backend("reference").generate(prompt, 8, temperature=0)
        assert torch.equal(model.set_backend("triton").generate(prompt, 8, temperature=0), expected)
