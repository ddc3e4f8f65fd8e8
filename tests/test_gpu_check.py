"""bench/gpu_check.sh in its dry run (tiny shapes, no suite): the steps run and the files come out."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="the check is a bash script that time-boxes its steps with coreutils' timeout")
def test_gpu_check_dry_run_writes_its_tables(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout + done.stderr + (out / "check.log").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.log", "environment.json", "model.json", "model.md", "ops.json", "ops.md", "summary.md"]
    summary = (out / "summary.md").read_text()
    for step in ("environment | ok", "suite | skipped (dry run)", "ops | ok", "model | ok"):
        assert step in summary, summary
    ops = json.loads((out / "ops.json").read_text())
    assert {r["op"] for r in ops["rows"]} == {"copy", "softmax_entropy", "layer_norm", "linear", "attention",
                                             "halt_update", "block"}
    assert all(r["ms"] > 0 for r in ops["rows"]) and not ops["not_run"]
    model = json.loads((out / "model.json").read_text())
    cases = {r["case"].split(" B=")[0] for r in model["rows"]}
    assert cases == {"eval forward", "greedy decode"} and all(r["vs_torch"] > 0 for r in model["rows"])
    assert "halting on" in (out / "model.md").read_text()
    halting = [r for r in model["rows"] if r["case"].endswith("halting on") or r["variant"].endswith(", halting")]
    assert halting and all(0 < r["notes"]["efficiency"] < 5 for r in halting), halting
    compiled = {r["variant"]: r["notes"]["tokens_without_a_slot"] for r in halting if "compiled" in r["variant"]}
    assert compiled.get("torch compiled, halting") == 0 and set(compiled.values()) == {0}, compiled  # every
    # backend that runs natively here compiles too (on a GPU: triton and tile), each with its plan's slots
