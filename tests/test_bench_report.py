"""bench.report against a small synthetic pytest-benchmark JSON: rates, ratios, percent of peak,
table columns, targets, and the files written."""
from __future__ import annotations

import json

import pytest

from bench import report, schema
from bench.peaks import PEAKS, find_peak
from bench.schema import CaseInfo

H100 = "NVIDIA H100 80GB HBM3"
ENTROPY = dict(N=8192, V=50304)
ATTENTION = dict(B=16, H=32, T=1024, D=64)


def _bench(info: CaseInfo, median: float) -> dict:
    stats = dict(min=median * 0.9, median=median, mean=median * 1.1)
    return dict(name=f"test[{info.case}-{info.backend}]", stats=stats, extra_info=info.to_extra_info())


def _kernel(op, shape, backend, seconds, nbytes=None, flops=None, dtype="bfloat16") -> dict:
    return _bench(CaseInfo("kernel", op, backend, shape, dtype, H100, bytes=nbytes, flops=flops), seconds)


def synthetic_json() -> dict:
    peak = find_peak(H100)
    at_80_percent = int(0.8 * peak.memory_gbps * 1e9 * 1e-3)  # bytes moved in 1 ms at 80% of the peak
    return dict(
        machine_info=dict(device=H100, versions=dict(torch="2.13.0")),
        datetime="2026-01-01T00:00:00", command="pytest bench --benchmark-only --benchmark-json=x.json",
        benchmarks=[
            _kernel("softmax_entropy", ENTROPY, "torch", 4e-3, nbytes=at_80_percent),
            _kernel("softmax_entropy", ENTROPY, "triton", 1e-3, nbytes=at_80_percent),  # 80%: met
            _kernel("softmax_entropy", ENTROPY, "tile", 2e-3, nbytes=at_80_percent),  # 40%: missed
            # compute-bound: half the bf16 peak's FLOPs in 1 ms
            _kernel("attention", ATTENTION, "sdpa", 1e-3, nbytes=1000, flops=int(0.5 * peak.bf16_tflops * 1e9)),
            _kernel("attention", ATTENTION, "triton", 1.1e-3, nbytes=1000, flops=int(0.5 * peak.bf16_tflops * 1e9)),
            _kernel("attention", ATTENTION, "eager", 3e-3, nbytes=1000, flops=int(0.5 * peak.bf16_tflops * 1e9)),
            _kernel("layer_norm", dict(N=4, C=8), "torch", 1e-3, nbytes=at_80_percent, dtype="float32",
                    flops=10 ** 15),
            dict(name="test_unrelated", stats=dict(median=1.0), extra_info={}),  # not bench/'s: ignored
        ])


@pytest.fixture
def measurements():
    return schema.load_measurements(synthetic_json())


def _by(measurements, op, backend):
    return next(m for m in measurements if m.info.op == op and m.info.backend == backend)


def test_loads_bench_cases_only_with_the_chosen_statistic(measurements):
    assert len(measurements) == 7
    assert _by(measurements, "softmax_entropy", "triton").seconds == pytest.approx(1e-3)
    minimum = schema.load_measurements(synthetic_json(), stat="min")
    assert _by(minimum, "softmax_entropy", "triton").seconds == pytest.approx(0.9e-3)
    with pytest.raises(ValueError, match="stat must be one of"):
        schema.load_measurements(synthetic_json(), stat="p99")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        schema.load_measurements({"results": []})


def test_speedup_is_baseline_time_over_time(measurements):
    ratio = report.speedups(measurements, "torch")
    by_backend = {m.info.backend: ratio[i] for i, m in enumerate(measurements) if m.info.op == "softmax_entropy"}
    assert by_backend == pytest.approx({"torch": 1.0, "triton": 4.0, "tile": 2.0})
    attention = [ratio[i] for i, m in enumerate(measurements) if m.info.op == "attention"]
    assert attention == [None, None, None]  # no torch run of that case: no ratio, never a made-up one


def test_percent_of_peak_bandwidth_compute_and_roofline(measurements):
    peak = find_peak(H100)
    entropy = schema.peak_use(_by(measurements, "softmax_entropy", "triton"), peak)
    assert entropy.bandwidth == pytest.approx(80.0, rel=1e-6)
    assert entropy.roofline == pytest.approx(80.0, rel=1e-6)  # memory-bound: no FLOPs recorded
    attention = schema.peak_use(_by(measurements, "attention", "sdpa"), peak)
    assert attention.compute == pytest.approx(50.0, rel=1e-6)
    assert attention.roofline == pytest.approx(50.0, rel=1e-6)  # compute-bound: FLOPs dominate
    fp32 = schema.peak_use(_by(measurements, "layer_norm", "torch"), peak)
    assert fp32.compute is None  # the table's FLOP/s peak is bf16's
    assert fp32.roofline == pytest.approx(80.0, rel=1e-6)
    assert schema.peak_use(_by(measurements, "attention", "sdpa"), None) == schema.PeakUse(None, None, None)


def test_summary_has_a_column_per_backend_in_order(measurements):
    headers, rows = report.summary_table(measurements, find_peak(H100), "torch")
    assert headers == ["suite", "case", "dtype", "torch", "eager", "sdpa", "triton", "tile"]
    entropy = next(r for r in rows if r[1].startswith("softmax_entropy"))
    assert entropy[headers.index("triton")] == "1 ms, 4.00x, 80%"
    assert entropy[headers.index("sdpa")] == report.MISSING
    attention = next(r for r in rows if r[1].startswith("attention"))
    assert attention[headers.index("sdpa")] == "1 ms, 50%"


def test_detail_table_rates(measurements):
    headers, rows = report.detail_table(measurements, find_peak(H100), "torch")
    assert headers[:5] == ["suite", "case", "dtype", "backend", "time"]
    row = next(r for r in rows if r[1].startswith("softmax_entropy") and r[3] == "triton")
    assert float(row[headers.index("GB/s")]) == pytest.approx(0.8 * 3350, rel=1e-3)
    assert row[headers.index("% BW")] == "80"


def test_targets_met_missed_and_unmeasured(measurements):
    headers, rows = report.targets_table(measurements, find_peak(H100))
    status = {(r[0].split()[0], r[3]): r[headers.index("status")] for r in rows}
    assert status[("softmax_entropy", "triton")] == "met"
    assert status[("softmax_entropy", "tile")] == "missed"
    assert status[("attention", "triton")] == "met"  # 1.1x the time of SDPA, within 1.2x
    assert status[("layer_norm", "triton/tile")] == "unmeasured"
    assert status[("LoopGPT", "triton/tile")] == "unmeasured"
    no_peak = dict((r[3], r[-1]) for r in report.targets_table(measurements, None)[1] if
                   r[0].startswith("softmax"))
    assert no_peak == {"triton": "cannot judge here", "tile": "cannot judge here"}


def test_cli_writes_markdown_and_png(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_json()))
    assert report.main([str(path), "--note", "shared machine"]) == 0
    markdown = (tmp_path / "run.md").read_text()
    assert markdown == capsys.readouterr().out
    assert "`pytest bench --benchmark-only --benchmark-json=x.json`" in markdown
    assert "- note: shared machine" in markdown and "H100 SXM" in markdown and "![benchmark chart](run.png)" in markdown
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `python -m bench.report ARGV...` run in this process."""
    from looplm.cli import run_cli
    with pytest.raises(SystemExit) as exit_:
        run_cli(report.main, list(argv), prog="bench.report")
    return exit_.value.code, capsys.readouterr().err


def _one_clear_line(result, *words):
    code, err = result
    assert code == 2 and "Traceback" not in err, (code, err)
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert all(word in line for word in words), err


def test_cli_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    good = tmp_path / "run.json"
    good.write_text(json.dumps(synthetic_json()))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"benchmarks": [')
    _one_clear_line(_run_cli(capsys, str(tmp_path / "missing.json")), "cannot read", "missing.json")  # missing file
    _one_clear_line(_run_cli(capsys, str(corrupt)), "not valid JSON")  # corrupt JSON
    _one_clear_line(_run_cli(capsys, str(good), "--peak-gbps", "fast"), "--peak-gbps", "invalid float")  # wrong type
    _one_clear_line(_run_cli(capsys, str(good), "--peak-gbps", "-5", "--peak-tflops", "100"), "must be > 0")  # range
    _one_clear_line(_run_cli(capsys, str(good), "--peak-gbps", "500"), "go together")  # half a custom peak
    _one_clear_line(_run_cli(capsys, "--static", "--resources", str(corrupt)), "not valid JSON")
    _one_clear_line(_run_cli(capsys, "--static", "--resources", str(tmp_path / "none.json")), "cannot read")


def test_static_prints_a_labelled_estimate_for_the_h100_and_the_rtx5070(capsys):
    assert report.main(["--static"]) == 0
    out = capsys.readouterr().out
    assert "an estimate, not a measurement" in out
    for device in ("H100 SXM", "RTX 5070"):
        for case in ("softmax_entropy N=8192 V=50304", "layer_norm N=8192 C=4096", "linear M=8192 K=4096 N=4096",
                     "attention B=16 H=32 T=1024 D=64", "halt_update N=16384 C=384"):
            assert any(line.startswith(f"| {device}") and case in line for line in out.splitlines()), (device, case)
    assert "measured % roofline" not in out


def test_static_puts_the_measured_percent_beside_the_estimate(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_json()))
    assert report.main(["--static", str(path), "--out", str(tmp_path / "roofline")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "roofline.md").read_text() == out
    (row,) = [line for line in out.splitlines() if line.startswith("| H100 SXM") and "softmax_entropy N=8192" in line
              and "| triton" in line]
    assert row.rstrip(" |").endswith("80%")  # the synthetic triton case runs at 80% of the bandwidth peak


def test_roofline_estimate_follows_the_design():
    from bench import roofline
    from bench.peaks import PEAKS
    h100 = next(p for p in PEAKS if p.name == "H100 SXM")
    linear = roofline.design("triton", "linear", dict(M=8192, K=4096, N=4096, epilogue="bias"),
                             {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_stages": 3})
    assert linear.blocks == 64 * 32 and linear.flops == 2 * 8192 * 4096 * 4096 + 8192 * 4096
    assert linear.load_bytes == (32 * 8192 * 4096 + 64 * 4096 * 4096) * 2  # x once per column of tiles, W per row
    est = roofline.estimate(linear, h100, 2, roofline_s=linear.flops / (h100.bf16_tflops * 1e12))
    assert est["bound"] == "L2" and 0 < est["percent"] < 50  # 128 x 128 tiles: 64 FLOP per byte loaded
    small = roofline.design("triton", "layer_norm", dict(N=132, C=4096), {"BLOCK_M": 1})
    starved = roofline.estimate(small, h100, 16, roofline_s=small.dram_bytes / (h100.memory_gbps * 1e9))
    assert starved["bandwidth_share"] < 1  # one 8 KB row per SM cannot cover the latency


@pytest.mark.parametrize("device,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"), ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
    ("NVIDIA GeForce RTX 5070", "RTX 5070"), ("NVIDIA GeForce RTX 5070 Ti", None), ("NVIDIA B200", "B200"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("cpu", None)])
def test_peak_lookup_by_device_name(device, expected):
    peak = find_peak(device)
    assert (peak.name if peak else None) == expected


def test_every_peak_is_positive_and_sourced():
    for peak in PEAKS:
        assert peak.memory_gbps > 0 and peak.bf16_tflops > 0 and peak.source and peak.match, peak.name


def test_two_measurements_of_one_case_and_backend_are_refused():
    data = synthetic_json()
    data["benchmarks"].append(dict(data["benchmarks"][1], name="test_again"))
    with pytest.raises(ValueError, match="both record case 'softmax_entropy N=8192 V=50304'"):
        schema.load_measurements(data)
