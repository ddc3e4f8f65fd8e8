"""A roofline estimate per kernel from its design, for GPUs that are not here: an estimate, never
a measurement.

For each kernel benchmark shape (bench.workloads.KERNEL_SHAPES) and kernel backend, the default
configuration's tiling gives what the kernel does on the device:
  - DRAM bytes it moves (every byte the tiling reads or writes that L2 cannot be expected to serve:
    the design's grouped orderings keep a W panel and x rows, or one head's K and V, resident), and
    the global loads it issues (L2 traffic, shown for scale),
  - FLOPs on the tensor cores, and the exponentials on the special-function units (attention),
  - blocks, and blocks per SM from the compiled resources of the same default
    (bench/results/kernel_resources.json, written by `python -m tuning.resources`).
The time estimate is the largest of: DRAM bytes over the bandwidth the resident blocks can keep in
flight (Little's law: bytes in flight per SM against bandwidth x latency / SMs), the global loads
over an assumed L2 bandwidth (what bounds a matmul whose tiles are too small), FLOPs over the bf16
peak scaled by the useful share of the padded tiles, exponentials over the SFU rate; divided by
the wave utilisation (blocks over the slots of the last wave). Its percent of the roofline
(bench.report's: compulsory bytes and FLOPs over the peaks) is what
`python -m bench.report --static RUN.json` puts beside the measured one.

`python -m bench.roofline --causal-order` prints a list-scheduling simulation of the order causal
attention hands its programs out in (`causal_schedule`), which chose the kernels' order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bench.peaks import DevicePeak, PEAKS
from bench.workloads import KERNEL_SHAPES, op_cost

RESULTS_DIR = Path(__file__).parent / "results"
RESOURCE_TABLE = RESULTS_DIR / "kernel_resources.json"
ESTIMATE_DEVICES = ("H100 SXM", "RTX 5070")
BACKENDS = ("triton", "tile")
DESIGNED = ("layer_norm", "softmax_entropy", "halt_update", "linear", "attention")
ITEMSIZE = 2  # the kernel benchmarks run bf16


@dataclass(frozen=True)
class Design:
    """What one launch of a kernel's default tiling does."""

    blocks: int
    dram_bytes: float
    load_bytes: float  # global loads issued (L2 traffic)
    flops: float = 0.0  # tensor-core FLOPs
    special: float = 0.0  # exp2 / reciprocal results
    in_flight_per_block: float = 0.0  # bytes one block has outstanding at a time
    tile_use: float = 1.0  # useful share of the MMA tiles (ragged edges)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_config(backend: str, op: str, arch: str) -> dict:
    """The default bf16 configuration of a kernel on `arch`, read from its module."""
    import importlib

    from looplm.backends import KERNEL_PACKAGES
    module = importlib.import_module(f"{KERNEL_PACKAGES[backend]}.{op}")
    return dict(module.TUNING.default_for("bfloat16", arch))


def design(backend: str, op: str, shape: dict, config: dict) -> Optional[Design]:
    """The default tiling of `op` at a KERNEL_SHAPES `shape`, or None for ops without one kernel."""
    s = ITEMSIZE
    if op == "layer_norm":
        n, c = shape["N"], shape["C"]
        rows = config["BLOCK_M"]
        blocks = _cdiv(n, rows)
        return Design(blocks, 2 * n * c * s + 2 * c * s, n * c * s + blocks * 2 * c * s,
                      in_flight_per_block=rows * c * s)
    if op == "softmax_entropy":
        n, v = shape["N"], shape["V"]
        rows, chunk = config["BLOCK_M"], min(config["BLOCK_V"], _p2(v))
        return Design(_cdiv(n, rows), n * v * s + 8 * n, n * v * s, special=n * v,
                      in_flight_per_block=rows * chunk * s)
    if op == "halt_update":
        n, c = shape["N"], shape["C"]
        rows = config.get("BLOCK_N", config.get("BLOCK_M"))
        width = min(config["BLOCK_C"], _p2(c))
        per_token = 18  # flags, counts, score, threshold in and out
        return Design(_cdiv(n, rows), 2 * n * c * s + n * per_token, n * c * s + n * per_token,
                      in_flight_per_block=rows * width * s)
    if op == "linear":
        m, k, n = shape["M"], shape["K"], shape["N"]
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        tiles_m, tiles_n = _cdiv(m, bm), _cdiv(n, bn)
        residual = "residual" in shape["epilogue"]
        dram = (m * k + n * k + n + m * n * (2 if residual else 1)) * s
        loads = (tiles_n * m * k + tiles_m * n * k) * s
        stages = config.get("num_stages", 2)
        epilogue = m * n * (1 + residual + 8 * ("gelu" in shape["epilogue"]))  # as bench/workloads.py counts
        return Design(tiles_m * tiles_n, dram, loads, flops=2 * m * n * k + epilogue,
                      in_flight_per_block=stages * (bm + bn) * bk * s, tile_use=m * n / (tiles_m * bm * tiles_n * bn))
    if op == "attention":
        b, h, t, d = shape["B"], shape["H"], shape["T"], shape["D"]
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        q_blocks = _cdiv(t, bm)
        keys_visited = sum(min(t, _cdiv((i + 1) * bm, bn) * bn) for i in range(q_blocks))
        dram = 4 * b * h * t * d * s
        loads = b * h * (2 * t * d + 2 * keys_visited * d) * s
        scores = b * h * keys_visited * bm  # computed, masked or not
        return Design(q_blocks * b * h, dram, loads, flops=4 * scores * d, special=scores,
                      in_flight_per_block=2 * bn * _p2(d) * s, tile_use=(t * (t + 1) / 2) / (keys_visited * bm))
    return None


def occupancy_from_table(rows: Sequence[dict], backend: str, op: str, arch: str, shape: dict) -> Optional[dict]:
    """The resource table's row of this kernel's default on `arch` closest to the benchmark case."""
    wanted = {"linear": "fc +gelu" if "gelu" in shape.get("epilogue", "") else "proj +residual",
              "softmax_entropy": "V=50304", "attention": "causal"}.get(op)  # attention: the path it dispatches
    found = [r for r in rows if r["backend"] == backend and r["kernel"] == op and r["arch"] == arch]
    for r in found:
        if wanted is None or r["variant"] == wanted:
            return r
    return found[0] if found else None


def estimate(d: Design, peak: DevicePeak, blocks_per_sm: Optional[int], roofline_s: float) -> dict:
    """Seconds and percent of the roofline the design allows on `peak`'s device."""
    slots = peak.sms * (blocks_per_sm or 1)
    waves = _cdiv(d.blocks, slots)
    wave_use = d.blocks / (waves * slots)
    needed = peak.memory_gbps * 1e9 * peak.memory_latency_ns * 1e-9 / peak.sms  # bytes in flight per SM
    resident = min(blocks_per_sm or 1, _cdiv(d.blocks, peak.sms))
    in_flight = resident * d.in_flight_per_block
    bandwidth_share = min(1.0, in_flight / needed) if needed else 1.0
    memory_s = d.dram_bytes / (peak.memory_gbps * 1e9 * bandwidth_share)
    compute_s = d.flops / (peak.bf16_tflops * 1e12 * d.tile_use) if d.flops else 0.0
    special_s = d.special / (peak.sms * peak.special_per_sm_per_clock * peak.clock_ghz * 1e9)
    l2_s = d.load_bytes / (peak.l2_gbps * 1e9) if peak.l2_gbps else 0.0
    seconds = max(memory_s, compute_s, special_s, l2_s) / wave_use
    bound = max((memory_s, "memory"), (compute_s, "tensor cores"), (special_s, "exp (SFU)"), (l2_s, "L2"))[1]
    return {"seconds": seconds, "percent": 100.0 * roofline_s / seconds, "bound": bound,
            "bandwidth_share": bandwidth_share, "wave_use": wave_use}


def estimates(resource_rows: Sequence[dict], devices: Sequence[str] = ESTIMATE_DEVICES) -> list[dict]:
    out = []
    peaks = {p.name: p for p in PEAKS}
    for device in devices:
        peak = peaks[device]
        for op, shapes in KERNEL_SHAPES.items():
            if op not in DESIGNED:  # the block is five launches of the kernels below
                continue
            for shape in shapes:
                nbytes, flops = op_cost(op, shape, ITEMSIZE)
                # bench.report's roofline of a bf16 case: compulsory bytes and FLOPs over the peaks
                roofline_s = max(nbytes / (peak.memory_gbps * 1e9), flops / (peak.bf16_tflops * 1e12))
                for backend in BACKENDS:
                    try:
                        config = default_config(backend, op, peak.arch)
                    except ImportError:
                        continue
                    d = design(backend, op, shape, config)
                    if d is None:
                        continue
                    row = occupancy_from_table(resource_rows, backend, op, peak.arch, shape)
                    blocks_per_sm = row["blocks_per_sm"] if row else None
                    est = estimate(d, peak, blocks_per_sm, roofline_s)
                    out.append({"device": device, "op": op, "shape": shape, "backend": backend,
                                "blocks": d.blocks, "blocks_per_sm": blocks_per_sm, "dram_mb": d.dram_bytes / 1e6,
                                "loads_mb": d.load_bytes / 1e6, "gflop": d.flops / 1e9, **est})
    return out


def load_resources(path: Path = RESOURCE_TABLE) -> list[dict]:
    from tuning.resources import load_table
    return load_table(path)


def case_name(op: str, shape: dict) -> str:
    from bench.schema import case_label
    return case_label(op, shape)


COMMAND = "python -m bench.report --static --out bench/results/roofline_estimate"


def markdown(rows: Sequence[dict], measured: Optional[dict] = None) -> str:
    """The estimate table; with `measured` ({(device, case, backend): percent}) a measured column."""
    from tabulate import tabulate
    headers = ["device", "case", "backend", "blocks", "blocks/SM", "DRAM MB", "loads MB", "GFLOP", "bound",
               "est. time", "est. % roofline"]
    if measured is not None:
        headers.append("measured % roofline")
    table = []
    for r in rows:
        line = [r["device"], case_name(r["op"], r["shape"]), r["backend"], r["blocks"],
                "-" if r["blocks_per_sm"] is None else r["blocks_per_sm"], f"{r['dram_mb']:.1f}",
                f"{r['loads_mb']:.1f}", f"{r['gflop']:.1f}", r["bound"], f"{r['seconds'] * 1e6:.0f} us",
                f"{r['percent']:.0f}%"]
        if measured is not None:
            value = measured.get((r["device"], case_name(r["op"], r["shape"]), r["backend"]))
            line.append("-" if value is None else f"{value:.0f}%")
        table.append(line)
    return "\n".join([
        "# Roofline estimate per kernel, from the design (an estimate, not a measurement)", "",
        f"- command: `{COMMAND}` (add a pytest-benchmark JSON for the measured column)",
        "- what it is: each kernel's default bf16 tiling at the benchmark shapes (bench/workloads.py), with the "
        "occupancy its compiled resources allow (bench/results/kernel_resources.md); time = max(DRAM bytes / "
        "bandwidth the resident blocks keep in flight, global loads / L2 bandwidth, FLOPs / bf16 peak x useful "
        "tile share, exp / SFU rate) / wave utilisation; % roofline = the report's roofline time (compulsory "
        "bytes and FLOPs over the peaks, bench/workloads.py) / that time",
        "- assumed, not vendor figures: DRAM latency (H100 650 ns, RTX 5070 600 ns) for the bytes in flight, L2 "
        "bandwidth (H100 5.5 TB/s, RTX 5070 2.5 TB/s), 16 exp2 per SM per clock, L2 serving every re-read (W "
        "panels under grouped ordering, a head's K and V)",
        "- not modelled: instruction issue, pipeline bubbles, TMA; above 100% would mean the kernel moves fewer "
        "bytes than bench/workloads.py counts",
        "- a measured column appears only where the benchmarks ran on that GPU "
        "(`python -m bench.report --static RUN.json`)", "",
        tabulate(table, headers, tablefmt="github"), ""])


def measured_percent(data: dict) -> dict:
    """{(device name in PEAKS, case, backend): measured % of roofline} from a pytest-benchmark JSON."""
    from bench.peaks import find_peak
    from bench.schema import load_measurements, peak_use
    out = {}
    for m in load_measurements(data):
        peak = find_peak(m.info.device)
        use = peak_use(m, peak).roofline if peak else None
        if use is not None and m.info.suite == "kernel":
            out[(peak.name, m.info.case, m.info.backend)] = use
    return out


# ---- causal attention: how the order of the programs packs the SMs (a list-scheduling simulation)
#
# Under causal masking query block i of a head reads keys up to its own position, so blocks differ in
# cost up to T / BLOCK_M-fold, and the order the grid hands them out in decides how ragged the last
# wave is. The simulation below hands the programs, in grid order, each to the first SM slot that
# frees up (what the GPU's block scheduler does), with a cost proportional to the keys the program
# reads; it leaves out everything else (memory stalls, L2 misses), and reports, beside the makespan,
# the K and V bytes of the heads that are live at once (a head from its first program's start to its
# last program's end), which is what L2 must hold for the re-reads of K and V to hit.

CAUSAL_ORDER_SHAPES = [  # (batch x heads, T, head size): issue 20's model shapes and the H200's measured ones
    *((heads, t, 64) for heads in (4 * 16, 64 * 6) for t in (1024, 2048, 4096)),
    (16 * 32, 1024, 64), (8 * 16, 2048, 128), (4 * 16, 4096, 128),
]
CAUSAL_ORDER_SMS = 132  # an H100 / H200, one block of the long-sequence tiles per SM


def causal_block_keys(t: int, block_m: int, block_n: int) -> list[int]:
    """The keys each query block of a causal head (Tq = Tk = t) reads, in whole BLOCK_N tiles: its cost."""
    return [min(t, _cdiv((i + 1) * block_m, block_n) * block_n) for i in range(_cdiv(t, block_m))]


def list_schedule(costs: Sequence[float], slots: int) -> list[tuple[float, float]]:
    """(start, end) of each program when they are handed out in order, each to the slot that frees
    first (greedy list scheduling on `slots` identical slots)."""
    import heapq
    free = [(0.0, slot) for slot in range(slots)]
    times = []
    for cost in costs:
        start, slot = heapq.heappop(free)
        times.append((start, start + cost))
        heapq.heappush(free, (start + cost, slot))
    return times


@dataclass(frozen=True)
class Schedule:
    makespan: float  # in keys read by one program slot
    ideal: float  # the lower bound: all work spread evenly, or the longest program, whichever is more
    live_kv_bytes: float  # the most K and V bytes of heads live at once

    @property
    def over_ideal(self) -> float:
        return self.makespan / self.ideal


def causal_schedule(heads: int, t: int, d: int, block_m: int, block_n: int, section: int,
                    slots: int = CAUSAL_ORDER_SMS, itemsize: int = ITEMSIZE) -> Schedule:
    """The simulated schedule of a causal attention launch over `heads` (batch x head) heads of T = `t`
    with BLOCK_M x BLOCK_N tiles, in the kernels' order (`looplm.kernels.attention_program`) with
    `section` heads per section: 1 is head by head, `heads` longest first across all heads."""
    from looplm.kernels import attention_program, head_kv_bytes
    keys = causal_block_keys(t, block_m, block_n)
    programs = [attention_program(pid, len(keys), heads, section) for pid in range(heads * len(keys))]
    times = list_schedule([keys[block] for _, block in programs], slots)
    live: dict[int, list[float]] = {}
    for (head, _), (start, end) in zip(programs, times):
        span = live.setdefault(head, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    events = sorted([(s, 1) for s, _ in live.values()] + [(e, -1) for _, e in live.values()])
    now = most = 0
    for _, step in events:  # an end sorts before a start at the same time
        now += step
        most = max(most, now)
    return Schedule(makespan=max(end for _, end in times), ideal=max(heads * sum(keys) / slots, max(keys)),
                    live_kv_bytes=most * head_kv_bytes(t, d, itemsize))


def causal_order_rows(shapes: Sequence[tuple[int, int, int]] = CAUSAL_ORDER_SHAPES) -> list[dict]:
    """For each shape and each kernel backend's sm_90 default tiles there: the three orders' schedules."""
    import importlib

    import torch

    from looplm.backends import KERNEL_PACKAGES
    from looplm.kernels import attention_section, head_kv_bytes
    rows = []
    for heads, t, d in shapes:
        for backend, package in KERNEL_PACKAGES.items():
            try:
                module = importlib.import_module(f"{package}.attention")
            except ImportError:
                continue
            config = module.default_config(t, d, torch.bfloat16, "sm_90")
            bm, bn = config["BLOCK_M"], config["BLOCK_N"]
            section = attention_section(heads, head_kv_bytes(t, d, ITEMSIZE))
            rows.append({"heads": heads, "T": t, "D": d, "backend": backend, "tiles": (bm, bn), "section": section,
                         **{order: causal_schedule(heads, t, d, bm, bn, s) for order, s in
                            (("head_by_head", 1), ("all_heads", heads), ("sections", section))}})
    return rows


CAUSAL_ORDER_COMMAND = "python -m bench.roofline --causal-order"


def causal_order_markdown(rows: Sequence[dict]) -> str:
    from tabulate import tabulate

    def cell(s: Schedule) -> str:
        return f"{s.over_ideal:.3f} ({s.live_kv_bytes / 2 ** 20:.0f} MiB)"
    table = [[r["heads"], r["T"], r["D"], r["backend"], "x".join(map(str, r["tiles"])), cell(r["head_by_head"]),
              cell(r["all_heads"]), f"{cell(r['sections'])}, {r['section']} heads"] for r in rows]
    return "\n".join([
        "# Causal attention: makespan of the program orders over the ideal (a simulation, not a measurement)", "",
        f"- command: `{CAUSAL_ORDER_COMMAND}`; {CAUSAL_ORDER_SMS} SMs (an H100 / H200), one program per SM at a "
        "time, each SM taking the next program in grid order when it frees; cost = keys read; bf16, each "
        "backend's sm_90 default tiles at that T and head size",
        "- ideal: all work spread evenly over the SMs, or the longest program if that is longer; in brackets the "
        "most K and V bytes of heads live at once (first program started, last not finished)",
        "- orders: head by head (each head's heaviest block first); longest first across all heads; longest first "
        "within sections of heads whose K and V fit in L2 (looplm.kernels.attention_section, the kernels' order)",
        "", tabulate(table, ["B x H", "T", "D", "backend", "tiles", "head by head", "all heads", "L2 sections"],
                         tablefmt="github"), ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description="Design estimates without a GPU.")
    p.add_argument("--causal-order", action="store_true", required=True,
                   help="simulate the order of causal attention's programs at issue 20's shapes")
    p.parse_args(argv)
    print(causal_order_markdown(causal_order_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
