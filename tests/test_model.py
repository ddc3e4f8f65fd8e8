"""LoopGPT: the loop, halting, numerics, gradients, parameter counts and input errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from looplm import LoopConfig, LoopGPT, LoopTrace, get_backend
from looplm import backends
from looplm.halting import relative_change
from looplm.model import Block, LayerNorm, sample_next_token
from looplm.testing import assert_close, device_for


def tiny(**overrides) -> LoopConfig:
    base = dict(vocab_size=17, block_size=16, n_embd=32, n_head=4, n_layer=1, n_loops=4)
    return LoopConfig(**{**base, **overrides})


def tokens(B=2, T=12, V=17):
    return torch.randint(0, V, (B, T))


def test_forward_shapes_and_nanogpt_call():
    model = LoopGPT(tiny())
    idx = tokens()
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, 17) and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 17) and loss is None


@pytest.mark.parametrize("overrides", [
    dict(inject="add", step_encoding="learned", update="euler"),
    dict(inject="norm_add", step_encoding="sinusoidal", state_init="noise"),
    dict(inject="none", state_init="embed", n_prelude=1, n_coda=1),
    dict(n_layer=2, n_loops=3, n_coda=1, halt="gate", halt_threshold=0.5),
])
def test_gradient_reaches_the_core_from_every_loop(overrides):
    """Each loop's core input gets a gradient: a write that cut the graph would leave one without."""
    model = LoopGPT(tiny(**overrides))
    inputs = []
    core_forward = model.transformer.core[0].forward

    def keep_input(u, *args, **kwargs):
        u.retain_grad()
        inputs.append(u)
        return core_forward(u, *args, **kwargs)
    model.transformer.core[0].forward = keep_input
    idx = tokens()
    _, loss = model(idx, idx)
    loss.backward()
    assert len(inputs) == model.config.n_loops
    for t, u in enumerate(inputs, start=1):
        assert u.grad is not None and u.grad.abs().sum() > 0, f"no gradient reaches loop {t}"
    core_w = model.transformer.core[0].attn.c_attn.weight
    assert core_w.grad is not None and core_w.grad.abs().sum() > 0


def test_gpt_is_the_same_code_path():
    """n_loops=1 with zeros + add is exactly a GPT: each loop sees x0 only in loop 1."""
    gpt = LoopGPT(tiny(n_layer=3, n_loops=1))
    idx = tokens()
    x = gpt.embed(idx)
    for blk in gpt.transformer.core:
        x = blk(x)
    expected = gpt.head(x)
    logits, _ = gpt(idx, idx)
    torch.testing.assert_close(logits, expected)


def test_modules_are_nanogpts_with_forwards():
    """Every module computes when called (containers aside); a block is x + attn(ln_1(x)), then
    + mlp(ln_2(x)), the composition of its own modules, in one fused op."""
    model = LoopGPT(tiny(n_prelude=1, n_coda=1, inject="norm_add"))
    x = torch.randn(2, 5, 32)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList, LoopGPT)):
            continue
        probe = torch.randint(0, 17, (2, 5)) if isinstance(module, torch.nn.Embedding) else \
            torch.randn(2, 5, module.in_features) if isinstance(module, torch.nn.Linear) else x
        assert module(probe).shape[:2] == (2, 5), name
    blk = model.transformer.core[0]
    y = x + blk.attn(blk.ln_1(x))
    assert_close(blk(x), y + blk.mlp(blk.ln_2(y)), composed=True)
    ln = LayerNorm(32, bias=False)
    assert_close(ln(x), F.layer_norm(x, (32,), ln.weight))


def test_default_config_is_the_shakespeare_looplm_1x12():
    model = LoopGPT()
    cfg = model.config
    shape = (cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.n_loops)
    assert shape == (65, 256, 384, 6, 1, 12)
    assert LoopGPT(backend="reference").backend.name == "reference"
    with pytest.raises(TypeError, match="config must be a LoopConfig or None.*backend="):
        LoopGPT("tile")


def test_default_config_on_the_tile_backend():
    """`LoopGPT(backend="tile")` as written: construct, and one tiny forward in the emulator."""
    availability = backends.available_backends()["tile"]
    if not availability.available:
        pytest.skip(f"backend 'tile' is unavailable here: {availability.reason}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "backend 'tile' runs its cuTile kernels in the CPU emulator")
        model = LoopGPT(backend="tile").eval().to(device_for("tile"))
        assert all(m.backend.name == "tile" for m in model.modules() if isinstance(m, (Block, LayerNorm)))
        idx = torch.randint(0, 65, (1, 3), device=device_for("tile"))
        with torch.no_grad():
            logits, _ = model(idx, n_loops=2)
            expected, _ = model.set_backend("reference")(idx, n_loops=2)
    assert_close(logits, expected, composed=True)


def test_kernel_backend_in_eval_with_gradients_warns_once(monkeypatch):
    """Eval mode with gradients enabled runs the torch ops, not the kernels: say so, once."""
    monkeypatch.setattr(backends, "_WARNED_HYBRID", set())
    try:
        triton = get_backend("triton")
    except backends.BackendUnavailable as e:
        pytest.skip(f"backend 'triton' is unavailable here: {e}")
    model = LoopGPT(tiny(), backend=triton).eval().to(device_for(triton))
    idx = tokens(1, 4).to(device_for(triton))
    with pytest.warns(UserWarning, match=r"eval mode but gradients are enabled.*torch.no_grad\(\) or "
                                         r"torch.inference_mode\(\)"):
        model(idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(idx)  # once only
        with torch.no_grad():
            model(idx)  # the kernels run: nothing to say
        model.train()(idx, idx)  # training differentiates through the torch ops, as documented
    assert backends.hybrid_ops(get_backend("torch"), "eval") == []


def test_parameter_counts_gpt12l_and_looplm_1x12():
    V, T, C = 65, 256, 384
    per_block = 12 * C * C + 13 * C  # qkv, proj, fc, fc2 weights and biases, two LayerNorms
    shared = V * C + 2 * C  # tied embedding + ln_f (wpe excluded, as nanoGPT counts)
    gpt = LoopGPT(LoopConfig(vocab_size=V, block_size=T, n_embd=C, n_head=6, n_layer=12, n_loops=1))
    loop = LoopGPT(LoopConfig(vocab_size=V, block_size=T, n_embd=C, n_head=6, n_layer=1, n_loops=12))
    assert gpt.get_num_params() == 12 * per_block + shared == 21_319_296
    assert loop.get_num_params() == per_block + shared == 1_800_192
    assert gpt.get_num_params(non_embedding=False) == gpt.get_num_params() + T * C


# ---- halting

def halting_model(criterion="entropy", threshold=2.0, **overrides) -> LoopGPT:
    model = LoopGPT(tiny(halt=criterion, halt_threshold=threshold, **overrides))
    return model.eval()


# A threshold no score passes (criterion units): tokens given it think to max_loops.
NEVER = {"entropy": 0.0, "confidence": 1.0, "delta": 0.0, "kl": 0.0, "gate": 1.0}


@pytest.mark.parametrize("criterion", sorted(NEVER))
def test_each_criterion_halts_tokens_and_freezes_them(criterion):
    from tests.test_adaptive import CRITERIA, sharpened_model
    model = sharpened_model(criterion, max_loops=6)
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(2))
    thresholds = torch.full(idx.shape, CRITERIA[criterion])
    thresholds[:, ::3] = NEVER[criterion]  # every third token never halts early
    with torch.no_grad():
        _, _, trace = model(idx, idx, return_trace=True, thresholds=thresholds)
    steps = trace.steps
    assert steps.min() >= 1 and steps.max() <= 6
    assert (steps[:, ::3] == 6).all(), "a token whose threshold no score passes halted early"
    assert (steps < 6).any(), f"{criterion}: no token halted before max_loops"
    assert trace.loops_run == steps.max()
    # steps equal the number of loops in which the token was active
    assert torch.equal(torch.stack(trace.active).sum(0).int(), steps)
    # once halted, a token's state does not change
    for t in range(1, trace.loops_run):
        halted = ~trace.active[t]
        assert (trace.delta[t][halted] == 0).all()


def test_thresholds_decide_how_long_tokens_think():
    model = halting_model("entropy", 0.0, max_loops=5)  # entropy is never below 0: every token runs to max
    idx = tokens(2, 10)
    with torch.no_grad():
        _, _, trace = model(idx, idx, return_trace=True)
        assert (trace.steps == 5).all()
        _, _, trace = model(idx, idx, return_trace=True, thresholds=torch.full(idx.shape, 100.0))
        assert (trace.steps == 1).all() and trace.loops_run == 1  # everyone sure at once: the loop ends


def test_min_loops_and_max_loops_beyond_training():
    model = halting_model("entropy", 100.0, min_loops=3, max_loops=8, n_loops=4)
    idx = tokens()
    with torch.no_grad():
        _, _, trace = model(idx, idx, return_trace=True)
        assert (trace.steps == 3).all()
    model = halting_model("entropy", 0.0, max_loops=8, n_loops=4)
    with torch.no_grad():
        _, _, trace = model(idx, idx, return_trace=True)
        assert (trace.steps == 8).all()


def test_per_token_threshold_after_a_trigger_token():
    # token 5 raises the bar from its position on; token 6 sets it again, the latest trigger wins
    model = halting_model("entropy", 100.0, max_loops=6, halt_thresholds_after={5: 0.0, 6: 50.0})
    idx = torch.tensor([[1, 2, 5, 3, 4, 6, 7, 5, 8]])
    thr = model.halt_thresholds(idx)
    assert thr.tolist() == [[100.0, 100.0, 0.0, 0.0, 0.0, 50.0, 50.0, 0.0, 0.0]]
    with torch.no_grad():
        _, _, trace = model(idx, idx, return_trace=True)
    assert trace.steps.tolist() == [[1, 1, 6, 6, 6, 1, 1, 6, 6]]


def _block_reading(blk, x, keys, values, mask):
    """nanoGPT's block on x (T, C) whose attention reads keys and values (T, C) where mask (T, T) allows."""
    C, H = x.size(-1), blk.n_head
    q = F.linear(F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias), blk.attn.c_attn.weight[:C],
                 blk.attn.c_attn.bias[:C])

    def heads(t):
        return t.view(-1, H, C // H).transpose(0, 1)
    y = F.scaled_dot_product_attention(heads(q), heads(keys), heads(values), attn_mask=mask)
    x = x + blk.attn.c_proj(y.transpose(0, 1).reshape(-1, C))
    return x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias))))


def _keys_values(blk, x):
    C = x.size(-1)
    kv = F.linear(F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias), blk.attn.c_attn.weight[C:],
                  blk.attn.c_attn.bias[C:])
    return kv[:, :C], kv[:, C:]


def _loop_by_hand(model, x0, halted, n_loops, halted_offer):
    """The semantics spelled out for one sequence x0 (T, C), one tied layer, inject add, no step
    encoding: tokens `halted` (T,) stop after loop 1; the others run n_loops loops. halted_offer:
    "last loop" (the documented rule: the loop-1 keys and values) or "nothing" (dropped)."""
    blk, T = model.transformer.core[0], x0.size(0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys, values = _keys_values(blk, x0)
    h = _block_reading(blk, x0, keys, values, causal)  # loop 1: h starts at zero, u = x0
    first_keys, first_values = keys, values
    for _ in range(2, n_loops + 1):
        u = h + x0
        keys, values = _keys_values(blk, u)
        mask = causal
        if halted_offer == "last loop":
            keys = torch.where(halted[:, None], first_keys, keys)
            values = torch.where(halted[:, None], first_values, values)
        else:
            mask = causal & (~halted[None, :] | torch.eye(T, dtype=torch.bool))
        h = torch.where(halted[:, None], h, _block_reading(blk, u, keys, values, mask))
    return h


def test_halted_tokens_are_still_attended_to():
    """A token still running reads, at every later loop, the keys and values a halted token had in
    its last loop; dropping them from attention gives a different result."""
    from tests.test_adaptive import sharpened_model
    model = sharpened_model("entropy", max_loops=4, step_encoding="none")
    idx = torch.randint(0, 17, (1, 8), generator=torch.Generator().manual_seed(3))
    thresholds = torch.zeros(1, 8)
    thresholds[0, :4] = 100.0  # the first four halt after loop 1, the rest think to 4 loops
    halted = thresholds[0] > 0
    with torch.no_grad():
        x0 = model.embed(idx)
        trace = LoopTrace(steps=torch.empty(0))
        h = model.loop(x0, idx, 4, True, thresholds, trace)
        expected = _loop_by_hand(model, x0[0], halted, 4, "last loop")
        dropped = _loop_by_hand(model, x0[0], halted, 4, "nothing")
    assert trace.steps[0, :4].tolist() == [1, 1, 1, 1] and (trace.steps[0, 4:] == 4).all()
    assert_close(h[0], expected, composed=True)
    assert not torch.allclose(h[0, 4:], dropped[4:], atol=1e-2), "the test cannot tell dropped tokens apart"


def test_halting_is_off_in_training_unless_asked():
    model = LoopGPT(tiny(halt="entropy", halt_threshold=100.0, n_loops=3))
    idx = tokens()
    _, _, trace = model(idx, idx, return_trace=True)
    assert (trace.steps == 3).all()
    _, _, trace = model(idx, idx, return_trace=True, halting=True)
    assert (trace.steps == 1).all()
    with pytest.raises(ValueError, match="halting=True but the config has halt='none'"):
        LoopGPT(tiny())(idx, halting=True)
    _, _, trace = model(idx, idx, return_trace=True, halt=True)  # the keyword's former name
    assert (trace.steps == 1).all()
    with pytest.raises(ValueError, match="disagree"):
        model(idx, halting=True, halt=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_or_inf_over_128_loops(dtype):
    model = LoopGPT(tiny(n_loops=128, halt="kl", halt_threshold=0.0, step_encoding="sinusoidal")).to(dtype).eval()
    idx = tokens(1, 9)
    with torch.no_grad():
        logits, loss, trace = model(idx, idx, return_trace=True)
    assert trace.loops_run == 128
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(e).all() and torch.isfinite(d).all() for e, d in zip(trace.entropy, trace.delta))


def test_relative_change_is_bounded_from_a_zero_state():
    h, h_new = torch.zeros(1, 2, 4), torch.randn(1, 2, 4)
    assert torch.allclose(relative_change(h, h_new), torch.ones(1, 2))
    assert (relative_change(h_new, h_new) == 0).all()


# ---- generation

def test_generate_appends_tokens_greedy_is_deterministic():
    model = LoopGPT(tiny()).eval()
    idx = tokens(2, 3)
    out = model.generate(idx, 20, temperature=0)  # runs past block_size: the context is cropped
    assert out.shape == (2, 23) and torch.equal(out[:, :3], idx)
    assert torch.equal(out, model.generate(idx, 20, temperature=0))
    sampled = model.generate(idx, 5, temperature=0.8, top_k=3)
    assert sampled.shape == (2, 8) and torch.equal(sampled[:, :3], idx)
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 5, temperature=0.8, top_k=1), out[:, :8]), "top-1 sampling is not greedy"


def test_top_k_samples_only_among_the_k_likeliest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8, 0.5], [5.0, 4.9, 4.8, 0.0, 0.0, 4.7, 0.0]])
    torch.manual_seed(0)
    draws = torch.cat([sample_next_token(logits, 1.0, 3) for _ in range(200)], dim=1)
    assert set(draws[0].tolist()) == {1, 3, 5} and set(draws[1].tolist()) == {0, 1, 2}
    assert torch.equal(sample_next_token(logits, 0.0, 3), logits.argmax(-1, keepdim=True))


def test_sampling_draws_each_token_as_often_as_its_probability():
    """The exponential race draws token i with probability softmax(logits / T)_i (20,000 draws in
    one batch; a wrong race, e.g. argmax of p * E, fails by far more than the allowance)."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        draws = sample_next_token(logits.expand(20_000, -1), temperature, None).view(-1)
        frequencies = torch.bincount(draws, minlength=logits.numel()).float() / draws.numel()
        torch.testing.assert_close(frequencies, torch.softmax(logits / temperature, dim=-1), atol=0.01, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=2, top_k=0), "top_k must be >= 1"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoopGPT(tiny()).generate(tokens(1, 2), **kwargs)


# ---- bad input

@pytest.mark.parametrize("make_idx,message", [
    (lambda: torch.zeros(1, 17, dtype=torch.long), "sequence length 17 exceeds block_size 16"),
    (lambda: torch.full((1, 4), 17), r"token ids must be in \[0, 17\), got values in \[17, 17\]"),
    (lambda: torch.full((1, 4), -1), r"token ids must be in \[0, 17\)"),
    (lambda: torch.zeros(1, 4), "idx must be a \\(B, T\\) tensor of int64 token ids, got Tensor torch.float32"),
    (lambda: torch.zeros(4, dtype=torch.long), "idx must be a \\(B, T\\) tensor"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), "idx is empty"),
    (lambda: torch.zeros(1, 4, dtype=torch.long, device="meta"), "idx is on meta but the model is on cpu"),
])
def test_bad_inputs_are_refused(make_idx, message):
    with pytest.raises(ValueError, match=message):
        LoopGPT(tiny())(make_idx())


def test_bad_targets_and_loop_counts_are_refused():
    model = LoopGPT(tiny(halt="entropy", halt_threshold=1.0, min_loops=2)).eval()
    idx = tokens(1, 4)
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, idx[:, :3])
    with pytest.raises(ValueError, match="n_loops must be an integer >= 1, got 0"):
        model(idx, n_loops=0)
    with pytest.raises(ValueError, match=r"n_loops \(1\) is below min_loops \(2\)"):
        model(idx, n_loops=1)
    with pytest.raises(ValueError, match="thresholds must have the shape of idx"):
        model(idx, thresholds=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"thresholds for halt='entropy' must be in \[0.0, inf\), got -1.0"):
        model(idx, thresholds=torch.full((1, 4), -1.0))
