"""The cuTile emulator against hand-computed results, independent of the project's kernels.

Expected values are cuTile's documented examples (tile-index addressing, order, padding, store
clipping, mma) or worked out by hand, so the emulator is checked against cuTile's meaning, not
against itself.
"""
import math

import pytest
import torch

import cuda.tile as ct
from looplm_tile.emulator import EmulationError, launch


def run(kernel, *args, grid=(1,)):
    launch(grid, kernel, args)


# ---- addressing and padding

@ct.kernel
def load_1d(X, Out, INDEX: ct.Constant[int], PADDING: ct.Constant[int]):
    modes = (ct.PaddingMode.ZERO, ct.PaddingMode.NEG_INF, ct.PaddingMode.NAN, ct.PaddingMode.UNDETERMINED)
    ct.store(Out, index=(0,), tile=ct.load(X, index=(INDEX,), shape=(4,), padding_mode=modes[PADDING]))


@pytest.mark.parametrize("padding, fill", [(0, 0.0), (1, -math.inf), (2, math.nan), (3, math.nan)])
def test_load_pads_the_out_of_bounds_part_of_a_tile(padding, fill):
    x, out = torch.arange(10.0), torch.empty(4)
    run(load_1d, x, out, 2, padding)
    torch.testing.assert_close(out[:2], torch.tensor([8.0, 9.0]))
    torch.testing.assert_close(out[2:], torch.full((2,), fill), equal_nan=True)
    run(load_1d, x, out, 1, padding)
    torch.testing.assert_close(out, torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_a_tile_entirely_outside_the_array_is_an_error():
    with pytest.raises(EmulationError, match="entirely outside"):
        run(load_1d, torch.arange(10.0), torch.empty(4), 3, 0)


@ct.kernel
def load_slice(X, Out, offset, length, INDEX: ct.Constant[int]):
    sub = X.slice(axis=0, start=offset, stop=offset + length)
    ct.store(Out, index=(0,), tile=ct.load(sub, index=(INDEX,), shape=(4,), padding_mode=ct.PaddingMode.ZERO))


def test_a_slice_with_runtime_bounds_is_a_view_whose_end_pads_like_the_arrays():
    x, out = torch.arange(16.0), torch.empty(4)
    run(load_slice, x, out, 8, 8, 1)  # cuTile's documented example: the slice's second tile is 12 .. 15
    assert out.tolist() == [12.0, 13.0, 14.0, 15.0]
    run(load_slice, x, out, 2, 6, 1)  # elements 2 .. 7: its second tile has 6, 7, then padding
    assert out.tolist() == [6.0, 7.0, 0.0, 0.0]
    with pytest.raises(EmulationError, match="undefined in cuTile"):
        run(load_slice, x, out, 12, 5, 0)  # stop past the array's end


@ct.kernel
def load_transposed(X, Out):
    for i in range(4):
        ct.store(Out, index=(i, 0), tile=ct.load(X, index=(i, 0), shape=(1, 4), order="F"))


@ct.kernel
def load_3d_order(X, Out):
    for i in range(2):
        ct.store(Out, index=(i, 0, 0), tile=ct.load(X, index=(i, 0, 0), shape=(1, 2, 2), order=(0, 2, 1)))


def test_load_order_permutes_the_array_axes_as_documented():
    out = torch.empty(4, 4, dtype=torch.int64)
    run(load_transposed, torch.arange(16).reshape(4, 4), out)
    assert out.tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    out = torch.empty(2, 2, 2, dtype=torch.int64)
    run(load_3d_order, torch.arange(8).reshape(2, 2, 2), out)
    assert out.tolist() == [[[0, 2], [1, 3]], [[4, 6], [5, 7]]]


@ct.kernel
def store_clipped(X):
    tile = ct.ones((4,), dtype=X.dtype)
    ct.store(X, index=(0,), tile=tile)
    ct.store(X, index=(1,), tile=tile * 2)


@ct.kernel
def store_scalars(X):
    ct.store(X, index=(0, 0), tile=0)
    ct.store(X, index=(0, 1), tile=1)
    ct.store(X, index=(1, 0), tile=2)
    ct.store(X, index=(1, 1), tile=3)


def test_store_drops_the_out_of_bounds_part_and_broadcasts_scalars():
    x = torch.zeros(6, dtype=torch.int32)
    run(store_clipped, x)
    assert x.tolist() == [1, 1, 1, 1, 2, 2]
    x = torch.zeros(2, 2, dtype=torch.int32)
    run(store_scalars, x)
    assert x.tolist() == [[0, 1], [2, 3]]


@ct.kernel
def block_ids(Out):
    ct.store(Out, index=(ct.bid(0), ct.bid(1)), tile=ct.full((1, 1), ct.bid(0) + 10 * ct.bid(1), dtype=ct.int32))
    ct.store(Out, index=(2, 3), tile=ct.full((1, 1), ct.num_blocks(0) * 100 + ct.num_blocks(1), dtype=ct.int32))


def test_every_block_of_the_grid_runs_with_its_own_bid():
    out = torch.full((3, 4), -1, dtype=torch.int32)
    run(block_ids, out, grid=(2, 3))
    assert out[:2, :3].tolist() == [[0, 10, 20], [1, 11, 21]]
    assert out[2, 3].item() == 203


# ---- what cuTile's compiler refuses, the emulator refuses

@ct.kernel
def load_shape_12(X, Out):
    ct.store(Out, index=(0,), tile=ct.load(X, index=(0,), shape=(12,)))


@ct.kernel
def scale_store(X, Out, s):
    ct.store(Out, index=(0,), tile=ct.load(X, index=(0,), shape=(4,)) * s)


@ct.kernel
def uses_cumsum(X, Out):
    ct.store(Out, index=(0,), tile=ct.cumsum(ct.load(X, index=(0,), shape=(4,)), axis=0))


def test_non_power_of_two_tiles_narrowing_stores_and_unknown_ops_are_refused():
    with pytest.raises(EmulationError, match="power of two"):
        run(load_shape_12, torch.zeros(16), torch.zeros(16))
    # bf16 tile * float32 scalar parameter is float32 (a typed scalar): storing it narrows.
    with pytest.raises(EmulationError, match="narrow"):
        run(scale_store, torch.ones(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16), 2.0)
    out = torch.zeros(4)
    run(scale_store, torch.ones(4, dtype=torch.bfloat16), out, 2.5)
    assert out.tolist() == [2.5] * 4
    with pytest.raises(EmulationError, match="cuda.tile.cumsum"):
        run(uses_cumsum, torch.zeros(4), torch.zeros(4))


# ---- arithmetic, promotion, math

@ct.kernel
def int_arith(Out, FloatOut):
    t = ct.arange(4, dtype=ct.int32)
    ct.store(Out, index=(0, 0), tile=(t + 1).reshape((1, 4)))  # stays int32: the constant adapts
    ct.store(Out, index=(1, 0), tile=(ct.arange(4, dtype=ct.int32, start=7, step=-1) // 3).reshape((1, 4)))
    ct.store(FloatOut, index=(0,), tile=t / 2)  # integer true division is float32


def test_integer_arithmetic_keeps_int32_and_true_division_gives_float32():
    out, float_out = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(4)
    run(int_arith, out, float_out)
    assert out.tolist() == [[1, 2, 3, 4], [2, 2, 1, 1]]
    assert float_out.tolist() == [0.0, 0.5, 1.0, 1.5]


@ct.kernel
def math_ops(X, Out):
    x = ct.load(X, index=(0,), shape=(4,))
    ct.store(Out, index=(0, 0), tile=ct.exp(x).reshape((1, 4)))
    ct.store(Out, index=(1, 0), tile=ct.exp2(x).reshape((1, 4)))
    ct.store(Out, index=(2, 0), tile=ct.log(x + 1.0).reshape((1, 4)))
    ct.store(Out, index=(3, 0), tile=ct.rsqrt(x + 1.0).reshape((1, 4)))
    ct.store(Out, index=(4, 0), tile=ct.where(x > 1.5, x, -1.0).reshape((1, 4)))
    ct.store(Out, index=(5, 0), tile=max(x, 2.0).reshape((1, 4)))  # builtin max of tiles is elementwise


def test_elementwise_math():
    out = torch.zeros(6, 4)
    run(math_ops, torch.tensor([0.0, 1.0, 2.0, 3.0]), out)
    e = math.e
    expected = [[1, e, e ** 2, e ** 3], [1, 2, 4, 8], [0, math.log(2), math.log(3), math.log(4)],
                [1, 2 ** -0.5, 3 ** -0.5, 0.5], [-1, -1, 2, 3], [2, 2, 2, 3]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))


@ct.kernel
def reductions(X, Out):
    x = ct.load(X, index=(0, 0), shape=(2, 4))
    ct.store(Out, index=(0, 0), tile=ct.sum(x, axis=1, keepdims=True).reshape((1, 2)))
    ct.store(Out, index=(1, 0), tile=ct.max(x, axis=1).reshape((1, 2)))
    ct.store(Out, index=(2, 0), tile=ct.reshape(ct.sum(x), (1, 1)))


def test_reductions_and_max_ignores_nan_by_default():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, math.nan, 7.0]])
    out = torch.zeros(3, 2)
    run(reductions, torch.nan_to_num(x, nan=6.0), out)
    assert out[:2].tolist() == [[6.0, 22.0], [3.0, 7.0]] and out[2, 0].item() == 28.0
    run(reductions, x, out)
    assert out[1].tolist() == [3.0, 7.0]


@ct.kernel
def shapes(Out):
    t = ct.arange(8, dtype=ct.int32)
    ct.store(Out, index=(0, 0), tile=ct.reshape(t, (2, 4)))
    ct.store(Out, index=(1, 0), tile=ct.transpose(ct.reshape(t, (2, 4))).reshape((2, 4)))
    ct.store(Out, index=(2, 0), tile=ct.permute(t.reshape((2, 2, 2)), (2, 0, 1)).reshape((2, 4)))
    ct.store(Out, index=(3, 0), tile=ct.broadcast_to(ct.arange(4, dtype=ct.int32), (2, 4)))
    column = ct.arange(2, dtype=ct.int32)[:, None]
    ct.store(Out, index=(4, 0), tile=ct.expand_dims(ct.arange(4, dtype=ct.int32), 0) + column * 10)


def test_shape_manipulation():
    out = torch.zeros(10, 4, dtype=torch.int32)
    run(shapes, out)
    assert out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7],  # reshape
                            [0, 4, 1, 5], [2, 6, 3, 7],  # transpose
                            [0, 2, 4, 6], [1, 3, 5, 7],  # permute (2, 0, 1)
                            [0, 1, 2, 3], [0, 1, 2, 3],  # broadcast_to
                            [0, 1, 2, 3], [10, 11, 12, 13]]  # expand_dims + [:, None]


# ---- matrix products

@ct.kernel
def mma_kernel(X, Y, Acc, Out):
    x = ct.load(X, index=(0, 0), shape=(2, 4))
    y = ct.load(Y, index=(0, 0), shape=(4, 2))
    ct.store(Out, index=(0, 0), tile=ct.mma(x, y, ct.load(Acc, index=(0, 0), shape=(2, 2))))


def test_mma_keeps_the_accumulator_dtype_and_checks_its_dtypes():
    out = torch.zeros(2, 2)
    ones = torch.ones(2, 4, dtype=torch.bfloat16)
    run(mma_kernel, ones, torch.ones(4, 2, dtype=torch.bfloat16), torch.full((2, 2), 10.0), out)
    assert out.tolist() == [[14.0, 14.0], [14.0, 14.0]]
    with pytest.raises(EmulationError, match="accumulator"):  # bf16 inputs accumulate in fp32 only
        run(mma_kernel, ones, torch.ones(4, 2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16),
            torch.zeros(2, 2, dtype=torch.bfloat16))
    with pytest.raises(EmulationError, match="different dtypes"):  # mma does not promote
        run(mma_kernel, ones, torch.ones(4, 2), torch.zeros(2, 2), out)
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    run(mma_kernel, a, b, torch.zeros(2, 2), out)
    torch.testing.assert_close(out, a @ b)


# ---- gather / scatter

@ct.kernel
def gather_scatter(X, Out):
    idx = ct.arange(8, dtype=ct.int32) * 2 - 2  # -2, 0, 2, ..., 12: the ends are out of bounds
    ct.scatter(Out, idx, ct.gather(X, idx, padding_value=-1.0))


def test_gather_pads_and_scatter_skips_out_of_bounds_indices():
    x = torch.arange(10.0)
    out = torch.full((10,), 99.0)
    run(gather_scatter, x, out)
    assert out.tolist() == [0.0, 99.0, 2.0, 99.0, 4.0, 99.0, 6.0, 99.0, 8.0, 99.0]
