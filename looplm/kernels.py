"""Kernel plumbing both kernel backends share: grid limits, recording launches instead of running
them (for an ahead-of-time compile of exactly what a launcher launches), picking the most demanding
of a run's compiled launches, the architecture a launch compiles for, the order causal attention
hands its programs out in, and reading a cubin's resources and machine code with cuobjdump.

A backend's `launch` asks `recording()`; inside `captured_launches(arch)` it hands its launch record
(whatever that backend compiles from: a Triton `Launch`, a cuTile tuple) to `record` instead of
running it. Launchers ask `launch_arch(device)` for the architecture a launch compiles for (the
recorded one inside a recording, the GPU's own on CUDA) to choose their defaults by it (e.g.
attention's larger tiles on sm_90), and `persistent_programs` to size a persistent grid.
`looplm_triton.common` and `looplm_tile.runtime` re-export these names for their kernel modules.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def check_grid(grid: Sequence[int]) -> tuple[int, ...]:
    """`grid` if CUDA can launch it, else a clear error (axes 1 and 2 stop at 65535 blocks)."""
    for axis, (blocks, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 0 <= blocks <= limit:
            raise ValueError(f"grid {tuple(grid)}: axis {axis} has {blocks} blocks; CUDA allows at most {limit}")
    return tuple(grid)


# ---- recording launches

_recording = threading.local()


@contextlib.contextmanager
def captured_launches(arch: Optional[str] = None) -> Iterator[list]:
    """Within (this thread): kernel launches are recorded in the yielded list instead of run (call
    the launchers with meta tensors), and `recording_arch()` answers `arch` (e.g. "sm_90"; None:
    no particular GPU), so that launchers which choose by architecture choose for that one."""
    previous = getattr(_recording, "launches", None), getattr(_recording, "arch", None)
    launches: list = []
    _recording.launches, _recording.arch = launches, arch
    try:
        yield launches
    finally:
        _recording.launches, _recording.arch = previous


def recording() -> bool:
    """Whether launches are being recorded (inside `captured_launches`) rather than run."""
    return getattr(_recording, "launches", None) is not None


def recording_arch() -> Optional[str]:
    """The architecture the recorded launches are for (None outside a recording, or for none)."""
    return getattr(_recording, "arch", None) if recording() else None


def record(launch: Any) -> None:
    """Add one launch record to the current recording."""
    _recording.launches.append(launch)


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> str:
    import torch

    from tuning.gpus import UnknownGpu, arch_for_capability
    capability = torch.cuda.get_device_capability(index)
    try:
        return arch_for_capability(capability).arch
    except UnknownGpu:  # no limits listed for it (e.g. sm_75): its own name, which no default is keyed by
        return f"sm_{capability[0]}{capability[1]}"


def launch_arch(device: torch.device) -> Optional[str]:
    """The architecture ("sm_90") a launch on `device` compiles for, which launchers choose their
    defaults by: inside `captured_launches(arch)`, the recorded `arch` (an ahead-of-time compile on
    meta tensors); on a CUDA device, the GPU's own, as the closest architecture `tuning.gpus` lists
    (an sm_103 takes sm_100's defaults; cached per device); None elsewhere (an interpreter or
    emulator on CPU tensors)."""
    if recording():
        return recording_arch()
    if device.type == "cuda":
        import torch
        return _device_arch(torch.cuda.current_device() if device.index is None else device.index)
    return None


def multiprocessors(device: torch.device) -> Optional[int]:
    """SMs a persistent launch on `device` spreads its programs over: inside a recording, those of
    the recorded architecture's reference GPU (`tuning.gpus.reference_sms`); on a GPU, its own; None
    elsewhere (an interpreter or emulator, which picks its own count)."""
    if recording():
        from tuning.gpus import reference_sms
        return reference_sms(recording_arch())
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def persistent_programs(device: torch.device, tiles: int, per_sm: int = 1, without_gpu: int = 4) -> int:
    """Programs of a persistent launch over `tiles` output tiles: `per_sm` on each SM
    (`multiprocessors`: a recorded launch takes its target's reference GPU), at most one per tile;
    `without_gpu` in an interpreter or emulator (a few, each walking several tiles)."""
    sms = multiprocessors(device)
    return max(1, min(tiles, without_gpu if sms is None else sms * per_sm))


# ---- the order of causal attention's programs (both backends' attention kernels spell it)
#
# Under causal masking query block i of a head reads keys up to its own position, so the latest
# blocks cost the most. Programs are handed to SMs in grid order, so the order decides how well
# the last wave is packed: heads are taken in sections, and within a section every head's heaviest
# block comes first, then every head's next heaviest, and so on (longest first, as FlashAttention-3's
# scheduler orders them). A section holds as many heads as SECTION_KV_BYTES of their keys and
# values allow, so that the section finishing and the one starting (about 2 x 16 MiB) stay in the
# 40-50 MB L2 of an A100 / H100 / H200 while every block of their heads reads them; one section of
# all heads would stream every head's K and V from memory at once. `python -m bench.roofline
# --causal-order` simulates the orders (bench.roofline.CAUSAL_ORDER_SHAPES).
SECTION_KV_BYTES = 16 * 2 ** 20


def head_kv_bytes(keys: int, head_dim: int, itemsize: int) -> int:
    """The bytes of one head's keys and values: what a section must hold in L2 per head."""
    return 2 * keys * head_dim * itemsize


def attention_section(heads: int, kv_bytes_per_head: int, budget: int = SECTION_KV_BYTES) -> int:
    """Heads per section of causal attention's program order for `heads` (batch x head) heads
    whose K and V take `kv_bytes_per_head` each: the fewest sections whose K and V fit `budget`,
    the heads split evenly among them (a short last section would restart the longest-first order
    in the tail)."""
    most = max(1, min(heads, budget // max(1, kv_bytes_per_head)))
    sections = -(-heads // most)
    return -(-heads // sections)


def attention_program(pid: int, m_blocks: int, heads: int, section: int) -> tuple[int, int]:
    """(batch x head, query block) of program `pid` in the order above, with `m_blocks` query
    blocks per head and `section` heads per section; the kernels compute the same in device code."""
    per_section = section * m_blocks
    first_head = pid // per_section * section
    in_section = pid % per_section
    heads_here = min(section, heads - first_head)
    return first_head + in_section % heads_here, m_blocks - 1 - in_section // heads_here


def capture(run: Callable[..., Any], *args: Any, arch: Optional[str] = None, **kwargs: Any) -> list:
    """The launches `run(*args, **kwargs)` makes for `arch`, recorded, not run (pass meta tensors)."""
    with captured_launches(arch) as launches:
        run(*args, **kwargs)
    if not launches:
        raise RuntimeError(f"{getattr(run, '__name__', run)} launched no kernel")
    return launches


def most_demanding(results: Iterable[dict]) -> dict:
    """Of the compiled resources of a run's launches, the most demanding (local memory first, then
    registers, then shared memory), with "launches": how many were compiled."""
    results = list(results)
    worst = max(results, key=lambda r: (int(r.get("spill_stores", 0) or 0) + int(r.get("stack", 0) or 0)
                                        + int(r.get("local_mem", 0) or 0), r.get("registers", 0),
                                        r.get("shared_mem", 0)))
    return {**worst, "launches": len(results)}


# ---- a cubin's resources

RESOURCE_FIELDS = {"REG": "registers", "STACK": "stack", "SHARED": "shared_mem", "LOCAL": "local_mem"}


def cuobjdump() -> Optional[str]:
    """cuobjdump on PATH, else the one Triton ships next to its ptxas, else None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else None


def parse_resource_usage(report: str) -> dict[str, int]:
    """The fields of `cuobjdump -res-usage` for one kernel (registers per thread, the rest in bytes)."""
    return {RESOURCE_FIELDS[k]: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def _dump(cubin: bytes, tool: str, *options: str) -> list[str]:
    """cuobjdump's output for each of `options` ("-res-usage", "-elf", "-sass") on `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return [subprocess.run([tool, option, f.name], check=True, capture_output=True, text=True).stdout
                for option in options]


def cubin_resources(cubin: bytes, tool: Optional[str] = None) -> dict[str, int]:
    """{"registers", "stack", "shared_mem", "local_mem", "threads"} of the one kernel in `cubin`, as far
    as cuobjdump tells ("threads": the block size the cubin requires, where it says); {} without
    cuobjdump."""
    tool = tool or cuobjdump()
    if tool is None:
        return {}
    usage, elf = _dump(cubin, tool, "-res-usage", "-elf")
    resources = parse_resource_usage(usage)
    block = re.search(r"EIATTR_REQNTID\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)", elf)
    if block:
        resources["threads"] = int(block.group(1), 16) * int(block.group(2), 16) * int(block.group(3), 16)
    return resources


def disassemble(cubin: bytes, tool: Optional[str] = None) -> str:
    """The SASS (machine code) of `cubin`, as `cuobjdump -sass` prints it; "" without cuobjdump."""
    tool = tool or cuobjdump()
    return _dump(cubin, tool, "-sass")[0] if tool else ""
