"""The whole model: eval forward (loss over every position), generation tokens/s at batch 1 and
16, and one training step of GPT-12L against LoopLM-1Lx12 (equal FLOPs: both run 12 blocks of the
same width). Each on the torch backend (eager), torch.compile of it where it applies, and the
kernel backends. On a CPU the torch-backend cases run at the narrow CPU workload.
"""
from __future__ import annotations

import pytest
import torch

from bench.harness import KERNEL_BACKENDS, backend_or_skip, bench_device, compile_or_skip, device_name, measure
from bench.schema import CaseInfo
from bench.workloads import SHAKESPEARE, ModelWorkload, build_model, calibrate_halting, forward_flops, \
    generation_flops, main_workload, model_dtype, model_workloads, token_batch

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
