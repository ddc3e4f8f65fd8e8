"""The reference ops against PyTorch's own implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

import reference
from reference.linear import gelu as reference_gelu
from looplm import torch_ops
from looplm.ops import BlockWeights
from looplm.testing import assert_close


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 33), (2, 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(shape, bias):
    x = torch.randn(shape) * 3 + 1
    w, b = torch.randn(shape[-1]), (torch.randn(shape[-1]) if bias else None)
    assert_close(reference.layer_norm(x, w, b), F.layer_norm(x, shape[-1:], w, b, eps=1e-5))


def test_layer_norm_large_values_and_dtype():
    x = torch.randn(4, 64) * 1e4
    w = torch.ones(64)
    y = reference.layer_norm(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y, F.layer_norm(x, (64,)), dtype=torch.bfloat16)


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, False), (True, False)])
def test_linear_matches_torch(activation, with_bias, with_residual):
    x = torch.randn(2, 3, 37)
    w = torch.randn(19, 37) / 6
    b = torch.randn(19) if with_bias else None
    r = torch.randn(2, 3, 19) if with_residual else None
    expected = F.linear(x, w, b)
    expected = F.gelu(expected) if activation == "gelu" else expected
    expected = expected + r if r is not None else expected
    assert_close(reference.linear(x, w, b, activation=activation, residual=r), expected)


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("norm_bias,bias", [(True, True), (False, False), (True, False)])
def test_layer_norm_linear_matches_torch(activation, norm_bias, bias):
    x = torch.randn(2, 3, 37) * 2 + 1
    ln_w, ln_b = torch.randn(37), (torch.randn(37) if norm_bias else None)
    w, b = torch.randn(19, 37) / 6, (torch.randn(19) if bias else None)
    expected = F.linear(F.layer_norm(x, (37,), ln_w, ln_b, eps=1e-5), w, b)
    expected = F.gelu(expected) if activation == "gelu" else expected
    assert_close(reference.layer_norm_linear(x, ln_w, ln_b, w, b, activation=activation), expected)


def test_layer_norm_linear_keeps_the_dtype_and_its_eps():
    x, ln_w, w = torch.randn(4, 16) * 1e-3, torch.ones(16), torch.randn(8, 16) / 4
    y = reference.layer_norm_linear(x.bfloat16(), ln_w.bfloat16(), None, w.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y, F.linear(F.layer_norm(x, (16,)), w), dtype=torch.bfloat16)
    # rows whose variance is of the order of eps: eps=1e-2 must reach the normalisation
    assert_close(reference.layer_norm_linear(x, ln_w, None, w, eps=1e-2), F.linear(F.layer_norm(x, (16,), eps=1e-2), w))


def test_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.linear(torch.randn(2, 4), torch.randn(3, 4), activation="relu")


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 8), (2, 3, 17, 16), (1, 2, 64, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(B, H, T, D, causal):
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    assert_close(reference.attention(q, k, v, causal=causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_attention_bottom_right_alignment_and_scale():
    # Tq < Tk: query i sits at position Tk - Tq + i, as in a cached decode step.
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    visible = torch.arange(10)[None, :] <= (torch.arange(3)[:, None] + 7)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.3)
    assert_close(reference.attention(q, k, v, causal=True, scale=0.3), expected)


def test_attention_rows_without_keys_are_zero_not_nan():
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    out = reference.attention(q, k, v, causal=True)  # queries 0 and 1 see no key
    assert torch.isfinite(out).all()
    assert (out[..., :2, :] == 0).all()
    assert_close(out[..., 2:, :], F.scaled_dot_product_attention(q[..., 2:, :], k, v, is_causal=True))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [1, 3])
def test_attention_key_len_reads_each_rows_filled_places_only(causal, Tq):
    """key_len: row b is attention over its first key_len[b] keys (bottom-right aligned to them), the
    places past it never read (NaN there changes nothing); a row that holds fewer keys than its
    earliest query needs returns zeros for the queries that see none."""
    Tk, held = 9, [0, 1, 2, 6, 9]
    q, k, v = torch.randn(5, 2, Tq, 8), torch.randn(5, 2, Tk, 8), torch.randn(5, 2, Tk, 8)
    for b, n in enumerate(held):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
    out = reference.attention(q, k, v, causal, 0.4, torch.tensor(held, dtype=torch.int32))
    for b, n in enumerate(held):
        seen = torch.arange(n)[None, :] <= torch.arange(Tq)[:, None] + n - Tq if causal else torch.ones(Tq, n).bool()
        expected = F.scaled_dot_product_attention(q[b], k[b, :, :n], v[b, :, :n], attn_mask=seen, scale=0.4)
        expected = expected.masked_fill(~seen.any(-1, keepdim=True), 0.0)
        assert_close(out[b], expected)


def test_attention_key_len_of_the_wrong_kind_is_refused():
    q = k = v = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match=r"key_len must be \(2,\) torch.int32"):
        reference.attention(q, k, v, key_len=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_len must be \(2,\) torch.int32"):
        reference.attention(q, k, v, key_len=torch.ones(1, dtype=torch.int32))


def test_attention_gradient_is_finite_with_empty_rows():
    q = torch.randn(1, 1, 5, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 4, requires_grad=True), torch.randn(1, 1, 3, 4, requires_grad=True)
    reference.attention(q, k, v).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("shape", [(1, 5), (3, 65), (2, 4, 1000)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_softmax_entropy_matches_categorical(shape, scale):
    logits = torch.randn(shape) * scale
    entropy, max_prob = reference.softmax_entropy(logits)
    dist = torch.distributions.Categorical(logits=logits.double())
    assert entropy.dtype == max_prob.dtype == torch.float32
    assert_close(entropy, dist.entropy())
    assert_close(max_prob, dist.probs.amax(-1))


def test_softmax_entropy_extremes():
    uniform = torch.zeros(2, 50257)
    entropy, max_prob = reference.softmax_entropy(uniform)
    assert_close(entropy, torch.full((2,), math.log(50257)))
    one_hot = torch.full((1, 100), -1e30)
    one_hot[0, 3] = 1e30
    entropy, max_prob = reference.softmax_entropy(one_hot)
    assert entropy.item() == 0.0 and max_prob.item() == 1.0


def test_halt_update_semantics():
    N, C = 6, 4
    h, h_new = torch.zeros(N, C), torch.ones(N, C)
    active = torch.tensor([True, True, True, True, False, True])
    steps = torch.tensor([2, 2, 2, 2, 1, 2], dtype=torch.int32)
    score = torch.tensor([0.1, 0.9, 0.1, 0.5, 0.0, 0.5])
    threshold = torch.tensor([0.5, 0.5, 0.05, 0.6, 1.0, 0.4])
    h_out, active_out, steps_out = reference.halt_update(h, h_new, active, steps, score, threshold, 3, 1, 10)
    assert torch.equal(active_out, torch.tensor([False, True, True, False, False, True]))
    assert torch.equal(steps_out, torch.tensor([3, 3, 3, 3, 1, 3], dtype=torch.int32))
    assert (h_out[4] == 0).all() and (h_out[[0, 1, 2, 3, 5]] == 1).all()
    assert (h == 0).all(), "inputs are left untouched"
    # below min_loops nothing halts on its score; at max_loops everything halts
    _, a, _ = reference.halt_update(h, h_new, active, steps, score, threshold, 3, 4, 10)
    assert torch.equal(a, active)
    _, a, _ = reference.halt_update(h, h_new, active, steps, score, threshold, 10, 1, 10)
    assert not a.any()


def test_halt_update_boundaries():
    """A token may halt after loop min_loops itself; a score equal to its threshold does not halt it."""
    h, h_new = torch.zeros(3, 2), torch.ones(3, 2)
    active, steps = torch.ones(3, dtype=torch.bool), torch.full((3,), 2, dtype=torch.int32)
    score, threshold = torch.tensor([0.1, 0.5, 0.9]), torch.full((3,), 0.5)
    _, a, _ = reference.halt_update(h, h_new, active, steps, score, threshold, 3, 3, 10)
    assert a.tolist() == [False, True, True]
    _, a, _ = reference.halt_update(h, h_new, active, steps, score, threshold, 2, 3, 10)
    assert a.all()


def random_block_weights(C: int) -> BlockWeights:
    return BlockWeights(*(torch.randn(*shape) / 4 for shape in [
        (C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]))


def test_block_matches_torch_modules():
    B, T, C, n_head = 2, 9, 24, 3
    w = random_block_weights(C)
    x = torch.randn(B, T, C)
    h = F.layer_norm(x, (C,), w.ln1_w, w.ln1_b)
    q, k, v = F.linear(h, w.attn_w, w.attn_b).split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    x1 = x + F.linear(y, w.proj_w, w.proj_b)
    expected = x1 + F.linear(F.gelu(F.linear(F.layer_norm(x1, (C,), w.ln2_w, w.ln2_b), w.fc_w, w.fc_b)), w.fc2_w, w.fc2_b)
    assert_close(reference.block(x, w, n_head), expected, composed=True)


def test_block_dropout_drops_the_two_residual_branches():
    B, T, C, n_head, p = 2, 5, 16, 2, 0.5
    w = random_block_weights(C)
    x = torch.randn(B, T, C)
    torch.manual_seed(1)
    h = F.layer_norm(x, (C,), w.ln1_w, w.ln1_b)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in F.linear(h, w.attn_w, w.attn_b).split(C, 2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    x1 = x + F.dropout(F.linear(y, w.proj_w, w.proj_b), p)
    hidden = F.gelu(F.linear(F.layer_norm(x1, (C,), w.ln2_w, w.ln2_b), w.fc_w, w.fc_b))
    expected = x1 + F.dropout(F.linear(hidden, w.fc2_w, w.fc2_b), p)
    for backend in (reference.OPS, torch_ops.OPS):
        torch.manual_seed(1)
        assert_close(backend["block"](x, w, n_head, dropout_p=p), expected, composed=True)
    assert not torch.allclose(reference.block(x, w, n_head, dropout_p=p), reference.block(x, w, n_head))


def test_mixed_dtypes_and_devices_are_refused():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"linear: floating tensors must share one dtype, got \{'x': torch.float32, "
                                         r"'weight': torch.bfloat16\}"):
        reference.linear(x, torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="layer_norm: all tensors must be on one device"):
        reference.layer_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="attention: floating tensors must share one dtype"):
        reference.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4).half(), torch.randn(1, 1, 2, 4))


def test_model_with_mixed_dtypes_is_refused():
    from looplm import LoopConfig, LoopGPT
    model = LoopGPT(LoopConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_loops=2), backend="reference")
    model.transformer.core[0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="must share one dtype"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_softmax_entropy_with_masked_logits():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    entropy, max_prob = reference.softmax_entropy(logits)
    assert_close(entropy, torch.tensor([math.log(2)]))
    assert max_prob.item() == 0.5


# The "torch" backend, what every CPU user runs, against the oracle: its own branches (attention
# with more or fewer queries than keys, masked logits, the halting boundaries) are not PyTorch's.

@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 9), (3, 10), (7, 7), (6, 4)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_hierarchical_parity_tier1_torch_backend_attention(Tq, Tk, causal, scale):
    q, k, v = torch.randn(2, 3, Tq, 8), torch.randn(2, 3, Tk, 8), torch.randn(2, 3, Tk, 8)
    assert_close(torch_ops.attention(q, k, v, causal=causal, scale=scale),
                 reference.attention(q, k, v, causal=causal, scale=scale))


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_hierarchical_parity_tier1_torch_backend_norms_and_linears(activation):
    x, r = torch.randn(2, 5, 24) * 2 + 1, torch.randn(2, 5, 40)
    ln_w, ln_b, w, b = torch.randn(24), torch.randn(24), torch.randn(40, 24) / 5, torch.randn(40)
    assert_close(torch_ops.layer_norm(x, ln_w, ln_b, eps=1e-3), reference.layer_norm(x, ln_w, ln_b, eps=1e-3))
    assert_close(torch_ops.linear(x, w, b, activation, r), reference.linear(x, w, b, activation, r))
    assert_close(torch_ops.layer_norm_linear(x, ln_w, ln_b, w, b, activation, eps=1e-3),
                 reference.layer_norm_linear(x, ln_w, ln_b, w, b, activation, eps=1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 2 * torch_ops.ATEN_GELU_BELOW // 512])
def test_torch_backend_gelu_is_the_exact_gelu_at_every_size_and_restores_the_onednn_switch(rows, dtype):
    """Small CPU tensors take ATen's kernel, large ones oneDNN's: both the exact erf GELU, and the
    process-wide oneDNN switch is back as it was, also when the call fails."""
    x = (torch.randn(rows, 512) * 3).to(dtype)
    assert torch.backends.mkldnn.enabled
    assert_close(torch_ops.gelu(x), reference_gelu(x.float()).to(dtype), dtype=dtype)
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):  # (NotImplementedError, a RuntimeError, in recent releases)
        torch_ops.gelu(x[:1].to(torch.int64))  # GELU takes floating point only: raised inside the switch
    assert torch.backends.mkldnn.enabled


def test_hierarchical_parity_tier1_torch_backend_softmax_entropy():
    logits = torch.randn(4, 1000) * torch.tensor([[1.0], [10.0], [100.0], [1e4]])
    logits[0, 500:] = float("-inf")
    for actual, expected in zip(torch_ops.softmax_entropy(logits), reference.softmax_entropy(logits)):
        assert_close(actual, expected)


@pytest.mark.parametrize("step,min_loops,max_loops", [(1, 1, 4), (2, 3, 4), (3, 3, 4), (4, 1, 4), (5, 1, 4)])
def test_hierarchical_parity_tier1_torch_backend_halt_update(step, min_loops, max_loops):
    N = 40
    h, h_new = torch.randn(N, 6), torch.randn(N, 6)
    active, steps = torch.rand(N) < 0.7, torch.randint(0, 3, (N,), dtype=torch.int32)
    score = torch.rand(N)
    threshold = torch.where(torch.arange(N) % 5 == 0, score, torch.rand(N))  # every fifth exactly on its score
    for actual, expected in zip(torch_ops.halt_update(h, h_new, active, steps, score, threshold, step, min_loops,
                                                      max_loops),
                                reference.halt_update(h, h_new, active, steps, score, threshold, step, min_loops,
                                                      max_loops)):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def test_hierarchical_parity_tier1_torch_backend_block():
    C = 24
    w = random_block_weights(C)
    x = torch.randn(2, 9, C)
    assert_close(torch_ops.block(x, w, 3), reference.block(x, w, 3), composed=True)


def test_assert_close_takes_the_dtypes_tolerance_and_never_passes_nan():
    expected = torch.ones(8)
    assert_close(expected + 5e-5, expected)
    with pytest.raises(AssertionError):
        assert_close(expected + 5e-3, expected)  # fine for bfloat16, not for float32
    assert_close((expected + 5e-3).bfloat16(), expected)
    assert_close(expected + 5e-3, expected, dtype=torch.bfloat16)
    assert_close(expected + 5e-4, expected, composed=True)
    with pytest.raises(AssertionError):
        assert_close(expected + 5e-4, expected)
    nan = torch.full((8,), float("nan"))
    with pytest.raises(AssertionError):
        assert_close(nan, nan)
    with pytest.raises(AssertionError, match="loop 3"):
        assert_close(expected + 1, expected, msg="loop 3")
