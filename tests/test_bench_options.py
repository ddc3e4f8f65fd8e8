"""bench/conftest.py: a --benchmark-only run times the benchmarks and lists no skip reasons."""
import os
import subprocess
import sys
from pathlib import Path

from bench.conftest import _without_skips

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_only_reports_no_skip_reasons():
    assert _without_skips("a") == "fExX"
    assert _without_skips("A") == "fExXpP"
    assert _without_skips("fsE") == "fE"


def test_benchmark_only_deselects_what_times_nothing():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q",
                           "tests/test_config.py", "bench/test_bench_baselines.py", "bench/test_bench_model.py",
                           "-k", "config or baselines or nanogpt"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and all("test_train_step_against_nanogpt" in line for line in collected), done.stdout
