"""Halting that saves compute: the compacted loop against the masked loop, the reference semantics."""
from __future__ import annotations

import pytest
import torch

from looplm import LoopConfig, LoopGPT, LoopTrace
from looplm.backends import Backend, get_backend
from looplm.compaction import compaction_blocker
from looplm.ops import OP_NAMES
from looplm.testing import assert_close

BACKENDS = ("torch", "triton", "tile")
# Thresholds at which this seed's sharpened tiny model halts tokens after many different loop counts.
CRITERIA = {"entropy": 2.65, "confidence": 0.15, "delta": 0.35, "kl": 0.01, "gate": 0.7}
MAX_LOOPS = 8


def backend_or_skip(name: str) -> Backend:
    try:
        return get_backend(name)
    except Exception as e:  # unavailable here, or its kernels are not built
        pytest.skip(f"backend {name!r}: {e}")


def sharpened_model(criterion: str = "entropy", threshold: float | None = None, **overrides) -> LoopGPT:
    """A tiny model whose weights are scaled up, so that tokens grow sure at different loops."""
    torch.manual_seed(0)
    base = dict(vocab_size=17, block_size=16, n_embd=32, n_head=4, n_layer=1, n_loops=3, max_loops=MAX_LOOPS,
                step_encoding="learned", halt=criterion, halt_threshold=threshold or CRITERIA[criterion])
    model = LoopGPT(LoopConfig(**{**base, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        if criterion == "gate":
            model.halt_gate.weight.normal_(0.0, 0.3)
            model.halt_gate.bias.zero_()
    return model


def run_both(model: LoopGPT, idx: torch.Tensor, **loop_kwargs) -> tuple[tuple, tuple]:
    """(state, trace) of the masked loop and of the compacted loop, from the same start."""
    results = []
    for compact in (False, True):
        trace = LoopTrace(steps=torch.empty(0))
        torch.manual_seed(1)  # the same noise for a noise-initialised state
        with torch.no_grad():
            h = model.loop(model.embed(idx), idx, MAX_LOOPS, True, trace=trace, compact=compact, **loop_kwargs)
        results.append((h, trace))
    return results[0], results[1]


def assert_same_run(masked: tuple, compacted: tuple) -> None:
    (h_ref, ref), (h, got) = masked, compacted
    assert torch.equal(got.steps, ref.steps), "tokens halted after different loop counts"
    assert got.loops_run == ref.loops_run
    for t in range(ref.loops_run):
        assert torch.equal(got.active[t], ref.active[t]), f"loop {t + 1}: different tokens active"
        assert_close(got.entropy[t], ref.entropy[t], composed=True, msg=f"loop {t + 1} entropy")
        assert_close(got.delta[t], ref.delta[t], composed=True, msg=f"loop {t + 1} state change")
    assert_close(h, h_ref, composed=True, msg="final states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hierarchical_parity_tier2_compacted_loop(backend):
    """Per backend: the compacted loop halts the same tokens after the same loops, same states."""
    model = sharpened_model("entropy").set_backend(backend_or_skip(backend))
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(2))
    masked, compacted = run_both(model, idx)
    assert len(masked[1].steps.unique()) >= 3, "the test needs tokens that halt after different loop counts"
    assert_same_run(masked, compacted)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_hierarchical_parity_tier2_compacted_loop_per_criterion(criterion):
    model = sharpened_model(criterion)
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(2))
    masked, compacted = run_both(model, idx)
    assert len(masked[1].steps.unique()) >= 2, "the test needs tokens that halt after different loop counts"
    assert_same_run(masked, compacted)


@pytest.mark.parametrize("overrides", [
    dict(inject="norm_add", step_encoding="sinusoidal", update="euler"),
    dict(state_init="noise", n_prelude=1, min_loops=2),
    dict(state_init="embed", inject="none", step_encoding="none", halt_thresholds_after={3: 2.5}),
], ids=["norm_add-sinusoidal-euler", "noise-prelude-min_loops", "embed-none-trigger"])
def test_hierarchical_parity_tier2_compacted_loop_per_config(overrides):
    model = sharpened_model("entropy", **overrides)
    idx = torch.randint(0, 17, (3, 11), generator=torch.Generator().manual_seed(3))
    masked, compacted = run_both(model, idx)
    assert len(masked[1].steps.unique()) >= 2
    assert_same_run(masked, compacted)


def counting(backend: Backend, rows: dict[str, int]) -> Backend:
    """`backend` with every op counting the rows (leading elements) it is given; the MLP's first
    linear (the one with a GELU) counts as "mlp"."""
    def wrap(name, op):
        def counted(x, *args, **kwargs):
            key = "mlp" if kwargs.get("activation") == "gelu" else name
            rows[key] = rows.get(key, 0) + x.numel() // x.size(-1)
            return op(x, *args, **kwargs)
        return counted
    return Backend("counting", {name: wrap(name, op) for name, op in backend.ops.items()},
                   differentiable=frozenset(OP_NAMES))


def test_compaction_skips_the_work_of_halted_tokens():
    """Half the tokens halt after one loop: the compacted loop runs the MLP, the readout and the
    halting update on about half the rows the masked loop does."""
    model = sharpened_model("entropy")
    idx = torch.randint(0, 17, (2, 12))
    thresholds = torch.zeros(idx.shape)
    thresholds[:, ::2] = 100.0  # entropy is always below: these halt after loop 1; the rest never halt
    rows = {False: {}, True: {}}
    outputs = {}
    for compact in (False, True):
        model.set_backend(counting(get_backend("torch"), rows[compact]))
        with torch.no_grad():
            outputs[compact] = model.loop(model.embed(idx), idx, MAX_LOOPS, True, thresholds, compact=compact)
    assert_close(outputs[True], outputs[False], composed=True)
    token_loops = idx.numel() * MAX_LOOPS
    assert rows[False]["block"] == rows[False]["halt_update"] == rows[False]["softmax_entropy"] == token_loops
    active_token_loops = idx.numel() // 2 * (1 + MAX_LOOPS)
    assert rows[True]["mlp"] == rows[True]["halt_update"] == rows[True]["softmax_entropy"] == active_token_loops


def test_compaction_is_the_default_with_halting_and_keeps_gradients():
    """Training with forced halting: the default (compacted) loop gives the masked loop's gradients,
    also with truncated backprop, whose detach must cut the halted tokens' kept keys and values too."""
    model = sharpened_model("entropy").train()
    idx = torch.randint(0, 17, (2, 10))
    grads = {}
    for compact in (False, None):
        model.zero_grad()
        states = []
        h = model.loop(model.embed(idx), idx, MAX_LOOPS, True, states=states, grad_loops=3, compact=compact)
        (model.head(h).logsumexp(-1).sum() + sum(s.square().mean() for s in states)).backward()
        grads[compact] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[None].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert_close(grads[None][name], grad, composed=True, msg=name)


def test_masked_loop_is_kept_where_compaction_would_differ():
    model = sharpened_model("entropy", n_layer=2)
    assert "n_layer=2" in compaction_blocker(model)
    idx = torch.randint(0, 17, (1, 6))
    with pytest.raises(ValueError, match="does not apply to this model: n_layer=2"):
        model.loop(model.embed(idx), idx, 4, True, compact=True)
    assert "n_coda=1" in compaction_blocker(sharpened_model("entropy", n_coda=1))
    assert compaction_blocker(sharpened_model("entropy", dropout=0.1).train()) is not None
    assert compaction_blocker(sharpened_model("entropy", dropout=0.1).eval()) is None
