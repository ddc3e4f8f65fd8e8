"""Data-parallel training under torchrun: two CPU processes, gloo."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from looplm.checkpoint import load_checkpoint


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_two_processes_train_one_model(tmp_path):
    """Two processes under torchrun train one model: rank 0's weights took rank 1's gradients too, so
    they differ from one process training alone on rank 0's batches (same seed, same settings)."""
    def train(out_dir, launcher):
        command = [sys.executable, *launcher, "-m", "looplm.train", "--task=addition", f"--out_dir={out_dir}",
                   "--train_digits=(1,2)", "--test_digits=(1,2)", "--n_train=200", "--n_test=10", "--batch_size=4",
                   "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--warmup_iters=1", "--progress=False",
                   "--report=False", "--device=cpu", "--block_size=16", "--n_embd=16", "--n_head=2", "--n_loops=2",
                   "--max_seconds=600"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return load_checkpoint(out_dir / "last").state_dict()

    both = train(tmp_path / "run", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [row["iter"] for row in csv.DictReader(f)] == ["0", "3"]  # written by one process only
    alone = train(tmp_path / "alone", [])
    assert both.keys() == alone.keys()
    differing = [name for name in both if not torch.equal(both[name], alone[name])]
    assert differing, "rank 0 trained as if alone: the gradients were not averaged across processes"
