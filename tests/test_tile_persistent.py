"""cuTile's linear layer is persistent where its rows are 16-byte aligned: a few blocks walk all the
output tiles (checked in the emulator against the reference, and on recorded launches); rows the
copy engine cannot move whole (65 logits) run one tile per block."""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("cuda.tile")

import reference  # noqa: E402
from looplm.testing import assert_close  # noqa: E402
from looplm_tile import linear, runtime  # noqa: E402
from tuning.gpus import reference_sms  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")
SMALL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "occupancy": 1, "LATENCY": 3}


def _grid(M: int, N: int, K: int) -> tuple:
    """(grid, PERSISTENT) of the launch at (M, N, K)."""
    x, w = torch.empty(M, K, device="meta"), torch.empty(N, K, device="meta")
    ((grid, kernel, args, _),) = runtime.capture(linear._launch, x, w, None, None, torch.empty(M, N, device="meta"),
                                                 False, linear.TUNING.default)
    names = list(inspect.signature(kernel._pyfunc).parameters)
    return grid, args[names.index("PERSISTENT")]


def test_aligned_rows_launch_one_block_per_sm_and_ragged_rows_one_per_tile():
    assert _grid(16384, 1536, 384) == ((reference_sms(None),), True)  # no particular GPU: an H100/H200's
    tiles = -(-4096 // linear.TUNING.default["BLOCK_M"]) * -(-65 // linear.TUNING.default["BLOCK_N"])
    assert _grid(4096, 65, 384) == ((tiles,), False)


@pytest.mark.parametrize("M,N,K,activation,residual", [(150, 96, 64, "gelu", True), (70, 65, 40, "none", False)])
@torch.no_grad()
def test_persistent_and_per_tile_launches_match_the_reference(M, N, K, activation, residual):
    x, w, b = torch.randn(M, K), torch.randn(N, K) * K ** -0.5, torch.randn(N)
    r = torch.randn(M, N) if residual else None
    y = torch.empty(M, N)
    linear._launch(x, w, b, r, y, activation == "gelu", SMALL)  # 3 emulated blocks over up to 15 tiles
    assert_close(y, reference.linear(x, w, b, activation, r))
