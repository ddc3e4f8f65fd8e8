"""The shapes the benchmarks run and the work each one does (bytes moved, FLOPs).

Kernel shapes are those of the kernel targets and of the shipped model configs; model workloads
come in two sizes: the tiny-shakespeare model on a GPU, and a narrow one that a 2-core CPU runs in
a couple of minutes. Costs follow bench.schema: compulsory traffic and multiply-adds counted as 2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from looplm import LoopConfig, LoopGPT

# ---- kernels (GPU shapes)

KERNEL_DTYPES = (torch.bfloat16,)
KERNEL_SHAPES: dict[str, list[dict]] = {
    # entropy over GPT-2's padded vocabulary for 8 x 1024 tokens (target), and over shakespeare's 65 chars
    "softmax_entropy": [dict(N=8192, V=50304), dict(N=16384, V=65)],
    "layer_norm": [dict(N=8192, C=4096), dict(N=16384, C=384)],
    "linear": [dict(M=16384, K=384, N=1536, epilogue="bias+gelu"),
               dict(M=8192, K=4096, N=4096, epilogue="bias+residual")],
    # FlashAttention's convention: 16k tokens and a 2048-wide model at every sequence length
    "attention": [dict(B=16384 // T, H=2048 // D, T=T, D=D) for T in (1024, 2048, 4096) for D in (64, 128)],
    "halt_update": [dict(N=16384, C=384), dict(N=8192, C=4096)],
    "block": [dict(B=64, T=256, C=384, H=6), dict(B=8, T=1024, C=1024, H=16)],
}

# Rough element-wise FLOPs: enough to show that these ops are memory-bound, nothing rests on them.
_LAYER_NORM_FLOPS_PER_ELEMENT = 8  # mean, variance, normalise, scale, shift
_ENTROPY_FLOPS_PER_ELEMENT = 6  # max, subtract, exp, sum, p * log p, sum
_GELU_FLOPS_PER_ELEMENT = 8


def op_cost(op: str, shape: dict, itemsize: int) -> tuple[int, int]:
    """(bytes, flops) of one call of kernel `op` at `shape` (a KERNEL_SHAPES entry)."""
    s = shape
    if op == "softmax_entropy":
        n, v = s["N"], s["V"]
        return n * v * itemsize + 2 * n * 4, _ENTROPY_FLOPS_PER_ELEMENT * n * v
    if op == "layer_norm":
        n, c = s["N"], s["C"]
        return (2 * n * c + 2 * c) * itemsize, _LAYER_NORM_FLOPS_PER_ELEMENT * n * c
    if op == "linear":
        m, k, n = s["M"], s["K"], s["N"]
        residual = "residual" in s["epilogue"]
        gelu = "gelu" in s["epilogue"]
        elements = m * k + n * k + n + m * n * (2 if residual else 1)
        flops = 2 * m * n * k + m * n * (1 + residual + _GELU_FLOPS_PER_ELEMENT * gelu)
        return elements * itemsize, flops
    if op == "attention":
        b, h, t, d = s["B"], s["H"], s["T"], s["D"]
        return 4 * b * h * t * d * itemsize, attention_flops(b * h, t, t, d)
    if op == "halt_update":
        n, c = s["N"], s["C"]
        per_token = 1 + 4 + 4 + 4 + 1 + 4  # active, steps, score, threshold in; active, steps out
        # each row reads the one state it keeps (h_new if active, else h) and writes it: 2 N C
        return 2 * n * c * itemsize + n * per_token, n * c
    if op == "block":
        b, t, c = s["B"], s["T"], s["C"]
        return (2 * b * t * c + 12 * c * c) * itemsize, block_flops(b, t, c)
    raise ValueError(f"no cost model for op {op!r}; known: {sorted(KERNEL_SHAPES)}")


def attention_flops(batch_heads: int, tq: int, tk: int, d: int, causal: bool = True) -> int:
    """QK^T and PV, 2 * 2 * Tq * Tk * D per head; causal halves it (FlashAttention's count)."""
    flops = 4 * batch_heads * tq * tk * d
    return flops // 2 if causal else flops


def block_flops(b: int, t: int, c: int) -> int:
    """One pre-norm block: the four matmuls (3C + C + 4C + 4C outputs of width C) and causal attention."""
    return 2 * b * t * 12 * c * c + attention_flops(b, t, t, c)


# ---- models

@dataclass(frozen=True)
class ModelWorkload:
    name: str
    config: LoopConfig  # the looped model; GPT-12L comparisons derive from it
    batch: int  # eval and training batch
    seq: int  # eval and training sequence length
    prompt: int  # generation prompt length
    new_tokens: int  # tokens generated per call
    min_loops: int = 4  # with halting: the earliest loop a token may stop at
    halted_fraction: float = 0.5  # with halting: the share of tokens calibrated to stop at min_loops


def _halting(config: LoopConfig, min_loops: int) -> LoopConfig:
    # The threshold is calibrated on the model itself (calibrate_halting); 0 nats halts nobody early.
    return replace(config, halt="entropy", halt_threshold=0.0, min_loops=min_loops, max_loops=None)


SHAKESPEARE = ModelWorkload(  # nanoGPT's shakespeare_char widths and batch, as LoopLM 1Lx12
    "shakespeare", LoopConfig(vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=1, n_loops=12),
    batch=64, seq=256, prompt=128, new_tokens=32)
WIDE = ModelWorkload(  # GPT-2 medium's width and vocabulary: 8 x 1024 tokens, 8192 x 50304 logits
    "wide", LoopConfig(vocab_size=50304, block_size=1024, n_embd=1024, n_head=16, n_layer=1, n_loops=12),
    batch=8, seq=1024, prompt=256, new_tokens=16)
CPU_SMALL = ModelWorkload(  # narrow enough that every CPU case takes well under a second on 2 cores
    "cpu-small", LoopConfig(vocab_size=65, block_size=64, n_embd=64, n_head=4, n_layer=1, n_loops=12),
    batch=8, seq=64, prompt=16, new_tokens=8)


def model_workloads(device: torch.device) -> list[ModelWorkload]:
    return [SHAKESPEARE, WIDE] if device.type == "cuda" else [CPU_SMALL]


def main_workload(device: torch.device) -> ModelWorkload:
    """The workload of the generation and training cases."""
    return SHAKESPEARE if device.type == "cuda" else CPU_SMALL


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights and activations on a GPU (what the kernels are for); fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(workload: ModelWorkload, backend: str, device: torch.device, *, layers: int = 1,
                loops: Optional[int] = None, halting: bool = False) -> LoopGPT:
    """The workload's model on `device` in model_dtype: LoopLM {layers}Lx{loops}; layers=12, loops=1
    is GPT-12L. Seeded, so every backend sees the same weights."""
    config = replace(workload.config, n_layer=layers, n_loops=loops or workload.config.n_loops, max_loops=None)
    if halting:
        config = _halting(config, workload.min_loops)
    torch.manual_seed(0)
    return LoopGPT(config).to(device=device, dtype=model_dtype(device)).set_backend(backend)


def token_batch(workload: ModelWorkload, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, workload.config.vocab_size, (batch, seq), generator=generator).to(device)


def halting_efficiency(fixed_seconds: float, halting_seconds: float, mean_steps: float, n_loops: int) -> float:
    """Halting's speed-up over fixed depth divided by its loop reduction (n_loops / mean_steps): 1.0
    when the time falls as fast as the loops run do."""
    return fixed_seconds / halting_seconds * mean_steps / n_loops


@torch.no_grad()
def calibrate_halting(model: LoopGPT, idx: torch.Tensor, fraction: float) -> dict[str, float]:
    """Set the entropy threshold so that `fraction` of idx's tokens are sure enough to stop at
    min_loops and the rest run on: a mixed batch, the case per-token halting is for. (An untrained
    model's entropy barely moves from loop to loop, so a fixed threshold would halt all tokens or
    none.) Returns what halting then does on idx: the threshold, the loops run, the mean steps."""
    config = model.config
    _, _, trace = model(idx, halting=False, n_loops=config.min_loops, return_trace=True)
    entropy = trace.entropy[config.min_loops - 1].float().flatten()
    config.halt_threshold = max(float(torch.quantile(entropy, fraction)), 0.0)
    _, _, trace = model(idx, halting=True, return_trace=True)
    stopped = (trace.steps == config.min_loops).float().mean().item()
    assert abs(stopped - fraction) <= 0.1, \
        f"calibrated to stop {fraction:.0%} of the tokens at min_loops, stopped {stopped:.0%}"
    return dict(threshold_nats=round(config.halt_threshold, 4), loops_run=trace.loops_run,
                mean_steps=round(trace.steps.float().mean().item(), 2))


def forward_flops(config: LoopConfig, batch: int, seq: int, loops: int, head_positions: int) -> int:
    """A forward pass without halting: `loops` applications of the core, the untied prelude and
    coda, and the lm_head over `head_positions` positions per sequence."""
    c, v = config.n_embd, config.vocab_size
    blocks = config.n_prelude + config.n_coda + config.n_layer * loops
    return blocks * block_flops(batch, seq, c) + 2 * batch * head_positions * c * v


def generation_flops(config: LoopConfig, batch: int, prompt: int, new_tokens: int, loops: int) -> int:
    """model.generate with its K/V cache (the default, within block_size): the prompt once, then each
    fed token alone through every block, attending to the context so far, and the lm_head."""
    c, v = config.n_embd, config.vocab_size
    blocks = config.n_prelude + config.n_coda + config.n_layer * loops
    flops = forward_flops(config, batch, prompt, loops, head_positions=1)
    for context in range(prompt + 1, prompt + new_tokens):
        flops += blocks * (2 * batch * 12 * c * c + 4 * batch * context * c) + 2 * batch * c * v
    return flops
