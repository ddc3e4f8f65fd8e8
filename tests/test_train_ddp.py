"""Data-parallel training under torchrun: two CPU processes, gloo."""
import csv
import os
import subprocess
import sys

import torch.distributed as dist
import pytest

from looplm.checkpoint import load_checkpoint


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_two_processes_train_one_model(tmp_path):
    out_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "looplm.train", "--task=addition", f"--out_dir={out_dir}", "--train_digits=(1,2)",
               "--test_digits=(1,2)", "--n_train=200", "--n_test=10", "--batch_size=4", "--max_iters=3",
               "--eval_interval=3", "--eval_iters=1", "--warmup_iters=1", "--progress=False", "--report=False",
               "--device=cpu", "--block_size=16", "--n_embd=16", "--n_head=2", "--n_loops=2", "--max_seconds=600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out_dir / "metrics.csv") as f:
        assert [row["iter"] for row in csv.DictReader(f)] == ["0", "3"]  # written by one process only
    assert load_checkpoint(out_dir / "last").config.n_loops == 2
