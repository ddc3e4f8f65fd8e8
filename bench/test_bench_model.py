"""The whole model: eval forward (loss over every position), generation tokens/s at batch 1 and
16, and one training step of GPT-12L against LoopLM-1Lx12 (equal FLOPs: both run 12 blocks of the
same width). Each on the torch backend (eager), torch.compile of it where it applies, and the
kernel backends. On a CPU the torch-backend cases run at the narrow CPU workload.

And the training step against its peer, nanoGPT's own GPT (tests/nanogpt_arch.py, SDPA as nanoGPT
uses it), at nanoGPT's CPU shapes and at C=384, T=256, in interleaved rounds: fp32 weights, under
bf16 autocast on a GPU as nanoGPT trains there.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import pytest
import torch

from bench.harness import KERNEL_BACKENDS, assert_mixed_halting, backend_or_skip, bench_device, compile_or_skip, \
    device_name, measure
from bench.schema import CaseInfo
from bench.workloads import SHAKESPEARE, ModelWorkload, build_model, calibrate_halting, forward_flops, \
    generation_flops, main_workload, model_dtype, model_workloads, token_batch
from looplm import LoopConfig, LoopGPT
from looplm.checkpoint import load_state
from looplm.objective import LoopObjective
from looplm.train import TrainConfig, configure_optimizer
from tests.nanogpt_arch import GPT, GPTConfig

DEVICE = bench_device()
DTYPE = str(model_dtype(DEVICE)).removeprefix("torch.")
HALTING = pytest.mark.parametrize("halting", [False, True], ids=["halt-off", "halt-on"])


def _registry_backend(backend: str) -> str:
    """The registry backend a variant runs on ("compile" compiles the torch backend's model)."""
    if backend in KERNEL_BACKENDS:
        backend_or_skip(backend)
    if backend == "compile" and DEVICE.type != "cuda":
        pytest.skip("torch.compile of the whole model is timed on a GPU only: on a CPU its compile time "
                    "outweighs a short run")
    return "torch" if backend == "compile" else backend


def _model_name(model) -> str:
    config = model.config
    return "GPT-12L" if config.n_loops == 1 else f"LoopLM-{config.n_layer}Lx{config.n_loops}"


@HALTING
@pytest.mark.parametrize("backend", ["torch", "compile", *KERNEL_BACKENDS])
@pytest.mark.parametrize("workload", model_workloads(DEVICE), ids=lambda w: w.name)
def test_eval_forward(benchmark, workload: ModelWorkload, backend: str, halting: bool) -> None:
    model = build_model(workload, _registry_backend(backend), DEVICE, halting=True).eval()
    idx = token_batch(workload, workload.batch, workload.seq, DEVICE)
    targets = token_batch(workload, workload.batch, workload.seq, DEVICE).roll(1, dims=1)
    with torch.inference_mode():
        notes = calibrate_halting(model, idx, workload.halted_fraction) if halting else {}
        if halting:
            assert_mixed_halting(notes, model.config)
        forward = compile_or_skip(benchmark, model) if backend == "compile" else model
        shape = dict(model=f"{workload.name}-{_model_name(model)}", B=workload.batch, T=workload.seq,
                     halt="on" if halting else "off")
        # With halting the work depends on which tokens run which loops: tokens/s is the measure.
        flops = None if halting else forward_flops(model.config, workload.batch, workload.seq,
                                                   model.config.n_loops, head_positions=workload.seq)
        info = CaseInfo("model", "eval_forward", backend, shape, DTYPE, device_name(DEVICE), flops=flops,
                        tokens=workload.batch * workload.seq, notes=notes)
        measure(benchmark, lambda: forward(idx, targets, halt=halting), info)


@HALTING
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_generate(benchmark, backend: str, batch: int, halting: bool) -> None:
    workload = main_workload(DEVICE)
    model = build_model(workload, _registry_backend(backend), DEVICE, halting=True).eval()
    prompt = token_batch(workload, batch, workload.prompt, DEVICE)
    notes = {"sampling": "greedy", "kv_cache": True}
    flops = None  # with halting the loops run per new token vary; tokens/s is the measure
    if halting:
        notes.update(calibrate_halting(model, prompt, workload.halted_fraction))  # as halting does on the prompt
        assert_mixed_halting(notes, model.config)
    else:
        flops = generation_flops(model.config, batch, workload.prompt, workload.new_tokens, model.config.n_loops)
    shape = dict(model=f"{workload.name}-{_model_name(model)}", B=batch, prompt=workload.prompt,
                 new=workload.new_tokens, halt="on" if halting else "off")
    info = CaseInfo("model", "generate", backend, shape, DTYPE, device_name(DEVICE), flops=flops,
                    tokens=batch * workload.new_tokens, notes=notes)
    out = measure(benchmark, lambda: model.generate(prompt, workload.new_tokens, temperature=0.0, halt=halting),
                  info)
    assert out.shape == (batch, workload.prompt + workload.new_tokens)


def test_eval_forward_torch_vs_reference(benchmark) -> None:
    """The shakespeare LoopLM 1Lx12 (C=384, 6 heads, T=256), batch 2, eval forward with the loss:
    the fast "torch" backend against the fp32 oracle "reference", in interleaved rounds."""
    from bench.test_bench_adaptive import interleaved_medians
    from looplm.testing import assert_close
    workload = SHAKESPEARE
    model = build_model(workload, "torch", DEVICE).eval()
    batch = 2
    idx = token_batch(workload, batch, workload.seq, DEVICE)
    targets = idx.roll(-1, dims=1)

    def on(backend: str):
        def forward():
            return model.set_backend(backend)(idx, targets)
        return forward
    with torch.inference_mode():
        logits, loss = on("torch")()
        logits_ref, loss_ref = on("reference")()
        assert_close(logits, logits_ref, dtype=model_dtype(DEVICE), composed=True)
        medians = interleaved_medians({"torch": on("torch"), "reference": on("reference")}, rounds=5) \
            if benchmark.enabled else {"torch": float("nan"), "reference": float("nan")}
        shape = dict(model="shakespeare-LoopLM-1Lx12", B=batch, T=workload.seq)
        info = CaseInfo("model", "eval_forward_vs_reference", "torch", shape, DTYPE, device_name(DEVICE),
                        flops=forward_flops(model.config, batch, workload.seq, model.config.n_loops,
                                            head_positions=workload.seq), tokens=batch * workload.seq,
                        notes=dict(torch_ms=round(1e3 * medians["torch"], 1),
                                   reference_ms=round(1e3 * medians["reference"], 1),
                                   speedup=round(medians["reference"] / medians["torch"], 3), target=1.3))
        measure(benchmark, on("torch"), info)


@pytest.mark.parametrize("layers,loops", [(12, 1), (1, 12)], ids=["GPT-12L", "LoopLM-1Lx12"])
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_train_step(benchmark, backend: str, layers: int, loops: int) -> None:
    """Forward, backward and an AdamW step; kernel backends fall back to the reference for ops
    without backward kernels (hybrid autograd, looplm.backends)."""
    workload = main_workload(DEVICE)
    model = build_model(workload, _registry_backend(backend), DEVICE, layers=layers, loops=loops).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = token_batch(workload, workload.batch, workload.seq, DEVICE)
    targets = idx.roll(-1, dims=1)

    def step() -> torch.Tensor:
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    shape = dict(model=f"{workload.name}-{_model_name(model)}", C=model.config.n_embd, B=workload.batch,
                 T=workload.seq)
    flops = 3 * forward_flops(model.config, workload.batch, workload.seq, loops, head_positions=workload.seq)
    info = CaseInfo("model", "train_step", backend, shape, DTYPE, device_name(DEVICE), flops=flops,
                    tokens=workload.batch * workload.seq, notes={"optimizer": "AdamW"})
    loss = measure(benchmark, step, info)
    assert torch.isfinite(loss)


# ---- training step against nanoGPT

NANOGPT_SHAPES = [  # nanoGPT's shakespeare_char CPU settings, and its GPU model's width at a CPU batch
    dict(C=128, H=4, T=64, B=12),
    dict(C=384, H=6, T=256, B=4),
]
NANOGPT_ROUNDS = {128: 41, 384: 15}  # interleaved rounds per shape when timing
VOCAB = 65  # shakespeare_char


def _train_steps(shape: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """One training step each (forward, backward, AdamW with nanoGPT's weight-decay groups,
    zero_grad): nanoGPT's GPT-4L, and LoopLM's GPT-4L and LoopLM 1Lx4 as the trainer runs them
    (LoopObjective) and as a nanoGPT user calls them (model(idx, targets)). GPT-4L starts from the
    peer's own weights: the same function."""
    C, H, T, B = shape["C"], shape["H"], shape["T"], shape["B"]
    torch.manual_seed(0)
    peer = GPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=4, n_head=H, n_embd=C, bias=True)).to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T), generator=generator).to(DEVICE)
    targets = torch.randint(0, VOCAB, (B, T), generator=generator).to(DEVICE)
    settings = TrainConfig(device=DEVICE.type)

    # fp32 weights; on a GPU under bf16 autocast, as nanoGPT and looplm.train run there
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda" else contextlib.nullcontext()

    def step_of(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        optimizer = configure_optimizer(model, settings, DEVICE.type)

        def step() -> torch.Tensor:
            with amp:
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    steps = {"nanoGPT-4L": step_of(peer, lambda: peer(idx, targets)[1])}
    for name, layers, loops in (("GPT-4L", 4, 1), ("LoopLM-1Lx4", 1, 4)):
        torch.manual_seed(0)
        config = LoopConfig(vocab_size=VOCAB, block_size=T, n_embd=C, n_head=H, n_layer=layers, n_loops=loops)
        for call in ("trainer", "model"):
            model = LoopGPT(config).to(DEVICE).train()
            if layers == 4:
                load_state(model, {k.replace("transformer.h.", "transformer.core."): v
                                   for k, v in peer.state_dict().items()}, source="nanoGPT-4L")
            if call == "trainer":
                objective = LoopObjective(model, settings)
                steps[f"{name} (trainer)"] = step_of(model, lambda o=objective, n=loops: o(idx, targets, n)[0])
            else:
                steps[f"{name} (model call)"] = step_of(model, lambda m=model: m(idx, targets)[1])
    return steps


@pytest.mark.parametrize("shape", NANOGPT_SHAPES, ids=lambda s: "C{C}-T{T}-B{B}".format(**s))
def test_train_step_against_nanogpt(benchmark, shape: dict) -> None:
    """nanoGPT's GPT-4L against LoopLM's GPT-4L and LoopLM 1Lx4, fp32, the torch backend. Each
    timed round runs every candidate's step once, in an order that rotates from round to round, so
    that a machine's slow moments fall on all of them alike; the medians and their ratios to nanoGPT
    are in the case's notes (the table's time is the whole round)."""
    if not benchmark.enabled and shape != NANOGPT_SHAPES[0]:
        pytest.skip("the wider shape runs only when benchmarking; the first shape checks the same steps")
    steps = _train_steps(shape)
    names = list(steps)
    first = {name: step().item() for name, step in steps.items()}  # also the untimed warm-up
    for name in ("GPT-4L (trainer)", "GPT-4L (model call)"):  # the same weights compute the same loss
        assert first[name] == pytest.approx(first["nanoGPT-4L"], rel=1e-5), (name, first)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}

    def one_round() -> None:
        offset = len(times[names[0]]) % len(names)
        for name in names[offset:] + names[:offset]:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = steps[name]()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            assert torch.isfinite(loss), name

    if not benchmark.enabled:
        return
    benchmark.pedantic(one_round, rounds=NANOGPT_ROUNDS[shape["C"]], iterations=1)
    # Wall time, and the CPU time the process spent: on a machine shared with other work, wall time
    # also counts the waits for a core, CPU time only the step's own work (one thread).
    notes = {"rounds": len(times[names[0]]), "threads": torch.get_num_threads(), "optimizer": "AdamW"}
    for label, samples in (("", times), ("cpu_", cpu_times)):
        medians = {name: statistics.median(t) for name, t in samples.items()}
        notes[f"median_{label}ms"] = {n: round(1e3 * m, 3) for n, m in medians.items()}
        notes[f"{label}ratio_to_nanogpt"] = {n: round(m / medians["nanoGPT-4L"], 3) for n, m in medians.items()}
    dtype = "bfloat16-autocast" if DEVICE.type == "cuda" else "float32"
    info = CaseInfo("model", "train_step_vs_nanogpt", "torch", dict(model="4 blocks", **shape), dtype,
                    device_name(DEVICE), tokens=shape["B"] * shape["T"], notes=notes)
    benchmark.extra_info.update(info.to_extra_info())
    benchmark.group = f"model: train_step_vs_nanogpt {dtype}"
