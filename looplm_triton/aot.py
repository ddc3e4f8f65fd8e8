"""Ahead-of-time compilation of the kernels for a GPU that is not here (tier 0, the tuner).

`compile_for` turns one kernel, its argument types and a launch configuration into a cubin for
an architecture such as sm_90 and reports the shared memory and registers it needs.

With Triton's interpreter on, compiles run in a worker process started without it
(`python -m looplm_triton.aot`, one per calling thread, requests and answers as JSON lines): under
the interpreter kernels are not compilable objects, and calls of `@triton.jit` helpers (tl.sum,
tl.max) leave `triton.language` patched in that process.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from typing import Any, Mapping

from tuning.gpus import COMPILE_TARGETS
from tuning.spec import Config

ARCHS = COMPILE_TARGETS
LAUNCH_KNOBS = ("num_warps", "num_stages")  # configuration keys that are launch options, not constexprs
_WORKERS = threading.local()


def capability(arch: str) -> int:
    """'sm_90' -> 90; 'sm_100a' -> 100."""
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if match is None:
        raise ValueError(f"arch must look like 'sm_90' (one of {ARCHS}), got {arch!r}")
    return int(match.group(1))


def compile_for(kernel, arch: str, types: Mapping[str, str], constexprs: Mapping[str, Any],
                config: Config) -> dict[str, int]:
    """Compile `kernel` to a cubin for `arch`; returns {"shared_mem": bytes, "registers": per thread}.

    types: each runtime argument's Triton type ('*bf16', 'i32', 'fp32'); constexprs: the kernel's
    compile-time arguments other than the configuration's block sizes.
    """
    fn = getattr(kernel, "fn", kernel)  # the Python function behind a JITFunction or InterpretedFunction
    request = dict(module=fn.__module__, name=fn.__name__, arch=arch, types=dict(types),
                   constexprs=dict(constexprs), config=dict(config))
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _ask_worker(request)
    return _compile_by_name(**request)


def _ask_worker(request: dict) -> dict[str, int]:
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
        raise RuntimeError(f"the compile worker exited (status {worker.wait()}) on {request}")
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"compiling {request['name']} for {request['arch']} with {request['config']} "
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


def _compile_by_name(module: str, name: str, arch: str, types: dict, constexprs: dict, config: Config) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    options = {k: v for k, v in config.items() if k in LAUNCH_KNOBS}
    constants = {**constexprs, **{k: v for k, v in config.items() if k not in LAUNCH_KNOBS}}
    missing = [arg for arg in kernel.arg_names if arg not in types and arg not in constants]
    if missing:
        raise ValueError(f"{name}: no type or value given for arguments {missing}")
    signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", capability(arch), 32), options=options)
    return {"shared_mem": int(compiled.metadata.shared), "registers": cubin_registers(compiled.asm["cubin"])}


def cubin_registers(cubin: bytes) -> int:
    """Registers per thread of the one kernel in `cubin`, as the cuobjdump shipped with Triton reports."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                                capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump reported no register count:\n{report}")
    return int(match.group(1))


if __name__ == "__main__":
    _serve()
