"""The plain-PyTorch baselines of the kernel benchmarks compute what the ops compute (a fast wrong
baseline would flatter nobody), checked against the reference at tiny fp32 shapes on any machine."""
from __future__ import annotations

import pytest
import torch

from bench.test_bench_kernels import EAGER, make_args, sdpa_attention
from looplm import get_backend
from looplm.testing import assert_close

TINY = [("layer_norm", dict(N=5, C=33)), ("linear", dict(M=7, K=16, N=24, epilogue="bias+gelu")),
        ("linear", dict(M=7, K=16, N=24, epilogue="bias+residual")), ("attention", dict(B=2, H=3, T=17, D=8)),
        ("block", dict(B=2, T=9, C=32, H=4))]


@pytest.mark.parametrize("op,shape", TINY, ids=[f"{op}-{i}" for i, (op, _) in enumerate(TINY)])
def test_baselines_match_the_reference(op: str, shape: dict) -> None:
    args = make_args(op, shape, torch.float32, torch.device("cpu"))
    expected = get_backend("reference").ops[op](*args)
    for baseline in [EAGER[op], *([sdpa_attention] if op == "attention" else [])]:
        assert_close(baseline(*args), expected, composed=op == "block", msg=f"{op}: {baseline.__name__}")
