"""Adaptive compute on the CPU (torch backend), each case against its peer in the same run.

    OMP_NUM_THREADS=1 pytest bench/test_bench_adaptive.py --benchmark-only

halting efficiency: LoopLM 1Lx8 (B=4, T=128, C=128), an eval forward where exactly a given share
of the tokens (picked by per-token thresholds) stops after loop 1 (min_loops 1; one case stops half
after loop 4, min_loops 4) and the rest think to loop 8, against the fixed-depth forward (the fused
block over every token, no readout). Efficiency = (speed-up over fixed depth) / (loop reduction):
1.0 when the time falls as fast as the loops run do. The `compiled` cases compile both forwards
(torch.compile, inductor with its C++ wrapper) and run the adaptive one on a frozen capacity plan
(looplm.halting).
generation: greedy tokens/s of `LoopGPT.generate` (one decode step per token over static per-loop
K/V caches), LoopLM 1Lx4, C=128, 128 new tokens, against Hugging Face transformers' GPT-2 of 4
layers with its KV cache (the optional `bench` extra), at batch 1 and 16.

Each case times its variants in interleaved rounds (a, b, a, b, ...) and records the medians in
the benchmark's extra_info, so that a noisy shared machine slows both alike, and the medians of the
thread's CPU time (`*_cpu_ms`, `efficiency_cpu`, `ratio_cpu`), which other work on the machine
disturbs less. The halting cases also record the host reads of one adaptive forward
(`host_syncs`, looplm.testing.HostSyncCounter: the input check's, the given thresholds' and the
loop's one read at its end, with the capacity plan of the forward before) and the decode cases
those of the whole generation (`host_syncs`: none per token). pytest-benchmark's own table shows the LoopLM variant.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import pytest
import torch

from bench.schema import CaseInfo
from bench.workloads import halting_efficiency
from looplm import LoopConfig, LoopGPT, LoopTrace
from looplm.testing import assert_close, count_host_syncs

LOOPS = 8
HALTING = LoopConfig(vocab_size=65, block_size=128, n_embd=128, n_head=4, n_layer=1, n_loops=LOOPS,
                     halt="entropy", halt_threshold=1.0)
# Per-token thresholds: one every score passes (stop after loop 1) and one none does (think to the budget).
STOP, NEVER = 100.0, 0.0


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int,
                        cpu: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Median wall seconds of each variant over `rounds` rounds, the variants alternating in every
    round. `cpu`, if given, receives each variant's median CPU seconds of the calling thread
    (time.thread_time: the time it ran, which other work on a loaded machine disturbs far less)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            cpu_times[name].append(time.thread_time() - start_cpu)
            times[name].append(time.perf_counter() - start)
    if cpu is not None:
        cpu.update({name: statistics.median(t) for name, t in cpu_times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def record(benchmark, op: str, shape: dict, **notes) -> None:
    info = CaseInfo(suite="model", op=op, backend="torch", shape=shape, dtype="float32", device="cpu",
                    tokens=shape.get("B", 1) * shape.get("T", shape.get("new", 1)), notes=notes)
    benchmark.extra_info.update(info.to_extra_info())


def halting_model(criterion: str, min_loops: int = 1) -> LoopGPT:
    torch.manual_seed(0)
    config = LoopConfig(**{**HALTING.to_dict(), "halt": criterion, "min_loops": min_loops})
    return LoopGPT(config).eval()


# (criterion, share of tokens that stop, the loop they stop after = min_loops): the CPU
# cases stop after loop 1; the last has the GPU target's form (half stop at loop 4), at CPU size.
HALTING_CASES = [pytest.param(criterion, halted, 1, id=f"{criterion}-{halted}")
                 for criterion in ("delta", "entropy") for halted in (0.5, 0.9)]
HALTING_CASES.append(pytest.param("entropy", 0.5, 4, id="entropy-0.5-min_loops4"))


def halting_case(criterion: str, halted: float, min_loops: int) -> tuple[LoopGPT, torch.Tensor, torch.Tensor, float]:
    """(model, idx, thresholds, mean loops run) of a case where exactly the share `halted` of the
    tokens stops after min_loops and the rest run 8 loops, checked: the compacted loop gives the
    masked loop's result."""
    m, B, T = halting_model(criterion, min_loops), 4, 128
    idx = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(0))
    stops = torch.zeros(B * T, dtype=torch.bool)
    stops[torch.randperm(B * T, generator=torch.Generator().manual_seed(1))[:round(halted * B * T)]] = True
    thresholds = torch.where(stops, STOP, NEVER).view(B, T)
    with torch.no_grad():
        trace = LoopTrace(steps=torch.empty(0))
        compacted = m.loop(m.embed(idx), idx, LOOPS, True, thresholds, trace)
        masked = m.loop(m.embed(idx), idx, LOOPS, True, thresholds, compact=False)
    assert torch.equal(trace.steps.view(-1), torch.where(stops, min_loops, LOOPS).int())
    assert_close(compacted, masked, composed=True)
    return m, idx, thresholds, trace.steps.float().mean().item()


def record_efficiency(benchmark, criterion: str, halted: float, min_loops: int, mean_steps: float,
                      medians: dict, cpu: dict, **notes) -> None:
    def efficiency(seconds: dict) -> float:
        return round(halting_efficiency(seconds["fixed"], seconds["adaptive"], mean_steps, LOOPS), 3)
    record(benchmark, "halting_efficiency", dict(B=4, T=128, C=HALTING.n_embd, loops=LOOPS, halted=halted,
                                                 criterion=criterion, min_loops=min_loops),
           fixed_ms=round(1e3 * medians["fixed"], 2), adaptive_ms=round(1e3 * medians["adaptive"], 2),
           speedup=round(medians["fixed"] / medians["adaptive"], 3), loop_reduction=round(LOOPS / mean_steps, 3),
           efficiency=efficiency(medians), fixed_cpu_ms=round(1e3 * cpu["fixed"], 2),
           adaptive_cpu_ms=round(1e3 * cpu["adaptive"], 2), efficiency_cpu=efficiency(cpu), target=0.8, **notes)


@pytest.mark.parametrize("criterion, halted, min_loops", HALTING_CASES)
def test_bench_halting_efficiency(benchmark, criterion, halted, min_loops):
    m, idx, thresholds, mean_steps = halting_case(criterion, halted, min_loops)
    with torch.no_grad():
        def fixed():
            return m(idx, idx, halting=False)

        def adaptive():
            return m(idx, idx, halting=True, thresholds=thresholds)
        adaptive()  # records the capacity plan that the forwards timed here follow
        with count_host_syncs() as syncs:
            adaptive()
        cpu = {"fixed": float("nan"), "adaptive": float("nan")}
        medians = interleaved_medians({"fixed": fixed, "adaptive": adaptive}, rounds=15, cpu=cpu) \
            if benchmark.enabled else dict(cpu)
        benchmark.pedantic(adaptive, rounds=3, warmup_rounds=1)
    record_efficiency(benchmark, criterion, halted, min_loops, mean_steps, medians, cpu, host_syncs=syncs.count)


@pytest.mark.parametrize("criterion, halted, min_loops", HALTING_CASES)
def test_bench_halting_efficiency_compiled(benchmark, criterion, halted, min_loops):
    """Both forwards compiled (torch.compile: inductor when timing, Dynamo alone otherwise, to keep
    the plain test run fast), the adaptive one on the frozen capacity plan its eager forward
    recorded: one graph whose compute falls with the plan, no host read, no per-op dispatch.
    Inductor's C++ wrapper (`cpp_wrapper`) calls the graph's kernels from C++: a CPU loop over
    few rows is a few dozen small calls, and the Python wrapper's cost per call is a share of
    the loop that does not fall with the rows (efficiency 0.78 -> 0.83, delta, half stopping)."""
    m, idx, thresholds, mean_steps = halting_case(criterion, halted, min_loops)
    compiled = torch.compile(m, backend="inductor", options={"cpp_wrapper": True}) if benchmark.enabled else \
        torch.compile(m, backend="eager")
    with torch.no_grad():
        eager = m(idx, idx, halting=True, thresholds=thresholds)[0]  # records the plan
        m.capacity_plans.freeze()

        def fixed():
            return compiled(idx, idx, halting=False)

        def adaptive():
            return compiled(idx, idx, halting=True, thresholds=thresholds)
        assert_close(adaptive()[0], eager, composed=True)
        assert int(m.capacity_dropped) == 0
        cpu = {"fixed": float("nan"), "adaptive": float("nan")}
        medians = interleaved_medians({"fixed": fixed, "adaptive": adaptive}, rounds=15, cpu=cpu) \
            if benchmark.enabled else dict(cpu)
        benchmark.pedantic(adaptive, rounds=3, warmup_rounds=1)
    record_efficiency(benchmark, criterion, halted, min_loops, mean_steps, medians, cpu,
                      compiled="inductor, cpp_wrapper")


GENERATION = LoopConfig(vocab_size=65, block_size=256, n_embd=128, n_head=4, n_layer=1, n_loops=4)
PROMPT, NEW = 16, 128


def gpt2_peer(n_layer: int):
    """Hugging Face transformers' GPT-2 of the same width, vocabulary and context, n_layer layers."""
    transformers = pytest.importorskip("transformers", reason="the GPT-2 peer needs Hugging Face transformers: "
                                                               "pip install -e '.[bench]'")
    config = transformers.GPT2Config(vocab_size=GENERATION.vocab_size, n_positions=GENERATION.block_size,
                                     n_embd=GENERATION.n_embd, n_layer=n_layer, n_head=GENERATION.n_head,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("B", [1, 16])
def test_bench_generate_vs_gpt2(benchmark, B):
    """Greedy, 128 new tokens: LoopLM 1Lx4 with its per-loop K/V cache against GPT-2 4L with its KV cache."""
    torch.manual_seed(0)
    m = LoopGPT(GENERATION).eval()
    peer = gpt2_peer(n_layer=4)
    idx = torch.randint(1, 65, (B, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx)

    def looplm():
        return m.generate(idx, NEW, temperature=0)

    def gpt2():
        return peer.generate(idx, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             use_cache=True, pad_token_id=0)
    with torch.no_grad():
        out, peer_out = looplm(), gpt2()
        assert out.shape == peer_out.shape == (B, PROMPT + NEW)
        assert torch.equal(out, m.generate(idx, NEW, temperature=0, use_cache=False)), "cached != uncached"
        with count_host_syncs() as syncs:
            looplm()
        cpu = {"looplm": float("nan"), "gpt2": float("nan")}
        medians = interleaved_medians({"looplm": looplm, "gpt2": gpt2}, rounds=5, cpu=cpu) if benchmark.enabled \
            else dict(cpu)
        benchmark.pedantic(looplm, rounds=2, warmup_rounds=0)
    tokens = B * NEW
    record(benchmark, "generate_vs_gpt2", dict(B=B, prompt=PROMPT, new=NEW, C=GENERATION.n_embd, loops=4),
           looplm_tokens_per_s=round(tokens / medians["looplm"], 1),
           gpt2_tokens_per_s=round(tokens / medians["gpt2"], 1),
           ratio=round(medians["gpt2"] / medians["looplm"], 3), ratio_cpu=round(cpu["gpt2"] / cpu["looplm"], 3),
           host_syncs=syncs.count, target=2.0 if B == 1 else None,
           peer="transformers GPT2LMHeadModel, 4 layers, KV cache, generate(do_sample=False)")
