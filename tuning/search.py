"""The search: find the kernels, plan what to time, prune what cannot run, time the rest, pick the best.

    discover  ->  Kernel per backend and op, from the modules' TUNING (a missing one is a note)
    plan      ->  Task per (kernel, dtype, shape bucket): the candidates, minus those an ahead-of-time
                  compile for the target shows cannot fit its shared memory or registers, plus the
                  PyTorch op itself (`TORCH_IMPL`) wherever the op call behind the shape is known
                  (model shapes), so that the table records PyTorch where it wins
    run_tasks ->  each candidate measured by a runner: its output checked against the "reference"
                  backend's op on the same inputs (`KernelTuning.expected`), then its median time; a
                  failure or a hang is recorded with its reason, never fatal; an unchecked candidate is
                  never timed, so never crowned
    select    ->  the table entry: the best, the runners-up, the failed and the pruned

`IsolatedRunner` measures in a worker process, so a candidate that hangs is abandoned at its time
limit and one that crashes the process (or the CUDA context) costs only a fresh worker.
"""
from __future__ import annotations

import contextlib
import importlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from looplm.backends import KERNEL_PACKAGES
from looplm.ops import OP_NAMES
from looplm.testing import tolerance
from tuning.buckets import ModelShape, OpCall, Shape, bucket, calls_by_key, describe_call, materialize
from tuning.gpus import ArchLimits, resource_problem
from tuning.spec import TORCH_IMPL, Config, KernelTuning, candidate_errors, is_torch
from tuning.timing import Timer

REASON_CHARS = 300


def describe(error: BaseException) -> str:
    """One line saying why: the exception's type and the first line of its message, shortened."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


# ---- discovery

@dataclass(frozen=True)
class Kernel:
    op: str  # the op of looplm.ops whose module holds it
    module: str  # e.g. "looplm_triton.layer_norm"; workers import the tuning from here
    tuning: KernelTuning = field(compare=False, repr=False)
    attr: str = "TUNING"

    @property
    def backend(self) -> str:
        return self.tuning.backend

    @property
    def name(self) -> str:
        return self.tuning.kernel


def load_tuning(module: str, attr: str = "TUNING") -> KernelTuning:
    tuning = getattr(importlib.import_module(module), attr, None)
    if not isinstance(tuning, KernelTuning):
        raise LookupError(f"{module} defines no {attr} = KernelTuning(...)")
    return tuning


def discover(backends: Sequence[str], names: Optional[Sequence[str]] = None,
             ops: Sequence[str] = OP_NAMES) -> tuple[list[Kernel], list[str]]:
    """The kernels of `backends` (their op modules' TUNING), optionally only those whose op or kernel
    name is in `names`; and a note for each module or TUNING that is missing or broken."""
    kernels, notes = [], []
    for backend in backends:
        package = KERNEL_PACKAGES[backend]
        for op in ops:
            module = f"{package}.{op}"
            try:
                tuning = load_tuning(module)
            except ModuleNotFoundError as e:
                notes.append(f"{module}: skipped, not written yet" if e.name == module
                             else f"{module}: skipped, cannot import: {describe(e)}")
                continue
            except LookupError:
                notes.append(f"{module}: skipped, it defines no TUNING = KernelTuning(...)")
                continue
            except ImportError as e:  # a package the backend needs is missing or broken
                notes.append(f"{module}: skipped, import failed: {describe(e)}")
                continue
            if tuning.backend != backend:
                notes.append(f"{module}: skipped, its TUNING says backend {tuning.backend!r}, not {backend!r}")
                continue
            kernels.append(Kernel(op, module, tuning))
    if names is not None:
        known = {k.op for k in kernels} | {k.name for k in kernels}
        unknown = sorted(set(names) - known - set(OP_NAMES))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; ops are {', '.join(OP_NAMES)}")
        kernels = [k for k in kernels if k.op in names or k.name in names]
    return kernels, notes


# ---- planning

@dataclass
class Task:
    """One table entry to measure: a kernel at one dtype and shape bucket."""

    kernel: Kernel
    dtype: str
    shape: Shape  # the launch measured, representing its bucket
    candidates: list[Config]
    pruned: list[dict] = field(default_factory=list)  # {"config", "reason"}
    arch: Optional[str] = None  # the compile target it is tuned for
    op_call: Optional[tuple] = None  # the op call behind `shape` (describe_call), for the PyTorch candidate

    @property
    def bucket(self) -> Shape:
        return bucket(self.shape)


def candidates_of(tuning: KernelTuning, dtype: Optional[str] = None, arch: Optional[str] = None) -> list[Config]:
    """The search space without repeats, with the default of `dtype` on `arch` always in (the yardstick)."""
    out: list[Config] = []
    for config in [*tuning.space, tuning.default if dtype is None else tuning.default_for(dtype, arch)]:
        if config not in out:
            out.append(dict(config))
    return out


def task_shapes(kernel: Kernel, dtype: str, models: Sequence[ModelShape], shapes: Sequence[Shape],
                notes: list[str]) -> list[tuple[Shape, Optional[OpCall]]]:
    """One launch shape per bucket, with the op call behind it where known: the explicit `shapes`
    (no call), or those the models launch."""
    found: list[tuple[Shape, Optional[OpCall]]] = [(tuple(s), None) for s in shapes]
    if not shapes:
        if kernel.tuning.shape_key is None:
            notes.append(f"{kernel.module}: TUNING has no shape_key, so model shapes are unknown; pass --shapes")
            return []
        for model in models:
            try:
                found += list(calls_by_key(kernel.op, kernel.tuning.shape_key, model, getattr(torch, dtype)).items())
            except (TypeError, ValueError) as e:  # a shape_key that does not take the op's arguments
                notes.append(f"{kernel.module}: shape_key failed on model shape {model.name!r}: {describe(e)}")
    by_bucket: dict[Shape, tuple[Shape, Optional[OpCall]]] = {}
    for shape, call in found:
        by_bucket.setdefault(bucket(shape), (shape, call))
    if shapes:
        notes.append("explicit --shapes: the PyTorch op is not timed beside the kernels (its arguments are known "
                     "only for model shapes)")
    return list(by_bucket.values())


def why_pruned(tuning: KernelTuning, shape: Shape, dtype: str, config: Config, limits: ArchLimits) -> Optional[str]:
    """Why `config` cannot run on `limits.arch` (it does not compile, or does not fit), or None."""
    try:
        resources = tuning.compile(shape, getattr(torch, dtype), config, limits.arch)
    except candidate_errors() as e:
        return f"does not compile for {limits.arch}: {describe(e)}"
    return resource_problem(resources or {}, config, limits)


def _why_pruned_by_ref(module: str, attr: str, shape: Shape, dtype: str, config: Config,
                       limits: ArchLimits) -> Optional[str]:
    return why_pruned(load_tuning(module, attr), shape, dtype, config, limits)


def prune(kernel: Kernel, dtype: str, shape: Shape, candidates: Iterable[Config],
          limits: ArchLimits) -> tuple[list[Config], list[dict]]:
    """Split candidates into those that compile for `limits.arch` and fit it, and the rest with why."""
    task = Task(kernel, dtype, shape, [])
    for config in candidates:
        _sort(task, config, why_pruned(kernel.tuning, shape, dtype, config, limits))
    return task.candidates, task.pruned


def _sort(task: Task, config: Config, reason: Optional[str]) -> None:
    if reason is None:
        task.candidates.append(config)
    else:
        task.pruned.append({"config": config, "reason": reason})


def plan(kernels: Sequence[Kernel], dtypes: Sequence[str], limits: ArchLimits, models: Sequence[ModelShape] = (),
         shapes: Sequence[Shape] = (), progress: bool = False, workers: int = 1) -> tuple[list[Task], list[str]]:
    """Every (kernel, dtype, bucket) to tune with its pruned candidates, and notes on what was skipped.

    Compiles run in `workers` processes when more than one (kernels are then imported there by module
    name); candidates keep their order either way.
    """
    notes: list[str] = []
    tasks = [Task(k, d, s, [], arch=limits.arch, op_call=None if call is None else describe_call(*call))
             for k in kernels for d in dtypes for s, call in task_shapes(k, d, models, shapes, notes)]
    jobs = [(task, config) for task in tasks for config in candidates_of(task.kernel.tuning, task.dtype, task.arch)]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            refs = [(t.kernel.module, t.kernel.attr, t.shape, t.dtype, c, limits) for t, c in jobs]
            reasons = pool.map(_why_pruned_by_ref, *zip(*refs))
        else:
            reasons = (why_pruned(t.kernel.tuning, t.shape, t.dtype, c, limits) for t, c in jobs)
        bar = stack.enter_context(_progress(len(jobs), progress, f"compiling for {limits.arch}"))
        for (task, config), reason in zip(jobs, reasons):
            _sort(task, config, reason)
            bar.update(1)
    for task in tasks:
        if task.op_call is not None and task.kernel.op in OP_NAMES:
            task.candidates.append(dict(TORCH_IMPL))
    return tasks, list(dict.fromkeys(notes))


# ---- measuring

@dataclass(frozen=True)
class Job:
    """One candidate to measure; plain data, so that it can travel to a worker process."""

    module: str
    attr: str
    shape: Shape
    dtype: str
    config: Config
    device: str = "cuda"
    op: Optional[str] = None  # the op of looplm.ops, and the call (describe_call) for the PyTorch candidate
    op_call: Optional[tuple] = None


@dataclass(frozen=True)
class Outcome:
    median_ms: Optional[float] = None
    reason: Optional[str] = None  # why it failed; None on success
    healthy: bool = True  # False: the process that measured it must not measure again


def output_mismatch(actual: Any, expected: Any, dtype: torch.dtype) -> Optional[str]:
    """Why two launch results differ beyond `dtype`'s composed tolerance (looplm.testing), or None."""
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not isinstance(a, torch.Tensor):
            continue
        try:
            torch.testing.assert_close(a.float(), e.float(), equal_nan=False, **tolerance(dtype, composed=True))
        except AssertionError as error:
            return f"output {i} differs from the reference backend's: {describe(error)}"
    return None


def _device_healthy(device: str) -> bool:
    if not str(device).startswith("cuda"):
        return True
    try:
        torch.cuda.synchronize()
        return True
    except RuntimeError:  # a sticky CUDA error: this context is done
        return False


def measure(job: Job, timer: Timer) -> Outcome:
    """Check one candidate's output against the reference backend's on the same inputs, then time
    it. A kernel without `expected` is refused: nothing unchecked is ever timed."""
    if is_torch(job.config):
        return measure_torch_op(job, timer)
    tuning = load_tuning(job.module, job.attr)
    if tuning.expected is None:
        return Outcome(reason=f"{job.module}.{job.attr} has no `expected`: its output cannot be checked, so it "
                              "is not timed")
    dtype = getattr(torch, job.dtype)
    try:
        torch.manual_seed(0)
        args = tuning.make_args(job.shape, dtype, job.device)
        actual = tuning.run(*args, config=job.config)
        problem = output_mismatch(actual, tuning.expected(*args), dtype)
        if problem is not None:
            return Outcome(reason=f"wrong output: {problem}")
        del actual
        return Outcome(median_ms=float(timer(lambda: tuning.run(*args, config=job.config))))
    except candidate_errors() as e:
        return Outcome(reason=describe(e), healthy=_device_healthy(job.device))


def measure_torch_op(job: Job, timer: Timer) -> Outcome:
    """The PyTorch candidate: the "torch" backend's op on the call behind the task's shape, checked
    against the "reference" backend's like every candidate, then timed."""
    from looplm import get_backend
    if job.op is None or job.op_call is None:
        return Outcome(reason="no op call is known for this shape, so the PyTorch op cannot be run")
    try:
        torch.manual_seed(0)
        args, kwargs = materialize(job.op_call, job.device)
        torch_op = get_backend("torch").ops[job.op]
        with torch.inference_mode():
            problem = output_mismatch(torch_op(*args, **kwargs), get_backend("reference").ops[job.op](*args, **kwargs),
                                      getattr(torch, job.dtype))
            if problem is not None:
                return Outcome(reason=f"wrong output: {problem}")
            return Outcome(median_ms=float(timer(lambda: torch_op(*args, **kwargs))))
    except candidate_errors() as e:
        return Outcome(reason=describe(e), healthy=_device_healthy(job.device))


class InProcessRunner:
    """Measures in this process: no protection from hangs; for tests and debugging."""

    def __init__(self, timer: Timer):
        self.timer = timer

    def __call__(self, job: Job) -> Outcome:
        return measure(job, self.timer)

    def close(self) -> None:
        pass


def _worker_main(conn, timer: Timer) -> None:
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        outcome = measure(job, timer)
        conn.send(outcome)
        if not outcome.healthy:
            return


class IsolatedRunner:
    """Measures in a worker process; a candidate past `time_limit_s` is abandoned and its worker
    killed, a dead or broken worker is replaced, and either is recorded as the candidate's failure."""

    def __init__(self, timer: Timer, time_limit_s: float = 60.0, start_limit_s: float = 300.0):
        if time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
        self.timer, self.time_limit_s, self.start_limit_s = timer, time_limit_s, start_limit_s
        self._process = self._conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh CUDA context, never a forked one
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_worker_main, args=(child, self.timer), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(self.start_limit_s) or self._receive() != "ready":
            code = self._stop()
            raise RuntimeError(f"the measuring process did not start within {self.start_limit_s:g} s "
                               f"(exit code {code})")

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    def _stop(self) -> Optional[int]:
        if self._process is None:
            return None
        process, self._process = self._process, None
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        self._conn.close()
        return process.exitcode

    def __call__(self, job: Job) -> Outcome:
        if self._process is None:
            self._start()
        self._conn.send(job)
        if not self._conn.poll(self.time_limit_s):
            self._process.kill()
            self._stop()
            return Outcome(reason=f"no result within the {self.time_limit_s:g} s time limit; abandoned",
                           healthy=False)
        outcome = self._receive()
        if not isinstance(outcome, Outcome):
            return Outcome(reason=f"the measuring process died (exit code {self._stop()})", healthy=False)
        if not outcome.healthy:
            self._stop()
        return outcome

    def close(self) -> None:
        if self._process is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._stop()

    def __enter__(self) -> "IsolatedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- selecting

def select(task: Task, outcomes: Sequence[tuple[Config, Outcome]]) -> dict:
    """The table entry of `task`: the fastest success (ties: the earlier candidate) is best."""
    timed = sorted((o.median_ms, i, c) for i, (c, o) in enumerate(outcomes) if o.reason is None)
    ranked = [{"config": c, "median_ms": round(ms, 6)} for ms, _, c in timed]
    default = task.kernel.tuning.default_for(task.dtype, task.arch)
    default_ms = next((r["median_ms"] for r in ranked if r["config"] == default), None)
    return {"backend": task.kernel.backend, "kernel": task.kernel.name, "dtype": task.dtype,
            "bucket": list(task.bucket), "shape": list(task.shape),
            "best": ranked[0] if ranked else None, "default_ms": default_ms, "runners_up": ranked[1:],
            "failed": [{"config": c, "reason": o.reason} for c, o in outcomes if o.reason is not None],
            "pruned": task.pruned}


def run_tasks(tasks: Sequence[Task], runner: Callable[[Job], Outcome], device: str = "cuda", progress: bool = False,
              on_entry: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Measure every candidate of every task; one entry per task, in order."""
    entries = []
    bar = _progress(sum(len(t.candidates) for t in tasks), progress, "tuning")
    try:
        for task in tasks:
            bar.set_postfix_str(f"{task.kernel.backend}/{task.kernel.name} {task.dtype} "
                                f"{'x'.join(map(str, task.shape))}", refresh=False)
            outcomes = []
            for config in task.candidates:
                job = Job(task.kernel.module, task.kernel.attr, task.shape, task.dtype, config, device,
                          task.kernel.op, task.op_call)
                outcomes.append((config, runner(job)))
                bar.update(1)
            entry = select(task, outcomes)
            entries.append(entry)
            if on_entry is not None:
                on_entry(entry)
    finally:
        bar.close()
    return entries


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, unit="cfg", leave=False, dynamic_ncols=True)
