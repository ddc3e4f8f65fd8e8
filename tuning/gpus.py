"""The GPUs the tuner knows: short name -> CUDA device names, target architecture and its limits.

A table is tuned for one GPU model, named here by a short name (`rtx5070`, `h100`, ...). The
architecture's limits let the tuner prune candidates from an ahead-of-time compile, without a GPU:
a launch needs its shared memory and registers to fit one thread block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ArchLimits:
    arch: str  # the compile target, e.g. "sm_90"
    capability: tuple[int, int]
    shared_mem_per_block: int  # bytes, the opt-in maximum of one thread block
    shared_mem_per_sm: int  # bytes of shared memory one SM holds for all its resident blocks
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    registers_per_block: int = 65536
    registers_per_thread: int = 255
    registers_per_sm: int = 65536


# The architectures every kernel is compiled for ahead of time (tier 0): A100, H100/H200, B200, RTX 50xx.
COMPILE_TARGETS = ("sm_80", "sm_90", "sm_100", "sm_120")

# CUDA C Programming Guide, "Technical Specifications per Compute Capability" (shared memory per SM
# is the configurable maximum; each resident block also reserves 1 KiB of it for the system).
ARCHS: dict[str, ArchLimits] = {a.arch: a for a in (
    ArchLimits("sm_80", (8, 0), 163 * 1024, 164 * 1024),
    ArchLimits("sm_86", (8, 6), 99 * 1024, 100 * 1024, max_warps_per_sm=48, max_blocks_per_sm=16),
    ArchLimits("sm_89", (8, 9), 99 * 1024, 100 * 1024, max_warps_per_sm=48, max_blocks_per_sm=24),
    ArchLimits("sm_90", (9, 0), 227 * 1024, 228 * 1024),
    ArchLimits("sm_100", (10, 0), 227 * 1024, 228 * 1024),
    ArchLimits("sm_120", (12, 0), 99 * 1024, 100 * 1024, max_warps_per_sm=48),
)}
RESERVED_SHARED_PER_BLOCK = 1024

# SMs of each compile target's reference GPU (A100, H100/H200, B200, RTX 5070): how many programs a
# persistent launch recorded for an ahead-of-time compile spreads over, where no GPU says (the grid
# does not change the compiled code). An architecture without one takes its major version's.
REFERENCE_SMS = {"sm_80": 108, "sm_90": 132, "sm_100": 148, "sm_120": 48}
REGISTER_ALLOCATION_UNIT = 256  # registers are granted to a warp in units of 256 (8 per thread)


@dataclass(frozen=True)
class Gpu:
    name: str  # the short name tables are filed under
    arch: str  # a key of ARCHS
    device_names: tuple[str, ...]  # regular expressions, matched whole and case-blind against the CUDA name

    @property
    def limits(self) -> ArchLimits:
        return ARCHS[self.arch]

    def matches(self, device_name: str) -> bool:
        return any(re.fullmatch(pattern, device_name.strip(), re.IGNORECASE) for pattern in self.device_names)


# Variants that differ in SM count or clocks (Ti, Laptop, Max-Q) are different GPUs: they get their own
# entry or none, so that a table never applies to a GPU it was not measured on.
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100", "sm_80", (r"NVIDIA A100[- ].*",)),
    Gpu("a10g", "sm_86", (r"NVIDIA A10G",)),
    Gpu("rtx3090", "sm_86", (r"NVIDIA GeForce RTX 3090",)),
    Gpu("l4", "sm_89", (r"NVIDIA L4",)),
    Gpu("l40s", "sm_89", (r"NVIDIA L40S",)),
    Gpu("rtx4090", "sm_89", (r"NVIDIA GeForce RTX 4090",)),
    Gpu("h100", "sm_90", (r"NVIDIA H100( .*)?",)),
    Gpu("h200", "sm_90", (r"NVIDIA H200( .*)?",)),
    Gpu("gh200", "sm_90", (r"NVIDIA GH200( .*)?",)),
    Gpu("b200", "sm_100", (r"NVIDIA B200",)),
    Gpu("rtx5070", "sm_120", (r"NVIDIA GeForce RTX 5070",)),
    Gpu("rtx5070ti", "sm_120", (r"NVIDIA GeForce RTX 5070 Ti",)),
    Gpu("rtx5080", "sm_120", (r"NVIDIA GeForce RTX 5080",)),
    Gpu("rtx5090", "sm_120", (r"NVIDIA GeForce RTX 5090",)),
)}


class UnknownGpu(ValueError):
    pass


def gpu(name: str) -> Gpu:
    """The GPU with short name `name` (case-blind); a clear error listing the known names otherwise."""
    try:
        return GPUS[name.strip().lower()]
    except KeyError:
        raise UnknownGpu(f"unknown GPU name {name!r}; known names: {', '.join(sorted(GPUS))}") from None


def gpu_for_device(device_name: str) -> Optional[Gpu]:
    """The known GPU whose CUDA device names match `device_name`, or None."""
    return next((g for g in GPUS.values() if g.matches(device_name)), None)


def arch_for_capability(capability: tuple[int, int]) -> ArchLimits:
    """The limits of a compute capability; an unlisted one takes the closest lower listed arch of its
    major version, the conservative choice."""
    capability = tuple(capability)
    same_major = [a for a in ARCHS.values() if a.capability[0] == capability[0] and a.capability <= capability]
    if not same_major:
        raise UnknownGpu(f"no limits known for compute capability {capability[0]}.{capability[1]}; "
                         f"known: {', '.join(f'{a.capability[0]}.{a.capability[1]}' for a in ARCHS.values())}")
    return max(same_major, key=lambda a: a.capability)


def reference_sms(arch: Optional[str]) -> int:
    """SMs of `arch`'s reference GPU (REFERENCE_SMS, by major version for an architecture not listed
    there); None, no particular GPU, and an unknown major take an H100/H200's."""
    found = re.fullmatch(r"sm_(\d+?)\da?", arch or "")
    major = int(found.group(1)) if found else None
    return next((sms for target, sms in REFERENCE_SMS.items() if ARCHS[target].capability[0] == major),
                REFERENCE_SMS["sm_90"])


def threads_of(resources: Mapping[str, Any], config: Mapping[str, Any]) -> Optional[int]:
    """Threads per block: the compiled kernel's own count, else 32 * config["num_warps"] when known."""
    return resources.get("threads") or (32 * config["num_warps"] if "num_warps" in config else None)


def spilled_bytes(resources: Mapping[str, Any]) -> int:
    """Bytes a thread keeps in local memory: register spills and any stack frame or local array."""
    return max(int(resources.get("spill_stores", 0) or 0), int(resources.get("stack", 0) or 0),
               int(resources.get("local_mem", 0) or 0))


def resource_problem(resources: Mapping[str, Any], config: Mapping[str, Any], limits: ArchLimits) -> Optional[str]:
    """Why a compiled candidate cannot launch within `limits`, or should not (it spills), or None.

    `resources` is what `KernelTuning.compile` returned: "shared_mem" (bytes per block), "registers"
    (per thread), optionally "threads" (per block; else 32 * config["num_warps"] when known) and the
    local memory a thread uses: "spill_stores", "stack" and "local_mem" (bytes). A kernel that spills
    runs, but slowly; the tier-0 tests and the tuner treat it as not fitting.
    """
    shared_mem = resources.get("shared_mem")
    if shared_mem is not None and shared_mem > limits.shared_mem_per_block:
        return (f"needs {shared_mem} bytes of shared memory per block; {limits.arch} allows "
                f"{limits.shared_mem_per_block}")
    spilled = spilled_bytes(resources)
    if spilled:
        return (f"spills: {spilled} bytes of local memory per thread (spill stores "
                f"{resources.get('spill_stores', '?')}, stack {resources.get('stack', '?')}, local "
                f"{resources.get('local_mem', '?')}) on {limits.arch}")
    registers = resources.get("registers")
    if registers is None:
        return None
    if registers > limits.registers_per_thread:
        return f"needs {registers} registers per thread; {limits.arch} allows {limits.registers_per_thread}"
    threads = threads_of(resources, config)
    if threads is not None and registers * threads > limits.registers_per_block:
        return (f"needs {registers} registers x {threads} threads = {registers * threads} per block; "
                f"{limits.arch} allows {limits.registers_per_block}")
    return None


def occupancy(resources: Mapping[str, Any], config: Mapping[str, Any], limits: ArchLimits) -> Optional[int]:
    """Blocks of this kernel one SM holds at once, from its compiled registers, shared memory and
    threads (the CUDA occupancy calculator's rules); None when the thread count is unknown."""
    threads = threads_of(resources, config)
    if not threads:
        return None
    warps = -(-threads // 32)
    by_warps = limits.max_warps_per_sm // warps
    registers = int(resources.get("registers") or 0)
    if registers:
        unit = REGISTER_ALLOCATION_UNIT
        per_warp = -(-registers * 32 // unit) * unit
        by_registers = (limits.registers_per_sm // per_warp) // warps
    else:
        by_registers = limits.max_blocks_per_sm
    shared = int(resources.get("shared_mem") or 0) + RESERVED_SHARED_PER_BLOCK
    by_shared = limits.shared_mem_per_sm // shared
    return max(0, min(limits.max_blocks_per_sm, by_warps, by_registers, by_shared))
