"""Turn pytest-benchmark's JSON into tables and a chart: how fast each case runs on each backend,
against the torch baseline and against what the device allows.

    pytest bench --benchmark-only --benchmark-json=bench/results/run.json
    python -m bench.report bench/results/run.json        # writes run.md and run.png beside it
    python -m bench.report --static                      # the roofline estimate from the design (no GPU)
    python -m bench.report --static run.json             # ... with the measured percent beside it

Per case and backend: the time (median by default), the speed-up over the baseline backend
(baseline time / time, so 2.00x is twice as fast), and the percent of the roofline: the time a
perfect kernel would take, max(bytes / peak bandwidth, FLOPs / peak bf16 throughput), over the time
measured. Peaks come from bench.peaks by the device's name; --peak-gbps and --peak-tflops give
them for a device the table lacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tabulate import tabulate

from looplm.cli import CLIError, run_cli
from looplm.fileio import atomic_path, atomic_write_text

from bench.peaks import DevicePeak, find_peak
from bench.schema import STATS, CaseInfo, Measurement, load_measurements, peak_use

RESULTS_DIR = Path(__file__).parent / "results"
# Column order; backends not listed follow in alphabetical order.
BACKEND_ORDER = ("torch", "eager", "compile", "sdpa", "triton", "tile")
MISSING = "-"


def device_of(data: dict, measurements: Sequence[Measurement]) -> str:
    device = (data.get("machine_info") or {}).get("device")
    return device or (measurements[0].info.device if measurements else "unknown")


def speedups(measurements: Sequence[Measurement], baseline: str) -> dict[int, Optional[float]]:
    """Per measurement (by index): baseline time / its time, for cases where the baseline ran."""
    base = {m.key: m.seconds for m in measurements if m.info.backend == baseline}
    return {i: (base[m.key] / m.seconds if m.key in base else None) for i, m in enumerate(measurements)}


def backends_in(measurements: Sequence[Measurement]) -> list[str]:
    present = {m.info.backend for m in measurements}
    return [b for b in BACKEND_ORDER if b in present] + sorted(present - set(BACKEND_ORDER))


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _num(value: Optional[float], fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def summary_table(measurements: Sequence[Measurement], peak: Optional[DevicePeak],
                  baseline: str) -> tuple[list[str], list[list[str]]]:
    """Rows per case, a column per backend; each cell 'time, speed-up over baseline, % of roofline'."""
    backends = backends_in(measurements)
    ratio = speedups(measurements, baseline)
    cells: dict[tuple, dict[str, str]] = {}
    for i, m in enumerate(measurements):
        parts = [format_time(m.seconds)]
        if ratio[i] is not None:
            parts.append(f"{ratio[i]:.2f}x")
        roofline = peak_use(m, peak).roofline
        if roofline is not None:
            parts.append(f"{roofline:.0f}%")
        cells.setdefault(m.key, {})[m.info.backend] = ", ".join(parts)
    headers = ["suite", "case", "dtype", *backends]
    rows = [[*key, *(cells[key].get(b, MISSING) for b in backends)] for key in cells]
    return headers, rows


def detail_table(measurements: Sequence[Measurement], peak: Optional[DevicePeak],
                 baseline: str) -> tuple[list[str], list[list[str]]]:
    """One row per measurement with every derived rate."""
    ratio = speedups(measurements, baseline)
    headers = ["suite", "case", "dtype", "backend", "time", f"vs {baseline}", "GB/s", "TFLOP/s", "tokens/s",
               "% BW", "% FLOP", "% roofline", "notes"]
    rows = []
    for i, m in enumerate(measurements):
        use = peak_use(m, peak)
        notes = ", ".join(f"{k}={v}" for k, v in m.info.notes.items())
        rows.append([*m.key, m.info.backend, format_time(m.seconds), _num(ratio[i], ".2f"), _num(m.gbps, ".1f"),
                     _num(m.tflops, ".3g"), _num(m.tokens_per_s, ".4g"), _num(use.bandwidth, ".0f"),
                     _num(use.compute, ".0f"), _num(use.roofline, ".0f"), notes])
    return headers, rows


# ---- targets (from the kernel issues)

@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    selects: Callable[[CaseInfo], bool]  # the cases the target is about
    backends: tuple[str, ...]  # the backends held to it
    # (measurement, all measurements, peak) -> (value shown, met?) or None when it cannot be said
    judge: Callable[[Measurement, Sequence[Measurement], Optional[DevicePeak]], Optional[tuple[str, bool]]]


def _bandwidth_at_least(percent: float):
    def judge(m, _all, peak):
        use = peak_use(m, peak).bandwidth
        return None if use is None else (f"{use:.0f}% of {peak.memory_gbps:.0f} GB/s", use >= percent)
    return judge


def _same_case_on(m: Measurement, measurements: Sequence[Measurement], backend: str) -> Optional[Measurement]:
    return next((r for r in measurements if r.key == m.key and r.info.backend == backend), None)


def _time_ratio_at_most(reference_backend: str, ratio: float):
    def judge(m, measurements, _peak):
        ref = _same_case_on(m, measurements, reference_backend)
        if ref is None:
            return None
        value = m.seconds / ref.seconds
        return f"{value:.2f}x the time of {reference_backend}", value <= ratio
    return judge


def _speedup_at_least(reference_backend: str, factor: float):
    def judge(m, measurements, _peak):
        ref = _same_case_on(m, measurements, reference_backend)
        if ref is None:
            return None
        value = ref.seconds / m.seconds
        return f"{value:.2f}x faster than {reference_backend}", value >= factor
    return judge


KERNELS = ("triton", "tile")
TARGETS = (
    Target("softmax_entropy 8192x50304 bf16", ">= 80% of memory bandwidth",
           lambda c: c.op == "softmax_entropy" and c.shape == {"N": 8192, "V": 50304} and c.dtype == "bfloat16",
           KERNELS, _bandwidth_at_least(80.0)),
    Target("layer_norm 8192x4096 bf16", ">= 80% of memory bandwidth",
           lambda c: c.op == "layer_norm" and c.shape == {"N": 8192, "C": 4096} and c.dtype == "bfloat16",
           KERNELS, _bandwidth_at_least(80.0)),
    Target("attention T 1024-4096, head 64/128, bf16", "<= 1.2x the time of SDPA",
           lambda c: c.op == "attention" and 1024 <= c.shape.get("T", 0) <= 4096 and c.shape.get("D") in (64, 128)
           and c.dtype == "bfloat16", KERNELS, _time_ratio_at_most("sdpa", 1.2)),
    Target("LoopGPT eval forward, shakespeare shape", ">= 1.5x faster than the torch backend",
           lambda c: c.op == "eval_forward" and str(c.shape.get("model", "")).startswith("shakespeare"),
           KERNELS, _speedup_at_least("torch", 1.5)),
)


def targets_table(measurements: Sequence[Measurement], peak: Optional[DevicePeak],
                  targets: Sequence[Target] = TARGETS) -> tuple[list[str], list[list[str]]]:
    """Each target against every measurement it covers; 'unmeasured' where none ran."""
    headers = ["target", "goal", "case", "backend", "measured", "status"]
    rows = []
    for target in targets:
        covered = [m for m in measurements if target.selects(m.info) and m.info.backend in target.backends]
        for m in covered:
            verdict = target.judge(m, measurements, peak)
            value, status = (MISSING, "cannot judge here") if verdict is None else \
                (verdict[0], "met" if verdict[1] else "missed")
            rows.append([target.name, target.goal, m.info.case, m.info.backend, value, status])
        if not covered:
            rows.append([target.name, target.goal, MISSING, "/".join(target.backends), MISSING, "unmeasured"])
    return headers, rows


# ---- outputs

def render_markdown(data: dict, measurements: Sequence[Measurement], peak: Optional[DevicePeak], baseline: str,
                    stat: str, chart: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    machine = data.get("machine_info") or {}
    versions = machine.get("versions") or {}
    cpu = (machine.get("cpu") or {}).get("brand_raw", "")
    lines = [f"# LoopLM benchmarks on {device_of(data, measurements)}", ""]
    lines += [f"- date: {data.get('datetime', 'unknown')}",
              f"- command: `{data.get('command', 'unknown')}`",
              f"- host: {machine.get('node', '?')}, {cpu or machine.get('processor', '?')}, "
              f"{machine.get('torch_threads', '?')} torch threads",
              f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or 'unknown'}"]
    if peak is not None:
        lines.append(f"- peaks ({peak.name}): {peak.memory_gbps:g} GB/s, {peak.bf16_tflops:g} bf16 TFLOP/s "
                     f"dense; source: {peak.source}")
    else:
        lines.append("- peaks: this device is not in bench/peaks.py, so no percent of peak is shown")
    lines.append(f"- time: the {stat} of pytest-benchmark's rounds; `Nx` is the speed-up over `{baseline}` "
                 "(its time / this time); `%` is the percent of the roofline")
    lines += [f"- note: {note}" for note in notes]
    for title, (headers, rows) in (("Summary", summary_table(measurements, peak, baseline)),
                                   ("Targets", targets_table(measurements, peak)),
                                   ("All measurements", detail_table(measurements, peak, baseline))):
        lines += ["", f"## {title}", "", tabulate(rows, headers, tablefmt="github")]
    if chart:
        lines += ["", f"![benchmark chart]({chart})"]
    return "\n".join(lines) + "\n"


def plot(measurements: Sequence[Measurement], peak: Optional[DevicePeak], path: Path, title: str) -> None:
    """Horizontal bars per case and backend: the time (log scale) and, with known peaks, the
    percent of the roofline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    backends = backends_in(measurements)
    keys = list(dict.fromkeys(m.key for m in measurements))
    by_cell = {(m.key, m.info.backend): m for m in measurements}
    show_peak = peak is not None and any(peak_use(m, peak).roofline is not None for m in measurements)
    height = max(3.0, 0.22 * len(keys) * len(backends) + 1.5)
    fig, axes = plt.subplots(1, 2 if show_peak else 1, figsize=(14 if show_peak else 10, height), sharey=True,
                             squeeze=False)
    bar = 0.8 / len(backends)
    for j, backend in enumerate(backends):
        ys, times, rooflines = [], [], []
        for i, key in enumerate(keys):
            m = by_cell.get((key, backend))
            if m is not None:
                ys.append(i + (j - (len(backends) - 1) / 2) * bar)
                times.append(m.seconds * 1e3)
                rooflines.append(peak_use(m, peak).roofline or 0.0)
        bars = axes[0][0].barh(ys, times, height=bar, label=backend)
        axes[0][0].bar_label(bars, [format_time(t / 1e3) for t in times], fontsize=6, padding=2)
        if show_peak:
            axes[0][1].barh(ys, rooflines, height=bar, label=backend)
    axes[0][0].set_xscale("log")
    axes[0][0].xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    axes[0][0].margins(x=0.15)
    axes[0][0].set_xlabel("time per call (ms, log scale)")
    axes[0][0].set_yticks(range(len(keys)), [f"{case} {dtype}" for _, case, dtype in keys], fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][0].legend(fontsize=8)
    if show_peak:
        axes[0][1].set_xlabel(f"% of roofline ({peak.name})")
        axes[0][1].axvline(80, color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def latest_json(directory: Path = RESULTS_DIR) -> Path:
    candidates = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no benchmark JSON in {directory}; pass one, or make one with "
                                "`pytest bench --benchmark-only --benchmark-json=PATH`")
    return candidates[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input raises (OSError, ValueError, CLIError); `run_cli` turns it into one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", type=Path, help="pytest-benchmark JSON (default: newest in bench/results)")
    parser.add_argument("--out", type=Path, help="output prefix for .md and .png (default: the JSON's path); with "
                                                 "--static, the .md to write")
    parser.add_argument("--baseline", default="torch", help="backend the speed-ups are against (default: torch)")
    parser.add_argument("--stat", default="median", choices=STATS, help="time statistic (default: median)")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth peak, for a device not in bench/peaks.py")
    parser.add_argument("--peak-tflops", type=float, help="bf16 TFLOP/s peak, for a device not in bench/peaks.py")
    parser.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    parser.add_argument("--static", action="store_true",
                        help="print the roofline estimate of every kernel from its design (bench.roofline) for the "
                             "H100 and the RTX 5070, no GPU needed; with a JSON, its measured percent beside it")
    parser.add_argument("--resources", type=Path, default=None,
                        help="the resource table --static reads (default: bench/results/kernel_resources.json)")
    args = parser.parse_args(argv)
    if args.peak_gbps is not None or args.peak_tflops is not None:
        if args.peak_gbps is None or args.peak_tflops is None or args.peak_gbps <= 0 or args.peak_tflops <= 0:
            raise CLIError(f"--peak-gbps and --peak-tflops go together and must be > 0, got {args.peak_gbps} "
                           f"and {args.peak_tflops}")
    if args.static:
        return _static(args)

    path = args.json or latest_json()
    data = _read_json(path)
    measurements = load_measurements(data, args.stat)
    if not measurements:
        raise CLIError(f"{path} holds no bench/ measurements (was it written with --benchmark-only?)")
    device = device_of(data, measurements)
    peak = find_peak(device)
    if args.peak_gbps:
        peak = DevicePeak(device, args.peak_gbps, args.peak_tflops, "given on the command line")
    prefix = args.out or path.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png = prefix.with_name(prefix.name + ".png")
    plot(measurements, peak, png, f"LoopLM benchmarks on {device}")
    markdown = render_markdown(data, measurements, peak, args.baseline, args.stat, chart=png.name, notes=args.note)
    atomic_write_text(prefix.with_name(prefix.name + ".md"), markdown)
    sys.stdout.write(markdown)
    return 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CLIError(f"{path} is not valid JSON ({e}); pass the file pytest --benchmark-json=PATH wrote") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path} holds JSON but not a pytest-benchmark object")
    return data


def _static(args: argparse.Namespace) -> int:
    from bench import roofline
    resources = roofline.load_resources(args.resources or roofline.RESOURCE_TABLE)
    measured = roofline.measured_percent(_read_json(args.json)) if args.json else None
    text = roofline.markdown(roofline.estimates(resources), measured)
    if args.out:
        atomic_write_text(args.out.with_suffix(".md"), text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="python -m bench.report")
