"""The looped core alone: 12 applications of the tied block from the embedded input, halting off
(every token runs every loop) and on (entropy halting, half the tokens calibrated to stop at
min_loops, so a readout and a halt_update follow every loop). Runs on the CPU too, torch backend.
"""
from __future__ import annotations

import pytest
import torch

from bench.harness import KERNEL_BACKENDS, assert_mixed_halting, backend_or_skip, bench_device, device_name, \
    measure
from bench.schema import CaseInfo
from bench.workloads import ModelWorkload, build_model, calibrate_halting, forward_flops, model_dtype, \
    model_workloads, token_batch

DEVICE = bench_device()


@pytest.mark.parametrize("halting", [False, True], ids=["halt-off", "halt-on"])
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("workload", model_workloads(DEVICE), ids=lambda w: w.name)
def test_loop(benchmark, workload: ModelWorkload, backend: str, halting: bool) -> None:
    if backend != "torch":
        backend_or_skip(backend)
    model = build_model(workload, backend, DEVICE, halting=True).eval()
    idx = token_batch(workload, workload.batch, workload.seq, DEVICE)
    config = model.config
    with torch.inference_mode():
        x0 = model.embed(idx)
        notes = calibrate_halting(model, idx, workload.halted_fraction) if halting else {}
        if halting:
            assert_mixed_halting(notes, config)
        shape = dict(model=f"{workload.name}-{config.n_layer}Lx{config.n_loops}", B=workload.batch, T=workload.seq,
                     halt="on" if halting else "off")
        # With halting the work depends on which tokens run which loops: tokens/s is the measure.
        flops = None if halting else forward_flops(config, workload.batch, workload.seq, config.n_loops,
                                                   head_positions=0)
        info = CaseInfo("loop", "loop", backend, shape, str(model_dtype(DEVICE)).removeprefix("torch."),
                        device_name(DEVICE), flops=flops, tokens=workload.batch * workload.seq, notes=notes)
        measure(benchmark, lambda: model.loop(x0, idx, config.n_loops, halting), info)
