"""What only the "torch" backend promises: it follows autocast (bf16 matmuls within bf16's tolerance
of the fp32 oracle, gradients flowing) and torch.compile (one graph, eager's numbers). Its parity with
the oracle, tier by tier, is in tests/test_hierarchical_parity.py with every other backend's."""
from __future__ import annotations

import torch

from looplm import LoopConfig, LoopGPT
from looplm.testing import assert_close


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
