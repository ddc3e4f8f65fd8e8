"""Ahead-of-time compilation of the kernels for a GPU that is not here (tier 0, the tuner).

What is compiled is what runs: a kernel module's own launcher is called on meta tensors of the
launch's shape inside `common.captured_launches()`, which records each launch (kernel, grid, every
argument) instead of running it, and `compile_launch` then specialises every argument the way
Triton's JIT does at a real launch (`native_specialize_impl`: integers equal to 1 become constants,
integers and pointers divisible by 16 carry `tt.divisibility=16`, so loads vectorise as they will
on the GPU) and compiles that for an architecture such as sm_90. It reports the resources of the
cubin: registers, spill stores and loads, stack frame, local and shared memory.

With Triton's interpreter on, compiles run in a worker process started without it
(`python -m looplm_triton.aot`, one per calling thread, requests and answers as JSON lines): under
the interpreter kernels are not compilable objects, and calls of `@triton.jit` helpers (tl.sum,
tl.max) leave `triton.language` patched in that process.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from typing import Any

import torch

from looplm import kernels
from tuning.gpus import COMPILE_TARGETS

ARCHS = COMPILE_TARGETS
LAUNCH_KNOBS = ("num_warps", "num_stages")  # configuration keys that are launch options, not constexprs
_WORKERS = threading.local()
# ptxas's report reaches Python's stdout, which is one per process, and the knob that asks for it is
# global too: compiles in threads of one process take turns, or one's report lands in another's log.
_PTXAS_REPORT = threading.Lock()


def capability(arch: str) -> int:
    """'sm_90' -> 90; 'sm_100a' -> 100."""
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if match is None:
        raise ValueError(f"arch must look like 'sm_90' (one of {ARCHS}), got {arch!r}")
    return int(match.group(1))


def describe_argument(value: Any) -> Any:
    """A launch argument as JSON: a tensor by its dtype and the byte offset of its first element from
    its (aligned) allocation, which decides the pointer's divisibility; a tensor descriptor (TMA) by
    its tensor, shape, strides and block shape; a scalar as itself."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."),
                "offset": value.storage_offset() * value.element_size()}
    if type(value).__name__ == "TensorDescriptor":  # triton.tools.tensor_descriptor, built on the host
        return {"descriptor": describe_argument(value.base), "shape": [int(n) for n in value.shape],
                "strides": [int(n) for n in value.strides], "block_shape": [int(n) for n in value.block_shape]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def compile_launch(launch, arch: str, sass: bool = False) -> dict[str, Any]:
    """Compile one recorded launch (`common.Launch`) for `arch`, specialised as the JIT would;
    returns its resources (see `cubin_resources`) plus "threads" per block, spills from ptxas's
    report, its bulk tensor copies (`tma_copies`) and, with `sass`, "sass": the cubin's machine code
    (`looplm.kernels.disassemble`), for what a caller wants to read in it."""
    fn = getattr(launch.kernel, "fn", launch.kernel)  # the Python function behind a JITFunction/InterpretedFunction
    request = dict(module=fn.__module__, name=fn.__name__, arch=arch,
                   args={name: describe_argument(v) for name, v in launch.args.items()}, options=dict(launch.options),
                   sass=sass)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _ask_worker(request)
    return _compile_by_name(**request)


def _ask_worker(request: dict) -> dict[str, Any]:
    worker = getattr(_WORKERS, "process", None)
    if worker is None or worker.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        worker = subprocess.Popen([sys.executable, "-m", "looplm_triton.aot"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env, text=True)
        _WORKERS.process = worker
    worker.stdin.write(json.dumps(request) + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the compile worker exited (status {worker.wait()}) on {request['name']}")
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"compiling {request['name']} for {request['arch']} with {request['options']} "
                           f"failed:\n{answer['error']}")
    return answer["resources"]


def _serve() -> None:
    """The worker's loop: one JSON request per line in, one JSON answer per line out."""
    for line in sys.stdin:
        try:
            answer = {"resources": _compile_by_name(**json.loads(line))}
        except Exception as e:  # the caller raises it, with the request
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


class _Pointer:
    """What Triton's specialiser reads of a tensor argument: its dtype and its address."""

    def __init__(self, dtype: str, offset: int):
        self.dtype = getattr(torch, dtype)
        self._address = offset  # allocations are 256-byte aligned; only the offset decides divisibility

    def data_ptr(self) -> int:
        return self._address


def _stand_in(value: Any) -> Any:
    """What the specialiser reads of a described argument (see `describe_argument`)."""
    if isinstance(value, dict) and "descriptor" in value:  # its type: tensordesc<dtype[block shape]>
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor(_stand_in(value["descriptor"]), value["shape"], value["strides"], value["block_shape"])
    if isinstance(value, dict):
        return _Pointer(value["tensor"], value["offset"])
    return value


def specialise(kernel, args: dict, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, exactly as the JIT derives them at a launch."""
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if name not in args:
            raise ValueError(f"{kernel.fn.__name__}: the launch gave no value for argument {name!r}")
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        stand_in = _stand_in(value)
        kind, attr = native_specialize_impl(type(backend), stand_in, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)[:2]
        if kind == "constexpr":  # an integer 1, which the JIT folds into the code
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = kind
        if isinstance(attr, str) and attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _compile_by_name(module: str, name: str, arch: str, args: dict, options: dict, sass: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", capability(arch), 32)
    signature, constexprs, attrs = specialise(kernel, args, make_backend(target))
    log = io.StringIO()
    with _PTXAS_REPORT:
        dump = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; its report goes to stdout
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                    attrs=attrs), target=target, options=options)
        finally:
            triton.knobs.nvidia.dump_ptxas_log = dump
    resources = cubin_resources(compiled.asm["cubin"])
    resources.update(ptxas_report(log.getvalue()))
    resources["shared_mem"] = max(resources.get("shared_mem", 0), int(compiled.metadata.shared))
    resources["threads"] = 32 * int(compiled.metadata.num_warps)
    resources.update(tma_copies(compiled.asm["ptx"]))
    if sass:
        resources["sass"] = kernels.disassemble(compiled.asm["cubin"], tool=triton.knobs.nvidia.cuobjdump.path)
    return resources


def tma_copies(ptx: str) -> dict[str, int]:
    """How many bulk tensor copies (TMA, sm_90 and later) the PTX issues: "tma_loads" (global to
    shared) and "tma_stores" (shared to global); both 0 for a kernel that addresses by pointers."""
    return {"tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared", ptx)),
            "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global", ptx))}


def ptxas_report(log: str) -> dict[str, int]:
    """Spill stores and loads (bytes per thread) from `ptxas -v`'s report, where present."""
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {} if found is None else {"spill_stores": int(found.group(1)), "spill_loads": int(found.group(2))}


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """{"registers", "stack", "shared_mem", "local_mem"} of the one kernel in `cubin`, as the
    cuobjdump shipped with Triton reports them (looplm.kernels); raises if it names no register count."""
    import triton

    resources = kernels.cubin_resources(cubin, tool=triton.knobs.nvidia.cuobjdump.path)
    if "registers" not in resources:
        raise RuntimeError(f"cuobjdump reported no register count for a {len(cubin)}-byte cubin")
    resources.pop("threads", None)  # the launch's num_warps decides it; set by the caller
    return resources


if __name__ == "__main__":
    _serve()
