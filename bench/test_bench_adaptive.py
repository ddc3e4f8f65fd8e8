"""Adaptive compute on the CPU (torch backend): halting that saves time, cached adaptive generation.

    pytest bench/test_bench_adaptive.py --benchmark-only

forward: one eval forward with a given fraction of tokens halted after loop 1 (the rest think to
the budget), compacted loop against the masked loop. generate: tokens/s of cached generation at
fixed depth and with halting, against uncached LoopGPT.generate, at batch 1 and 16.
"""
from __future__ import annotations

import pytest
import torch

from bench.schema import CaseInfo
from looplm import LoopConfig, LoopGPT
from looplm.generation import generate_cached

CONFIG = dict(vocab_size=65, block_size=128, n_embd=128, n_head=4, n_layer=1, n_loops=4, max_loops=8,
              step_encoding="learned", halt="entropy", halt_threshold=1.0)
LOOPS = CONFIG["max_loops"]


def model() -> LoopGPT:
    torch.manual_seed(0)
    return LoopGPT(LoopConfig(**CONFIG)).eval()


def record(benchmark, op: str, shape: dict, **notes) -> None:
    info = CaseInfo(suite="model", op=op, backend="torch", shape=shape, dtype="float32", device="cpu",
                    tokens=shape.get("B", 1) * shape.get("T", shape.get("new", 1)), notes=notes)
    benchmark.extra_info.update(info.to_extra_info())


@pytest.mark.parametrize("loop", ["compacted", "masked"])
@pytest.mark.parametrize("halted", [0.0, 0.5, 0.9])
def test_bench_forward_time_falls_with_halted_fraction(benchmark, halted, loop):
    m, B, T = model(), 4, 128
    idx = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(0))
    thresholds = torch.zeros(B, T)  # entropy is never below 0: these tokens think to the budget
    thresholds[:, torch.randperm(T, generator=torch.Generator().manual_seed(1))[:round(halted * T)]] = 100.0

    def forward():
        with torch.no_grad():
            return m.loop(m.embed(idx), idx, LOOPS, True, thresholds, compact=loop == "compacted")
    benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    record(benchmark, "loop", dict(B=B, T=T, C=CONFIG["n_embd"], loops=LOOPS, halted=halted, loop=loop))


@pytest.mark.parametrize("mode", ["cached_fixed", "cached_adaptive", "uncached_fixed"])
@pytest.mark.parametrize("B", [1, 16])
def test_bench_generate_tokens_per_second(benchmark, B, mode):
    m, prompt, new = model(), 8, 24
    idx = torch.randint(0, 65, (B, prompt), generator=torch.Generator().manual_seed(0))
    halt = mode == "cached_adaptive"
    if halt:  # an untrained model's entropy is near log(65) = 4.17: let about half the tokens stop early
        m.config.halt_threshold = 4.173
    if mode == "uncached_fixed":
        out = benchmark.pedantic(lambda: m.generate(idx, new, temperature=0, halt=False), rounds=2)
        loops_per_token = float(CONFIG["n_loops"])
    else:
        out, stats = benchmark.pedantic(
            lambda: generate_cached(m, idx, new, temperature=0, halt=halt), rounds=2)
        loops_per_token = stats.loops_per_token
    assert out.shape == (B, prompt + new)
    record(benchmark, "generate", dict(B=B, prompt=prompt, new=new, C=CONFIG["n_embd"], mode=mode),
           loops_per_token=loops_per_token)
