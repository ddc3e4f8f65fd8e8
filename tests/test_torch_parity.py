"""Tiers 1 to 3 for the fast "torch" backend against the oracle ("reference"), fp32 and bf16 on the
CPU; the fast backend under autocast and under torch.compile.

The fast backend computes in its inputs' dtype (bf16 matmuls round as PyTorch rounds them), the
oracle in fp32 inside: bf16 compares with the bf16 tolerances of looplm.testing.
"""
from __future__ import annotations

import pytest
import torch

import reference
from looplm import LoopConfig, LoopGPT, LoopTrace, get_backend
from looplm.engine import halt_score
from looplm.ops import BlockWeights
from looplm.testing import assert_close

TORCH = get_backend("torch").ops
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
CRITERIA = ("entropy", "confidence", "delta", "kl", "gate")


def scores_per_loop(model: LoopGPT, x0: torch.Tensor, n_loops: int) -> list[torch.Tensor]:
    """The criterion's score (lower is surer) after each loop, every token running every loop."""
    h, prev_log_p, scores = model.initial_state(x0), None, []
    for t in range(1, n_loops + 1):
        h_new = model.update(h, model.core(model.inject(h, x0, torch.full(x0.shape[:2], t, device=x0.device))))
        score, _, log_p = halt_score(model, model.config.halt, h, h_new, model.head(h_new), prev_log_p)
        scores.append(score)
        h, prev_log_p = h_new, log_p
    return scores


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def randn(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape) * scale + offset).to(dtype)


# ---- tier 1: each op

@DTYPES
@pytest.mark.parametrize("shape", [(1, 7), (37, 100), (3, 5, 48)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_hierarchical_parity_tier1_layer_norm(dtype, shape, with_bias):
    C = shape[-1]
    x, w = randn(*shape, dtype=dtype, scale=3, offset=20), randn(C, dtype=dtype)
    b = randn(C, dtype=dtype) if with_bias else None
    out = TORCH["layer_norm"](x, w, b)
    assert out.dtype == dtype
    assert_close(out, reference.layer_norm(x, w, b))


@DTYPES
@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (37, 65, 50)])
@pytest.mark.parametrize("activation,with_bias,with_residual",
                         [("none", False, False), ("none", True, True), ("gelu", True, False), ("gelu", False, True)])
def test_hierarchical_parity_tier1_linear(dtype, M, N, K, activation, with_bias, with_residual):
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype, scale=K ** -0.5)
    b = randn(N, dtype=dtype) if with_bias else None
    r = randn(M, N, dtype=dtype) if with_residual else None
    out = TORCH["linear"](x, w, b, activation, r)
    assert out.dtype == dtype
    assert_close(out, reference.linear(x, w, b, activation, r))


@DTYPES
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_hierarchical_parity_tier1_layer_norm_linear(dtype, activation):
    x = randn(29, 40, dtype=dtype, scale=2, offset=5)
    ln_w, ln_b, w, b = randn(40, dtype=dtype), randn(40, dtype=dtype), randn(96, 40, dtype=dtype, scale=40 ** -0.5), \
        randn(96, dtype=dtype)
    assert_close(TORCH["layer_norm_linear"](x, ln_w, ln_b, w, b, activation),
                 reference.layer_norm_linear(x, ln_w, ln_b, w, b, activation))


@DTYPES
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (1, 2, 1, 1, 16, True), (2, 2, 13, 13, 16, True), (1, 1, 1, 9, 64, True), (1, 2, 5, 67, 32, True),
    (1, 2, 20, 7, 16, True),  # the first Tq - Tk queries see no key: zeros
    (1, 2, 13, 9, 16, False),
])
def test_hierarchical_parity_tier1_attention(dtype, B, H, Tq, Tk, D, causal):
    q, k, v = randn(B, H, Tq, D, dtype=dtype), randn(B, H, Tk, D, dtype=dtype), randn(B, H, Tk, D, dtype=dtype)
    out = TORCH["attention"](q, k, v, causal)
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, reference.attention(q, k, v, causal))


def test_hierarchical_parity_tier1_attention_strided_views_and_scale():
    q, k, v = torch.randn(2, 11, 3, 2, 32).permute(2, 0, 3, 1, 4)
    assert_close(TORCH["attention"](q, k, v, True, 0.3), reference.attention(q, k, v, True, 0.3))


@DTYPES
@pytest.mark.parametrize("rows,V,magnitude", [(1, 1, 1.0), (7, 65, 1.0), (3, 5000, 3.0), (4, 100, 1e3)])
def test_hierarchical_parity_tier1_softmax_entropy(dtype, rows, V, magnitude):
    logits = randn(rows, V, dtype=dtype, scale=magnitude)
    for got, want in zip(TORCH["softmax_entropy"](logits), reference.softmax_entropy(logits)):
        assert got.dtype == torch.float32
        assert_close(got, want, dtype=torch.float32)  # both compute in fp32 from the same logits


@DTYPES
@pytest.mark.parametrize("step,min_loops,max_loops", [(1, 2, 4), (2, 1, 4), (3, 2, 3)])
def test_hierarchical_parity_tier1_halt_update(dtype, step, min_loops, max_loops):
    N, C = 37, 50
    args = (randn(N, C, dtype=dtype), randn(N, C, dtype=dtype), torch.rand(N) < 0.7,
            torch.randint(0, step, (N,), dtype=torch.int32), torch.rand(N), torch.rand(N), step, min_loops, max_loops)
    for got, want in zip(TORCH["halt_update"](*args), reference.halt_update(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _block_weights(C: int, dtype) -> BlockWeights:
    def t(*shape, scale=1.0, offset=0.0):
        return randn(*shape, dtype=dtype, scale=scale, offset=offset)
    return BlockWeights(t(C, scale=0.1, offset=1), t(C, scale=0.1), t(3 * C, C, scale=C ** -0.5), t(3 * C, scale=0.1),
                        t(C, C, scale=C ** -0.5), t(C, scale=0.1), t(C, scale=0.1, offset=1), t(C, scale=0.1),
                        t(4 * C, C, scale=C ** -0.5), t(4 * C, scale=0.1), t(C, 4 * C, scale=(4 * C) ** -0.5),
                        t(C, scale=0.1))


@DTYPES
@pytest.mark.parametrize("B,T,C,H", [(2, 13, 32, 2), (1, 1, 32, 2), (1, 9, 48, 3)])
def test_hierarchical_parity_tier1_block(dtype, B, T, C, H):
    x, weights = randn(B, T, C, dtype=dtype), _block_weights(C, dtype)
    assert_close(TORCH["block"](x, weights, H), reference.block(x, weights, H), composed=True)


# ---- tier 2: the looped core with halting

def _model(criterion: str, dtype=torch.float32, **overrides) -> LoopGPT:
    """A tiny model with weights of about unit gain (so that scores spread), in `dtype`."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=3, max_loops=4, halt=criterion,
               halt_threshold=dict(entropy=1.0, confidence=0.5, delta=0.5, kl=0.1, gate=0.5)[criterion])
    model = LoopGPT(LoopConfig(**{**cfg, **overrides}))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model.to(dtype).eval()


def _splitting_thresholds(model: LoopGPT, idx: torch.Tensor) -> torch.Tensor:
    """Per-token thresholds: for two thirds of the tokens, one in the widest gap of the oracle's
    scores at loop 2 (some halt there, some run on, none on the edge); the rest never halt early."""
    model.set_backend("reference")
    ranked = scores_per_loop(model, model.embed(idx), 2)[-1].flatten().float().sort().values
    n = ranked.numel()
    gaps = ranked[n // 4 + 1:3 * n // 4 + 1] - ranked[n // 4:3 * n // 4]
    widest = n // 4 + int(gaps.argmax())
    value = ((ranked[widest] + ranked[widest + 1]) / 2).item()
    value = -value if model.config.halt in ("confidence", "gate") else value
    thresholds = torch.full(idx.shape, value)
    thresholds[:, ::3] = dict(entropy=0.0, confidence=1.0, delta=0.0, kl=0.0, gate=1.0)[model.config.halt]
    return thresholds


@DTYPES
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("shape", [dict(), dict(n_layer=2, n_prelude=1, n_coda=1)], ids=["1L", "2L-prelude-coda"])
def test_hierarchical_parity_tier2_loop_halting(dtype, criterion, shape):
    model = _model(criterion, dtype, **shape)
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))
    thresholds = _splitting_thresholds(model, idx)
    results = {}
    for backend in ("reference", "torch"):
        trace = LoopTrace(steps=torch.empty(0))
        h = model.set_backend(backend).loop(model.embed(idx), idx, 4, True, thresholds, trace)
        results[backend] = (h, trace.steps)
    (h_ref, steps_ref), (h, steps) = results["reference"], results["torch"]
    assert len(steps_ref.unique()) > 1, f"halting with {criterion} did not separate the tokens"
    if dtype == torch.float32:
        assert torch.equal(steps, steps_ref)
        assert_close(h, h_ref, composed=True)
    else:  # bf16 rounding may move a token near its threshold by a loop: most take the oracle's steps
        assert (steps == steps_ref).float().mean() >= 0.9
        same = (steps == steps_ref).all(dim=1)
        assert_close(h[same], h_ref[same], dtype=dtype, composed=True)


# ---- tier 3: the model

@DTYPES
@pytest.mark.parametrize("shape", [dict(), dict(n_layer=2, n_prelude=1, n_coda=1, inject="norm_add",
                                                  step_encoding="sinusoidal", update="euler")],
                         ids=["1L", "2L-prelude-coda"])
def test_hierarchical_parity_tier3_logits_and_loss(dtype, shape):
    model = LoopGPT(LoopConfig(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=3, **shape)).to(dtype)
    idx, targets = torch.randint(0, 65, (2, 2, 11))
    logits_ref, loss_ref = model.set_backend("reference").eval()(idx, targets)
    logits, loss = model.set_backend("torch")(idx, targets)
    assert logits.dtype == dtype
    assert_close(logits, logits_ref, dtype=dtype, composed=True)
    assert_close(loss, loss_ref, dtype=dtype, composed=True)


def test_hierarchical_parity_tier3_halting_decisions_and_greedy_generation():
    model = _model("entropy")
    idx = torch.randint(0, 65, (2, 10), generator=torch.Generator().manual_seed(2))
    thresholds = _splitting_thresholds(model, idx)
    _, _, trace_ref = model.set_backend("reference")(idx, thresholds=thresholds, return_trace=True)
    _, _, trace = model.set_backend("torch")(idx, thresholds=thresholds, return_trace=True)
    assert trace_ref.steps.unique().numel() > 1
    assert torch.equal(trace.steps, trace_ref.steps)
    prompt = idx[:, :6]
    expected = model.set_backend("reference").generate(prompt, 5, temperature=0)
    assert torch.equal(model.set_backend("torch").generate(prompt, 5, temperature=0), expected)


# ---- autocast and torch.compile

def test_autocast_bf16_matches_the_oracle():
    """fp32 weights under CPU bf16 autocast: the matmuls run in bf16, within bf16's tolerance of
    the fp32 oracle, and gradients flow."""
    torch.manual_seed(0)
    model = LoopGPT(LoopConfig(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=3, n_coda=1)).eval()
    idx, targets = torch.randint(0, 65, (2, 2, 11))
    logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
    model.set_backend("torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, logits_ref, dtype=torch.bfloat16, composed=True)
    assert_close(loss, loss_ref, dtype=torch.bfloat16, composed=True)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model.train()(idx, targets)
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.transformer.core.parameters())


def test_torch_compile_of_a_tiny_forward_matches_eager():
    torch.manual_seed(0)
    model = LoopGPT(LoopConfig(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=2)).eval()
    idx, targets = torch.randint(0, 65, (2, 2, 8))
    expected_logits, expected_loss = model(idx, targets)
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(idx, targets)
    assert_close(logits, expected_logits)
    assert_close(loss, expected_loss)
