"""The per-op and model tables of `bench/gpu_check.sh`: every kernel backend against PyTorch, side by
side in one run, within a time budget that fits a short lease on a GPU.

    python -m bench.gpu_check ops OUT [--budget SECONDS] [--dry-run]     # OUT/ops.md, OUT/ops.json
    python -m bench.gpu_check model OUT [--budget SECONDS] [--dry-run]   # OUT/model.md, OUT/model.json
    python -m bench.gpu_check env OUT                                    # OUT/environment.json
    python -m bench.gpu_check gpu-name                                   # e.g. h200 (tuning.gpus), or "cpu"

ops: the kernel shapes of bench.workloads (linear 8192x4096x4096 and 16384x384x1536 +GELU, causal
attention T 1024-4096 at D 64 and 128, layer_norm, softmax_entropy 8192x50304, halt_update, the
block), each on the "torch" backend, PyTorch's SDPA with the flash and the cuDNN kernel forced (for
attention), and the kernel backends that run natively here; and a device-to-device copy, whose
bandwidth is the ceiling a memory-bound kernel is measured against. model: the eval forward of
LoopLM 1Lx12 (B=64, T=256) on each backend, fixed depth and with half the tokens halting at loop
4 (its notes: the halting efficiency, bench.workloads.halting_efficiency); greedy decode at batch 1
and 16 against Hugging Face GPT-2 of equal depth and width with its KV cache, where transformers is
installed; the forward compiled (CUDA graphs), fixed depth against halting on a frozen capacity plan.

Variants of one case run in interleaved rounds (bench.test_bench_adaptive.interleaved_medians), each
call repeated until it takes about a millisecond and synchronised, so that ratios compare work done
under the same conditions. A case that would start after the budget is spent is listed as not run.
--dry-run: tiny shapes on whatever device is here (the CPU: the "torch" backend only; interpreted and
emulated backends are never timed), to check that the tables come out.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tabulate import tabulate

from bench.harness import KERNEL_BACKENDS
from bench.test_bench_adaptive import interleaved_medians
from bench.test_bench_kernels import make_args
from bench.workloads import CPU_SMALL, KERNEL_SHAPES, SHAKESPEARE, build_model, calibrate_halting, \
    halting_efficiency, op_cost, token_batch
from looplm import LoopGPT, available_backends, get_backend
from looplm.cli import CLIError, run_cli
from looplm.fileio import atomic_write_text
from looplm.testing import cuda_graph_rules

ROUNDS = 5
CALL_SECONDS = 1e-3  # each timed call repeats the op until it takes about this long

# The same ops at shapes a CPU runs in moments (--dry-run).
DRY_SHAPES: dict[str, list[dict]] = {
    "softmax_entropy": [dict(N=64, V=300)], "layer_norm": [dict(N=64, C=96)],
    "linear": [dict(M=64, K=32, N=48, epilogue="bias+gelu")],
    "attention": [dict(B=1, H=2, T=32, D=16)], "halt_update": [dict(N=64, C=32)],
    "block": [dict(B=1, T=16, C=32, H=2)],
}
COPY_BYTES = 1 << 30  # the copy ceiling's buffer (bytes read; as many written)


def native_backends() -> list[str]:
    """The kernel backends that run natively here (the others are correctness tools, never timed)."""
    return [name for name, a in available_backends().items() if name in KERNEL_BACKENDS and a.available
            and a.mode == "native"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeated(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], int]:
    """`fn` repeated n times and synchronised, n chosen so that one call takes about CALL_SECONDS."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    n = max(1, min(1000, round(CALL_SECONDS / max(time.perf_counter() - start, 1e-7))))

    def run() -> None:
        for _ in range(n):
            fn()
        synchronize(device)
    return run, n


def time_variants(variants: dict[str, Callable[[], Any]], device: torch.device, rounds: int = ROUNDS
                  ) -> dict[str, float]:
    """Median seconds of one call of each variant, the variants interleaved round by round."""
    runs, counts = {}, {}
    for name, fn in variants.items():
        runs[name], counts[name] = repeated(fn, device)
    medians = interleaved_medians(runs, rounds)
    return {name: medians[name] / counts[name] for name in variants}


class Budget:
    """Seconds left of a step's allowance; a case is started only while some are left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---- ops

def sdpa_with(backend_name: str) -> Optional[Callable]:
    """PyTorch's SDPA with one kernel forced ("flash", "cudnn"), or None where torch lacks the switch."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}[backend_name]
    if chosen is None:
        return None

    def attention(q, k, v, causal=True, scale=None):
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return attention


def op_variants(op: str, device: torch.device) -> dict[str, Callable]:
    """The ways of running `op` here: the torch backend first (the baseline), then SDPA's own
    kernels for attention (on a GPU), then each native kernel backend."""
    variants = {"torch": get_backend("torch").ops[op]}
    if op == "attention" and device.type == "cuda":
        for name in ("flash", "cudnn"):
            fn = sdpa_with(name)
            if fn is not None:
                variants[f"sdpa-{name}"] = fn
    for backend in native_backends():  # the kernel itself, even where a tuning table sends the op to PyTorch
        variants[backend] = inspect.unwrap(get_backend(backend).ops[op])  # below the compile and tuning wrappers
    return variants


def copy_ceiling(device: torch.device, dry_run: bool) -> dict:
    """Device-to-device copy: bytes read + written per second, the memory-bound ceiling."""
    n = (1 << 20) if dry_run else COPY_BYTES
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = time_variants({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return {"op": "copy", "case": f"copy {n} bytes", "variant": "torch", "ms": 1e3 * seconds,
            "gbps": 2 * n / seconds / 1e9}


def run_ops(device: torch.device, dtype: torch.dtype, budget: Budget, dry_run: bool,
            progress: Callable[[dict], None] = lambda result: None) -> dict:
    """The per-op table; `progress(result so far)` after each case, so that a step killed by its
    timeout still leaves the cases it finished."""
    shapes = DRY_SHAPES if dry_run else KERNEL_SHAPES
    ceiling = copy_ceiling(device, dry_run)
    rows, skipped = [ceiling], []
    result = {"rows": rows, "not_run": skipped, "copy_gbps": ceiling["gbps"]}
    for op, op_shapes in shapes.items():
        for shape in op_shapes:
            progress(result)
            case = " ".join([op, *(f"{k}={v}" for k, v in shape.items())])
            if budget.left() <= 0:
                skipped.append(case)
                continue
            torch.manual_seed(0)
            args = make_args(op, shape, dtype, device)
            nbytes, flops = op_cost(op, shape, torch.empty((), dtype=dtype).element_size())
            variants = op_variants(op, device)
            try:
                with torch.inference_mode():
                    times = time_variants({name: (lambda fn=fn: fn(*args)) for name, fn in variants.items()}, device)
            except Exception as error:  # one failing case must not lose the table
                rows.append({"op": op, "case": case, "variant": "-", "error": f"{type(error).__name__}: {error}"})
                continue
            peers = [times[name] for name in times if name == "torch" or name.startswith("sdpa")]
            best_peer = min(peers)
            for name, seconds in times.items():
                rows.append({"op": op, "case": case, "variant": name, "ms": 1e3 * seconds,
                             "vs_pytorch": best_peer / seconds, "gbps": nbytes / seconds / 1e9,
                             "copy_share": nbytes / seconds / 1e9 / ceiling["gbps"],
                             "tflops": flops / seconds / 1e12})
    return result


def ops_markdown(result: dict, header: str) -> str:
    table = [[r["case"], r["variant"], _fmt(r.get("ms"), ".4f"), _fmt(r.get("vs_pytorch"), ".2f", "x"),
              _fmt(r.get("gbps"), ".0f"), _fmt(r.get("copy_share"), ".0%"), _fmt(r.get("tflops"), ".1f"),
              r.get("error", "")] for r in result["rows"]]
    lines = [header, "",
             "vs PyTorch: the fastest PyTorch way of the same case (the torch backend; SDPA flash or cuDNN for "
             "attention) / this time. GB/s: compulsory traffic / time; copy: that over the device-to-device copy's "
             f"{result['copy_gbps']:.0f} GB/s (read + write), the memory-bound ceiling.", "",
             tabulate(table, ["case", "variant", "ms", "vs PyTorch", "GB/s", "copy", "TFLOP/s", "error"],
                      tablefmt="github")]
    if result["not_run"]:
        lines += ["", "Not run (time budget spent): " + "; ".join(result["not_run"])]
    return "\n".join(lines) + "\n"


# ---- the model

def gpt2_peer(config, device: torch.device, dtype: torch.dtype):
    """Hugging Face GPT-2 of the model's depth (layers x loops), width, heads and vocabulary, or None."""
    try:
        import transformers
    except ImportError:
        return None
    peer_config = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                          n_embd=config.n_embd, n_layer=config.n_layer * config.n_loops,
                                          n_head=config.n_head, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(peer_config).to(device=device, dtype=dtype).eval()


def run_model(device: torch.device, budget: Budget, dry_run: bool,
              progress: Callable[[dict], None] = lambda result: None) -> dict:
    """The model table; `progress(result so far)` after each case (see run_ops)."""
    workload = CPU_SMALL if dry_run else SHAKESPEARE
    backends = ["torch", *native_backends()]
    rows, skipped = [], []
    model = build_model(workload, "torch", device).eval()
    config = model.config
    result = {"model": f"LoopLM {config.n_layer}Lx{config.n_loops}, C={config.n_embd}, {config.n_head} heads, "
                       f"vocab {config.vocab_size}, {str(next(model.parameters()).dtype).removeprefix('torch.')}",
              "peer": None, "rows": rows, "not_run": skipped}
    idx = token_batch(workload, workload.batch, workload.seq, device)
    targets = idx.roll(-1, dims=1)
    tokens = workload.batch * workload.seq
    fixed_depth: dict[str, float] = {}
    halting_model, mean_steps = None, None
    with torch.inference_mode():
        for halting in (False, True):
            case = f"eval forward B={workload.batch} T={workload.seq} halting {'on' if halting else 'off'}"
            progress(result)
            if budget.left() <= 0:
                skipped.append(case)
                continue
            notes = {}
            if halting:
                model = halting_model = build_model(workload, "torch", device, halting=True).eval()
                notes = calibrate_halting(model, idx, workload.halted_fraction)
                mean_steps = notes["mean_steps"]

            def forward(backend: str, h: bool = halting, m=model):
                return lambda: m.set_backend(backend)(idx, targets, halt=h)
            times = _timed_or_error({b: forward(b) for b in backends}, device, rows, case)
            if not halting:
                fixed_depth = times
            for backend, seconds in times.items():
                row_notes = dict(notes)
                if halting and backend in fixed_depth:
                    row_notes["efficiency"] = round(halting_efficiency(fixed_depth[backend], seconds, mean_steps,
                                                                       config.n_loops), 3)
                rows.append({"case": case, "variant": backend, "ms": 1e3 * seconds,
                             "vs_torch": times["torch"] / seconds, "tokens_per_s": tokens / seconds,
                             "notes": row_notes})
        model = build_model(workload, "torch", device).eval()
        new_tokens = 4 if dry_run else 128
        peer = gpt2_peer(model.config, device, next(model.parameters()).dtype)
        if peer is not None:
            result["peer"] = (f"transformers GPT2LMHeadModel ({peer.config.n_layer} layers, same width, heads and "
                              "vocabulary), KV cache, generate(do_sample=False)")
        for batch in (1, 16):
            case = f"greedy decode B={batch} prompt 16, {new_tokens} new"
            progress(result)
            if budget.left() <= 0:
                skipped.append(case)
                continue
            prompt = token_batch(workload, batch, 16, device)
            # On CUDA every backend's generate compiles its decode step (a CUDA graph) in its first call:
            # torch always, then each backend only while the budget holds one more compile.
            joined = [b for i, b in enumerate(backends) if dry_run or budget.left() >= COMPILE_SECONDS * i]
            skipped.extend(f"{case} ({b})" for b in backends if b not in joined)
            variants = {b: (lambda b=b: model.set_backend(b).generate(prompt, new_tokens, temperature=0.0))
                        for b in joined}
            if peer is not None:
                mask = torch.ones_like(prompt)
                variants[f"HF GPT-2 {peer.config.n_layer}L"] = lambda: peer.generate(
                    prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0)
            times = _timed_or_error(variants, device, rows, case, rounds=3)
            for name, seconds in times.items():
                rows.append({"case": case, "variant": name, "ms": 1e3 * seconds, "vs_torch": times["torch"] / seconds,
                             "tokens_per_s": batch * new_tokens / seconds, "notes": {}})
        for backend in backends:  # the kernel backends' ops are custom ops under torch.compile
            case = f"eval forward B={workload.batch} T={workload.seq} compiled, halting on a frozen capacity plan"
            progress(result)
            if budget.left() < COMPILE_SECONDS or halting_model is None:
                skipped.append(f"{case} ({backend})")
                continue
            rows.extend(compiled_halting(halting_model.set_backend(backend), idx, targets, mean_steps, device,
                                         dry_run, case))
    return result


COMPILE_SECONDS = 40  # a compiled case starts only with this much of the budget left


def compiled_halting(model: LoopGPT, idx: torch.Tensor, targets: torch.Tensor, mean_steps: float,
                     device: torch.device, dry_run: bool, case: str) -> list[dict]:
    """The model's forward on its backend compiled (CUDA graphs on a GPU: mode="reduce-overhead";
    in a dry run Dynamo alone, the graph run under a CUDA graph's rules), fixed depth against
    halting on the capacity plan the eager halting forwards recorded, frozen: the graph whose
    compute falls with the halting share. Rows as run_model's, the halting one with its efficiency
    (mean_steps: the loops its tokens run) and the tokens one forward found no slot for."""
    model.capacity_plans.freeze()
    compiled = torch.compile(model, backend=cuda_graph_rules) if dry_run else \
        torch.compile(model, mode="reduce-overhead")
    backend = model.backend.name
    fixed, halting = f"{backend} compiled, fixed depth", f"{backend} compiled, halting"
    rows: list[dict] = []
    times = _timed_or_error({fixed: lambda: compiled(idx, targets, halting=False),
                             halting: lambda: compiled(idx, targets, halting=True)}, device, rows, case)
    if not times:
        return rows
    model.capacity_dropped.zero_()
    compiled(idx, targets, halting=True)
    efficiency = halting_efficiency(times[fixed], times[halting], mean_steps, model.config.n_loops)
    notes = {fixed: {}, halting: {"efficiency": round(efficiency, 3),
                                  "tokens_without_a_slot": int(model.capacity_dropped)}}
    for name, seconds in times.items():
        rows.append({"case": case, "variant": name, "ms": 1e3 * seconds, "vs_torch": times[fixed] / seconds,
                     "tokens_per_s": idx.numel() / seconds, "notes": notes[name]})
    return rows


def _timed_or_error(variants: dict, device: torch.device, rows: list, case: str, rounds: int = ROUNDS) -> dict:
    try:
        return time_variants(variants, device, rounds)
    except Exception as error:  # one failing case must not lose the table
        rows.append({"case": case, "variant": "-", "error": f"{type(error).__name__}: {error}"})
        return {}


def model_markdown(result: dict, header: str) -> str:
    table = [[r["case"], r["variant"], _fmt(r.get("ms"), ".2f"), _fmt(r.get("vs_torch"), ".2f", "x"),
              _fmt(r.get("tokens_per_s"), ".0f"), json.dumps(r["notes"]) if r.get("notes") else r.get("error", "")]
             for r in result["rows"]]
    lines = [header, "", f"Model: {result['model']}. Peer: {result['peer'] or 'none (transformers not installed)'}.",
             "vs torch: the torch backend's time / this time (a compiled row: its backend's compiled fixed "
             "depth's time / this time).", "",
             tabulate(table, ["case", "variant", "ms", "vs torch", "tokens/s", "notes"], tablefmt="github")]
    if result["not_run"]:
        lines += ["", "Not run (time budget spent): " + "; ".join(result["not_run"])]
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


# ---- environment and the command line

def environment() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda or "none",
                         **{p: version(p) for p in ("triton", "cuda-tile", "transformers")}},
            "backends": {name: {"available": a.available, "mode": a.mode, "reason": a.reason}
                         for name, a in available_backends().items()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def gpu_name() -> str:
    """The short name tables and results are filed under (tuning.gpus), else the CUDA name, or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    from tuning.gpus import gpu_for_device
    name = torch.cuda.get_device_name()
    known = gpu_for_device(name)
    return known.name if known else name.lower().replace("nvidia", "").strip().replace(" ", "-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["ops", "model", "env", "gpu-name"])
    p.add_argument("out", type=Path, nargs="?", help="the results folder (ops, model, env)")
    p.add_argument("--budget", type=float, default=150.0, help="seconds after which no new case starts")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, on the CPU too: checks the tables come out")
    args = p.parse_args(argv)
    if args.what == "gpu-name":
        print(gpu_name())
        return 0
    if args.out is None:
        raise CLIError(f"{args.what} needs the results folder: python -m bench.gpu_check {args.what} OUT")
    if args.budget <= 0:
        raise CLIError(f"--budget must be > 0 seconds, got {args.budget}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if args.what == "env":
        atomic_write_text(args.out / "environment.json", json.dumps(env, indent=1) + "\n")
        print(json.dumps(env, indent=1))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.dry_run and device.type != "cuda":
        raise CLIError("no CUDA device here: the tables are for a GPU (--dry-run checks them at tiny shapes)")
    torch.manual_seed(0)
    budget = Budget(args.budget)
    header = (f"# {'Ops' if args.what == 'ops' else 'The model'} against PyTorch on {env['device']}"
              f"{' (dry run, tiny shapes)' if args.dry_run else ''}\n\n"
              f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, cuda-tile "
              f"{env['versions']['cuda-tile']}; {env['date']}; command: `python -m bench.gpu_check "
              f"{' '.join(argv if argv is not None else __import__('sys').argv[1:])}`")
    render = ops_markdown if args.what == "ops" else model_markdown

    def save(result: dict) -> str:
        text = render(result, header)
        atomic_write_text(args.out / f"{args.what}.json", json.dumps({**result, "environment": env}, indent=1,
                                                                    default=str) + "\n")
        atomic_write_text(args.out / f"{args.what}.md", text)
        return text
    if args.what == "ops":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result = run_ops(device, dtype, budget, args.dry_run, save)
    else:
        result = run_model(device, budget, args.dry_run, save)
    print(save(result))
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m bench.gpu_check")
