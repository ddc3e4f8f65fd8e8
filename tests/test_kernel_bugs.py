"""Bugs only a GPU would show, pinned down without one (tier 1).

- A row of logits whose first chunk is all -inf: the running max must not be pinned at 0 (cuTile
  once did: entropy and max probability came out wrong, inf on a flush-to-zero GPU). Checked for
  every registered backend that can run here, the "torch" and "reference" ones included.
- Attention with B x H above 65535: CUDA caps grid axes 1 and 2 at 65535 blocks, so a launch with
  B x H on axis 1 fails on a GPU. The launch geometry is checked on meta tensors, no GPU needed.
- 64-bit indices where a launch's dims or strides exceed int32.
"""
import inspect
import math

import pytest
import torch

from looplm import available_backends, get_backend
from looplm.testing import assert_close, device_for

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

RUNNABLE = [name for name, availability in available_backends().items() if availability.available]


@pytest.mark.parametrize("backend", RUNNABLE)
def test_hierarchical_parity_tier1_softmax_entropy_first_chunk_all_minus_inf(backend):
    # 8192 x -inf then 8192 x -100: the -inf fill the first chunk of every configuration in use
    # (BLOCK_V <= 8192), and the row's softmax is uniform over the last 8192 logits.
    half = 8192
    row = torch.cat([torch.full((half,), -math.inf), torch.full((half,), -100.0)])
    plain = torch.randn(2 * half) * 3
    logits = torch.stack([row, plain, row.flip(0)]).to(device_for(backend))
    ops = get_backend(backend).ops
    entropy, max_prob = ops["softmax_entropy"](logits)
    expected_entropy, expected_max_prob = get_backend("reference").ops["softmax_entropy"](logits.double())
    assert torch.isfinite(entropy).all() and torch.isfinite(max_prob).all()
    assert entropy[0].item() == pytest.approx(math.log(half), rel=1e-5)
    assert max_prob[0].item() == pytest.approx(1.0 / half, rel=1e-5)
    assert_close(entropy, expected_entropy, torch.float32)
    assert_close(max_prob, expected_max_prob, torch.float32)


def _meta_heads(batch: int, heads: int, seq: int, head_size: int) -> tuple:
    return tuple(torch.empty(batch, heads, seq, head_size, dtype=torch.bfloat16, device="meta") for _ in range(4))


MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def _fits(grid) -> bool:
    return all(0 <= g <= limit for g, limit in zip(grid, MAX_GRID))


@pytest.mark.parametrize("batch,heads", [(1, 70000), (4096, 32), (16, 6)])
def test_hierarchical_parity_tier1_triton_attention_grid_fits_cuda_for_any_batch_times_heads(batch, heads):
    pytest.importorskip("triton")
    from looplm_triton import attention
    from looplm_triton.common import capture, check_grid

    q, k, v, out = _meta_heads(batch, heads, 200, 64)
    (launch,) = capture(attention.attention_into, q, k, v, out, True, 0.125)
    assert _fits(launch.grid), launch.grid
    block_m = launch.args["BLOCK_M"]
    assert math.prod(launch.grid) == -(-200 // block_m) * batch * heads  # every (query block, head) once
    assert attention.attention_grid(batch, heads, 200, block_m) == launch.grid
    with pytest.raises(ValueError, match="axis 1 has 70000 blocks"):
        check_grid((4, 70000))  # what B x H on axis 1 would have asked for


@pytest.mark.parametrize("batch,heads", [(1, 70000), (4096, 32), (16, 6)])
def test_hierarchical_parity_tier1_tile_attention_grid_fits_cuda_for_any_batch_times_heads(batch, heads):
    pytest.importorskip("cuda.tile")
    from looplm_tile import attention, runtime

    q, k, v, out = _meta_heads(batch, heads, 200, 64)
    ((grid, _, args, _),) = runtime.capture(attention.attention_into, q, k, v, out, True, 0.125)
    assert _fits(grid), grid
    block_m = args[list(inspect.signature(attention.attention_kernel._pyfunc).parameters).index("BLOCK_M")]
    assert math.prod(grid) == -(-200 // block_m) * batch * heads
    assert attention.attention_grid(batch, heads, 200, block_m) == grid
    with pytest.raises(ValueError, match="axis 1 has 70000 blocks"):
        runtime.check_grid((4, 70000))


def test_hierarchical_parity_tier1_attention_many_heads_on_one_axis_match_the_reference():
    """The flattened grid's (query block, batch, head) decomposition, with more heads than query blocks."""
    q, k, v = (torch.randn(3, 5, 70, 16) for _ in range(3))
    expected = get_backend("reference").ops["attention"](q, k, v, True, None)
    for backend in ("triton", "tile"):
        if backend in RUNNABLE:
            device = device_for(backend)
            got = get_backend(backend).ops["attention"](q.to(device), k.to(device), v.to(device))
            assert_close(got, expected.to(device), torch.float32, msg=backend)


def test_tile_launches_past_int32_take_64_bit_indices():
    pytest.importorskip("cuda.tile")
    import cuda.tile as ct
    from looplm_tile import runtime

    big = torch.empty(2 ** 31 + 16, dtype=torch.bfloat16, device="meta")
    small = torch.empty(4096, 384, dtype=torch.bfloat16, device="meta")
    assert runtime.array_of(big).index_dtype == ct.int64
    assert runtime.array_of(small).index_dtype == ct.int32
    assert runtime.array_of(small).stride_divisible_by == (8, 1)  # 384 bf16 = 768 bytes, a multiple of 16
    assert runtime.array_of(small).shape_divisible_by == (16, 16)


@pytest.mark.parametrize("backend", [b for b in ("triton", "tile") if b in RUNNABLE])
def test_hierarchical_parity_tier1_kernel_block_applies_dropout_itself(backend, monkeypatch):
    """No fallback of the block's own: with dropout_p > 0 the kernel block runs its kernels and drops
    out the two residual branches, as the reference does (same seed, same masks)."""
    import reference
    from looplm.ops import BlockWeights

    g = torch.Generator().manual_seed(3)
    width, heads = 32, 2
    shapes = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
              (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    device = device_for(backend)
    weights = BlockWeights(*(torch.randn(s, generator=g).to(device) * 0.2 for s in shapes))
    x = torch.randn(2, 9, width, generator=g).to(device)
    torch.manual_seed(7)
    expected = reference.block(x, weights, heads, 0.5)
    monkeypatch.setattr(reference, "block", lambda *a, **k: pytest.fail("the kernel block fell back to the reference"))
    torch.manual_seed(7)
    got = get_backend(backend).ops["block"](x, weights, heads, 0.5)
    assert_close(got, expected, torch.float32, composed=True)
    torch.manual_seed(7)
    assert not torch.allclose(get_backend(backend).ops["block"](x, weights, heads, 0.0), got)  # dropout acted
