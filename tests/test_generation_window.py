"""Generation past block_size: every step's logits, and with halting every step's loop count, are the
model's own on the window of exactly the last block_size tokens, cached or not.

A spy stands in for the sampler: it records the logits each step samples from and writes tokens
of its own, drawn at random, so the context keeps changing (a model that repeats one token would
give the same logits for a window one token short, and the test could not tell).
"""
from __future__ import annotations

import pytest
import torch

import looplm.generation
import looplm.model
from looplm import LoopConfig, LoopGPT
from looplm.generation import generate_cached
from looplm.testing import assert_close
from tests.models import sharpen
from tests.test_adaptive import MAX_LOOPS, SHAPES, sharpened_model

BLOCK = 8
VOCAB = 17
TRIGGER = 3  # the token from which halt_thresholds_after applies


class Sampler:
    """Records the logits (B, V) each generation step samples from; answers with random tokens (never
    TRIGGER), as a sampler at a high temperature would."""

    def __init__(self, monkeypatch, seed: int = 0):
        self.logits: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        tokens = torch.tensor([t for t in range(VOCAB) if t != TRIGGER])
        patched = [m for m in (looplm.model, looplm.generation) if hasattr(m, "sample_next_token")]
        assert patched, "generation no longer samples through sample_next_token; point the spy at its sampler"

        def sample(logits, temperature, top_k):
            self.logits.append(logits.detach().clone())
            pick = torch.randint(len(tokens), (logits.size(0), 1), generator=self.generator)
            return tokens[pick].to(logits.device)
        for module in patched:
            monkeypatch.setattr(module, "sample_next_token", sample)


def window_before(out: torch.Tensor, length: int) -> torch.Tensor:
    """The context the model sees when it chooses token `length`: the last BLOCK tokens before it."""
    return out[:, max(0, length - BLOCK):length]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("shape", ["1L", "2L-prelude-coda"])
def test_logits_past_block_size_are_the_models_on_the_last_block_size_tokens(monkeypatch, shape, use_cache):
    torch.manual_seed(0)
    model = sharpen(LoopGPT(LoopConfig(vocab_size=VOCAB, block_size=BLOCK, n_embd=32, n_head=4, n_loops=3,
                                       **SHAPES[shape])).eval())
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    spy = Sampler(monkeypatch)
    new = 3 * BLOCK
    out = model.generate(prompt, new, temperature=1.0, use_cache=use_cache)
    assert len(spy.logits) == new and out.shape == (2, 5 + new)
    past_block = 0
    for step, logits in enumerate(spy.logits):
        length = prompt.size(1) + step
        window = window_before(out, length)
        with torch.no_grad():
            expected = model(window)[0][:, -1]
        assert_close(logits, expected, msg=f"step {step}: the logits of the window")
        if length > BLOCK:
            past_block += 1
            assert len(window[0].unique()) >= 3, "the tail must vary for a window one short to differ"
            with torch.no_grad():
                one_short = model(window[:, 1:])[0][:, -1]
            assert (one_short - expected).abs().max() > 1e-2, "the model must depend on the window's first token"
    assert past_block == new - (BLOCK - prompt.size(1)) - 1


def test_halting_past_block_size_follows_a_trigger_token_out_of_the_window(monkeypatch):
    """From TRIGGER on tokens think to the budget, elsewhere they stop after one loop. Once the
    trigger has left the window, generation halts as a forward over the window does: at once."""
    model = sharpened_model("entropy", threshold=100.0, block_size=BLOCK, halt_thresholds_after={TRIGGER: 0.0})
    prompt = torch.tensor([[TRIGGER, 1, 2, 4, 5], [1, 2, 4, TRIGGER, 5]])  # the trigger leaves at different steps
    spy = Sampler(monkeypatch)
    new = 2 * BLOCK
    out, stats = generate_cached(model, prompt, new, temperature=1.0)
    assert len(spy.logits) == new and stats.steps.shape == (2, prompt.size(1) + new - 1)
    seen = set()
    for step, logits in enumerate(spy.logits):
        length = prompt.size(1) + step
        window = window_before(out, length)
        with torch.no_grad():
            expected, _, trace = model(window, return_trace=True)
        assert_close(logits, expected[:, -1], msg=f"step {step}: the logits of the window")
        assert torch.equal(stats.steps[:, length - 1], trace.steps[:, -1]), f"step {step}: the loops of the window"
        if length > BLOCK:
            seen.update(zip((window == TRIGGER).any(dim=1).tolist(), trace.steps[:, -1].tolist()))
    # past block_size, windows with the trigger think to the budget and windows without it stop at once
    assert seen == {(True, MAX_LOOPS), (False, 1)}, seen
