"""A CPU emulator for the part of cuTile (`cuda.tile`) that the project's kernels use.

cuTile has no interpreter: a `@ct.kernel` compiles for a GPU or not at all. The emulator runs the
kernel's plain Python function (`kernel._pyfunc`) once per block of the grid, on CPU torch tensors,
with every name that refers to `cuda.tile` in the kernel's module rebound to an emulation namespace
(`launch` copies the function with patched globals; the kernel's source is never edited). Tiles
are torch tensors wrapped in `Tile`, which carries the cuTile dtype and applies cuTile's rules:

- tile-index addressing: `load(A, index, shape, order=...)` reads elements
  `index[d] * shape[d] + i` of the array with its axes permuted by `order`; `store` writes the
  tile's in-bounds part and drops the rest; `Array.slice` (bounds that may be runtime scalars) is a
  view whose end bounds loads and stores as the array's own;
- out-of-bounds padding: ZERO, NEG_ZERO, NAN, POS_INF, NEG_INF as documented; UNDETERMINED pads
  with a poison value (NaN for floats, the dtype's max for integers) so that a kernel relying on
  it fails its tests instead of passing by luck. A tile entirely outside the array (undefined
  behaviour in cuTile) is an error;
- tile shapes must be powers of two; stores never narrow dtypes implicitly (both as cuTile's
  compiler enforces them);
- arithmetic promotion from cuTile's own table (`cuda.tile._datatype.promote_dtypes`): Python
  numbers are loosely typed constants; runtime scalars (`bid`, `num_blocks`, `Array.shape`,
  scalar kernel parameters) are typed 0-d tiles (int32, float32);
- `mma` keeps the accumulator's dtype and accepts only cuTile's input/accumulator pairs; its
  product is computed in the accumulator's precision (fp32 inputs are not rounded to tf32).

Anything else raises `EmulationError` naming the operation, rather than guessing its meaning.
Known differences from a GPU: `flush_to_zero` keeps subnormals; approximate rounding modes
compute exactly; integer overflow follows torch (int32 wraps); floor division and modulo on
negative integers follow Python; reductions and matmuls use torch's summation order.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import itertools
import math
import types
import typing
from typing import Any, Callable, Sequence

import torch

import cuda.tile as ct
# cuTile's own promotion and mma tables, so that the emulator cannot drift from the compiler.
from cuda.tile._datatype import _mma_supported_dtypes as MMA_ACCUMULATORS
from cuda.tile._datatype import promote_dtypes

__all__ = ["EmulationError", "Tile", "Array", "launch", "emulated"]


class EmulationError(NotImplementedError):
    """An operation the emulator does not implement, or undefined behaviour it will not guess."""


_TORCH_DTYPES = {
    ct.bool_: torch.bool, ct.int8: torch.int8, ct.int16: torch.int16, ct.int32: torch.int32,
    ct.int64: torch.int64, ct.uint8: torch.uint8, ct.float16: torch.float16, ct.bfloat16: torch.bfloat16,
    ct.float32: torch.float32, ct.float64: torch.float64,
}
_TILE_DTYPES = {v: k for k, v in _TORCH_DTYPES.items()}
_FLOAT_DTYPES = (ct.float16, ct.bfloat16, ct.float32, ct.float64)
_PADDING = {
    ct.PaddingMode.ZERO: 0.0, ct.PaddingMode.NEG_ZERO: -0.0, ct.PaddingMode.NAN: math.nan,
    ct.PaddingMode.POS_INF: math.inf, ct.PaddingMode.NEG_INF: -math.inf,
}
_EXACT_ROUNDING = (None, ct.RoundingMode.RN, ct.RoundingMode.FULL, ct.RoundingMode.APPROX)


def tile_dtype(dtype: Any) -> ct.DType:
    """A cuTile dtype from a cuTile, torch or numpy dtype (kernels may name any of them)."""
    if isinstance(dtype, ct.DType):
        if dtype not in _TORCH_DTYPES:
            raise EmulationError(f"dtype {dtype.name} is not emulated; emulated: "
                                 f"{sorted(d.name for d in _TORCH_DTYPES)}")
        return dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in _TILE_DTYPES:
            raise EmulationError(f"torch dtype {dtype} has no emulated cuTile dtype")
        return _TILE_DTYPES[dtype]
    name = getattr(dtype, "__name__", None) or str(dtype)  # numpy scalar types and dtypes
    name = {"bool": "bool_", "bool_": "bool_"}.get(name, name)
    if isinstance(getattr(ct, name, None), ct.DType):
        return tile_dtype(getattr(ct, name))
    raise EmulationError(f"cannot interpret {dtype!r} as a cuTile dtype")


def _is_float(dtype: ct.DType) -> bool:
    return dtype in _FLOAT_DTYPES


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    for axis, size in enumerate(shape):
        if size < 1 or size & (size - 1):
            raise EmulationError(f"{what}: dimension #{axis} of shape {shape} is not a power of two "
                                 "(cuTile tiles must be)")
    return shape


def _check_rounding(rounding_mode: Any, op: str) -> None:
    if rounding_mode not in _EXACT_ROUNDING:
        raise EmulationError(f"{op}: rounding_mode={rounding_mode} is not emulated (only round to nearest, "
                             "full and approximate, which compute exactly)")


# ---------------------------------------------------------------------------------------------
# Tiles


class Tile:
    """An immutable tile: a torch tensor plus its cuTile dtype. 0-d tiles are cuTile's scalars."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: torch.Tensor, dtype: ct.DType | None = None):
        dtype = tile_dtype(data.dtype) if dtype is None else dtype
        if data.dtype != _TORCH_DTYPES[dtype]:
            data = data.to(_TORCH_DTYPES[dtype])
        self.data = data
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.dim()

    def __repr__(self) -> str:
        return f"Tile({self.dtype.name}, {self.data.tolist()})"

    # Python control flow on scalars (`if`, `range`, indices).
    def _scalar(self, what: str):
        if self.data.numel() != 1:
            raise EmulationError(f"{what} of a tile of shape {self.shape}: only scalars (0-d tiles) convert")
        return self.data.item()

    def __bool__(self) -> bool:
        return bool(self._scalar("truth value"))

    def __index__(self) -> int:
        if _is_float(self.dtype) or self.dtype == ct.bool_:
            raise EmulationError(f"a {self.dtype.name} scalar cannot be used as an integer index")
        return int(self._scalar("integer value"))

    __int__ = __index__

    def __float__(self) -> float:
        return float(self._scalar("float value"))

    def __hash__(self):  # tiles define ==, so they are unhashable, as in cuTile
        raise TypeError("unhashable type: 'Tile'")

    # Shape and dtype methods mirror the module functions.
    def astype(self, dtype, *, rounding_mode=None) -> "Tile":
        return astype(self, dtype, rounding_mode=rounding_mode)

    def reshape(self, shape) -> "Tile":
        return reshape(self, shape)

    def permute(self, axes) -> "Tile":
        return permute(self, axes)

    def transpose(self, axis0=None, axis1=None) -> "Tile":
        return transpose(self, axis0, axis1)

    def item(self) -> "Tile":
        if self.data.numel() != 1:
            raise EmulationError(f"item() of a tile of shape {self.shape}: it needs exactly one element")
        return Tile(self.data.reshape(()), self.dtype)

    def __getitem__(self, index) -> "Tile":
        index = index if isinstance(index, tuple) else (index,)
        for part in index:
            if not (part is None or part is Ellipsis or part == slice(None)):
                raise EmulationError(f"tile indexing with {part!r}: only None (new axis), ':' and '...' are "
                                     "emulated; use ct.extract for sub-tiles")
        return Tile(self.data[index], self.dtype)

    # Arithmetic: every operator goes through cuTile's promotion.
    def __add__(self, o): return _binary(torch.add, self, o, "+")
    def __radd__(self, o): return _binary(torch.add, o, self, "+")
    def __sub__(self, o): return _binary(torch.sub, self, o, "-")
    def __rsub__(self, o): return _binary(torch.sub, o, self, "-")
    def __mul__(self, o): return _binary(torch.mul, self, o, "*")
    def __rmul__(self, o): return _binary(torch.mul, o, self, "*")
    def __truediv__(self, o): return truediv(self, o)
    def __rtruediv__(self, o): return truediv(o, self)
    def __floordiv__(self, o): return floordiv(self, o)
    def __rfloordiv__(self, o): return floordiv(o, self)
    def __mod__(self, o): return mod(self, o)
    def __rmod__(self, o): return mod(o, self)
    def __pow__(self, o): return _binary(torch.pow, self, o, "**")
    def __rpow__(self, o): return _binary(torch.pow, o, self, "**")
    def __and__(self, o): return _bitwise(torch.bitwise_and, self, o, "&")
    def __rand__(self, o): return _bitwise(torch.bitwise_and, o, self, "&")
    def __or__(self, o): return _bitwise(torch.bitwise_or, self, o, "|")
    def __ror__(self, o): return _bitwise(torch.bitwise_or, o, self, "|")
    def __xor__(self, o): return _bitwise(torch.bitwise_xor, self, o, "^")
    def __rxor__(self, o): return _bitwise(torch.bitwise_xor, o, self, "^")
    def __lt__(self, o): return _compare(torch.lt, self, o)
    def __le__(self, o): return _compare(torch.le, self, o)
    def __gt__(self, o): return _compare(torch.gt, self, o)
    def __ge__(self, o): return _compare(torch.ge, self, o)
    def __eq__(self, o): return _compare(torch.eq, self, o)
    def __ne__(self, o): return _compare(torch.ne, self, o)
    def __matmul__(self, o): return matmul(self, o)
    def __rmatmul__(self, o): return matmul(o, self)

    def __neg__(self) -> "Tile":
        if self.dtype == ct.bool_:
            raise EmulationError("negation of a bool tile; use ~")
        return Tile(-self.data, self.dtype)

    def __invert__(self) -> "Tile":
        if _is_float(self.dtype):
            raise EmulationError(f"~ on a {self.dtype.name} tile")
        return Tile(~self.data, self.dtype)


def _constant_dtype(value) -> ct.DType:
    """The concrete dtype cuTile picks for a loosely typed constant standing alone."""
    if isinstance(value, bool):
        return ct.bool_
    if isinstance(value, int):
        return ct.int32 if -2 ** 31 <= value < 2 ** 31 else ct.int64
    if isinstance(value, float):
        return ct.float32
    raise EmulationError(f"{type(value).__name__} value {value!r} is not a tile or a numeric constant")


def _category(dtype: ct.DType) -> int:
    return 0 if dtype == ct.bool_ else 2 if _is_float(dtype) else 1


def _common_dtype(a, b) -> ct.DType:
    """cuTile's arithmetic promotion of two operands (tiles or loosely typed constants)."""
    a_tile, b_tile = isinstance(a, Tile), isinstance(b, Tile)
    if not a_tile and not b_tile:
        raise EmulationError("an operation on two plain constants reached the emulator")
    if a_tile and b_tile:
        return promote_dtypes(a.dtype, b.dtype)
    tile, constant = (a, b) if a_tile else (b, a)
    constant_dtype = _constant_dtype(constant)
    if _category(constant_dtype) == _category(tile.dtype):
        return tile.dtype
    return promote_dtypes(tile.dtype, constant_dtype)


def as_tile(value, dtype: ct.DType | None = None) -> Tile:
    """A tile from a tile or a constant, cast to `dtype` when given."""
    if isinstance(value, Tile):
        return value if dtype is None or value.dtype == dtype else Tile(value.data, dtype)
    dtype = dtype or _constant_dtype(value)
    return Tile(torch.tensor(value, dtype=_TORCH_DTYPES[dtype]), dtype)


def _operands(a, b) -> tuple[torch.Tensor, torch.Tensor, ct.DType]:
    dtype = _common_dtype(a, b)
    return as_tile(a, dtype).data, as_tile(b, dtype).data, dtype


def _binary(fn: Callable, a, b, op: str) -> Tile:
    x, y, dtype = _operands(a, b)
    if dtype == ct.bool_:
        raise EmulationError(f"arithmetic '{op}' on bool tiles")
    return Tile(fn(x, y), dtype)


def _bitwise(fn: Callable, a, b, op: str) -> Tile:
    x, y, dtype = _operands(a, b)
    if _is_float(dtype):
        raise EmulationError(f"bitwise '{op}' on {dtype.name} tiles")
    return Tile(fn(x, y), dtype)


def _compare(fn: Callable, a, b) -> Tile:
    x, y, _ = _operands(a, b)
    return Tile(fn(x, y), ct.bool_)


# ---------------------------------------------------------------------------------------------
# Arrays and the grid


class Array:
    """A kernel's view of a tensor argument: cuTile's Array (shape as int32 scalars, dtype)."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: torch.Tensor):
        self.data = data
        self.dtype = tile_dtype(data.dtype)

    @property
    def shape(self) -> tuple[Tile, ...]:
        return tuple(as_tile(s, ct.int32) for s in self.data.shape)

    @property
    def strides(self) -> tuple[Tile, ...]:
        return tuple(as_tile(s, ct.int32) for s in self.data.stride())

    @property
    def ndim(self) -> int:
        return self.data.dim()

    def slice(self, axis, start, stop) -> "Array":
        """A view of elements start .. stop - 1 along `axis` (a constant; negative counts from the
        end), bounds that may be runtime scalars: loads past `stop` pad as past the array's end.
        Bounds outside 0 <= start < N, start <= stop <= N are undefined in cuTile: an error here."""
        if not isinstance(axis, int) or not -self.ndim <= axis < self.ndim:
            raise EmulationError(f"Array.slice: axis must be a constant in [-{self.ndim}, {self.ndim}), got {axis!r}")
        extent, start, stop = self.data.shape[axis], int(start), int(stop)
        if not (0 <= start < extent and start <= stop <= extent):
            raise EmulationError(f"Array.slice: start {start}, stop {stop} outside 0 <= start < {extent}, "
                                 f"start <= stop <= {extent} (undefined in cuTile)")
        return Array(self.data.narrow(axis, start, stop - start))

    def __getattr__(self, name):
        raise EmulationError(f"Array.{name} is not emulated")


class _Grid:
    """The block being emulated; `bid` and `num_blocks` read it."""

    block: tuple[int, int, int] | None = None
    size: tuple[int, int, int] = (1, 1, 1)


def bid(axis) -> Tile:
    if _Grid.block is None:
        raise EmulationError("ct.bid() called outside an emulated launch")
    return as_tile(_Grid.block[_axis(axis)], ct.int32)


def num_blocks(axis) -> Tile:
    if _Grid.block is None:
        raise EmulationError("ct.num_blocks() called outside an emulated launch")
    return as_tile(_Grid.size[_axis(axis)], ct.int32)


def _axis(axis) -> int:
    if axis not in (0, 1, 2):
        raise EmulationError(f"block axis must be 0, 1 or 2, got {axis!r}")
    return axis


def cdiv(x, y):
    if isinstance(x, Tile) or isinstance(y, Tile):
        return floordiv(x + y - 1, y)
    return -(-x // y)


def num_tiles(array: Array, axis, shape, order="C") -> Tile:
    shape = _check_shape(shape, "num_tiles")
    view_shape = _permuted(array.data, order, "num_tiles").shape
    return as_tile(cdiv(view_shape[axis], shape[axis]), ct.int32)


def assume_divisible_by(x, divisor):
    return x


# ---------------------------------------------------------------------------------------------
# Memory


def _order_axes(order, ndim: int, op: str) -> tuple[int, ...]:
    if order == "C":
        return tuple(range(ndim))
    if order == "F":
        return tuple(reversed(range(ndim)))
    axes = tuple(order)
    if sorted(axes) != list(range(ndim)):
        raise EmulationError(f"{op}: order {order!r} is not a permutation of {ndim} axes")
    return axes


def _permuted(data: torch.Tensor, order, op: str) -> torch.Tensor:
    """The array with its axes permuted by `order`, before the tile space is laid over it."""
    return data.permute(_order_axes(order, data.dim(), op))


def _tile_window(view: torch.Tensor, index, shape: tuple[int, ...], op: str):
    """The in-bounds slices of the tile at `index`, and where they sit inside the tile."""
    index = (index,) if not isinstance(index, (tuple, list)) else tuple(index)
    if len(index) != view.dim() or len(shape) != view.dim():
        raise EmulationError(f"{op}: index {tuple(int(i) for i in index)} and tile shape {shape} must both have "
                             f"the array's rank {view.dim()}")
    source, target = [], []
    for i, size, extent in zip(index, shape, view.shape):
        start = int(i) * size
        stop = builtins.min(start + size, extent)
        if start < 0 or start >= extent:
            raise EmulationError(f"{op}: tile {tuple(int(j) for j in index)} of shape {shape} lies entirely "
                                 f"outside the array of shape {tuple(view.shape)} (undefined in cuTile)")
        source.append(slice(start, stop))
        target.append(slice(0, stop - start))
    return tuple(source), tuple(target)


def _check_latency(latency, op: str) -> None:
    if latency is not None and not 1 <= int(latency) <= 10:
        raise EmulationError(f"{op}: latency must be an integer in [1, 10], got {latency!r}")


def load(array: Array, index, shape, *, order="C", padding_mode=ct.PaddingMode.UNDETERMINED, check_bounds=True,
         latency=None, allow_tma=None, memory_order=ct.MemoryOrder.WEAK, memory_scope=ct.MemoryScope.NONE) -> Tile:
    _check_latency(latency, "load")
    if memory_order != ct.MemoryOrder.WEAK:
        raise EmulationError(f"load with memory_order={memory_order}: only WEAK is emulated")
    shape = () if shape == () else _check_shape(shape, "load")
    scalar = shape == ()
    view = _permuted(array.data, order, "load")
    tile_shape = (1,) * view.dim() if scalar else shape
    source, target = _tile_window(view, index, tile_shape, "load")
    if padding_mode == ct.PaddingMode.UNDETERMINED:
        fill = math.nan if _is_float(array.dtype) else (True if array.dtype == ct.bool_
                                                        else torch.iinfo(view.dtype).max)
    elif padding_mode in _PADDING:
        fill = _PADDING[padding_mode]
        if not _is_float(array.dtype) and not (fill == 0):
            raise EmulationError(f"load: padding {padding_mode} on a {array.dtype.name} array")
    else:
        raise EmulationError(f"load: padding_mode {padding_mode!r} is not emulated")
    out = torch.full(tile_shape, fill, dtype=view.dtype)
    out[target] = view[source]
    return Tile(out.reshape(()) if scalar else out, array.dtype)


def _store_dtype(tile: Tile, array: Array) -> Tile:
    if tile.dtype != array.dtype and promote_dtypes(tile.dtype, array.dtype) != array.dtype:
        raise EmulationError(f"store: a {tile.dtype.name} tile into a {array.dtype.name} array would narrow it; "
                             "cuTile refuses implicit narrowing (use astype)")
    return as_tile(tile, array.dtype)


def store(array: Array, index, tile, *, order="C", check_bounds=True, latency=None, allow_tma=None,
          memory_order=ct.MemoryOrder.WEAK, memory_scope=ct.MemoryScope.NONE) -> None:
    _check_latency(latency, "store")
    if memory_order != ct.MemoryOrder.WEAK:
        raise EmulationError(f"store with memory_order={memory_order}: only WEAK is emulated")
    tile = _store_dtype(as_tile(tile) if not isinstance(tile, Tile) else tile, array)
    view = _permuted(array.data, order, "store")
    data = tile.data
    if data.dim() == 0:
        data = data.reshape((1,) * view.dim())
    _check_shape(data.shape, "store")
    source, target = _tile_window(view, index, tuple(data.shape), "store")
    view[source] = data[target]


def _gather_indices(array: Array, indices, mask, op: str):
    indices = indices if isinstance(indices, tuple) else (indices,)
    if len(indices) != array.ndim:
        raise EmulationError(f"{op}: {len(indices)} index tiles for an array of rank {array.ndim}")
    tiles = [as_tile(i).data.long() for i in indices]
    tiles = list(torch.broadcast_tensors(*tiles))
    valid = torch.ones(tiles[0].shape, dtype=torch.bool)
    for t, extent in zip(tiles, array.data.shape):
        valid &= (t >= 0) & (t < extent)
    if mask is not None:
        valid &= as_tile(mask).data.expand(valid.shape)
    safe = [torch.where(valid, t, 0) for t in tiles]
    return safe, valid


def gather(array: Array, indices, *, mask=None, padding_value=0, check_bounds=True, latency=None) -> Tile:
    _check_latency(latency, "gather")
    safe, valid = _gather_indices(array, indices, mask, "gather")
    values = array.data[tuple(safe)]
    padding = as_tile(padding_value, array.dtype).data
    return Tile(torch.where(valid, values, padding), array.dtype)


def scatter(array: Array, indices, value, *, mask=None, check_bounds=True, latency=None) -> None:
    _check_latency(latency, "scatter")
    safe, valid = _gather_indices(array, indices, mask, "scatter")
    value = _store_dtype(as_tile(value) if not isinstance(value, Tile) else value, array)
    values = value.data.expand(valid.shape)
    array.data[tuple(t[valid] for t in safe)] = values[valid]


# ---------------------------------------------------------------------------------------------
# Factories, shapes, dtypes


def full(shape, fill_value, dtype) -> Tile:
    dtype = tile_dtype(dtype)
    cast = float if _is_float(dtype) else bool if dtype == ct.bool_ else int
    return Tile(torch.full(_check_shape(shape, "full"), cast(fill_value), dtype=_TORCH_DTYPES[dtype]), dtype)


def zeros(shape, dtype) -> Tile:
    return full(shape, 0, dtype)


def ones(shape, dtype) -> Tile:
    return full(shape, 1, dtype)


def arange(size, *, dtype, start=0, step=1) -> Tile:
    dtype = tile_dtype(dtype)
    (size,) = _check_shape(size, "arange")
    values = torch.arange(size, dtype=torch.int64) * int(step) + int(start)
    return Tile(values, dtype)


def astype(x, dtype, *, rounding_mode=None) -> Tile:
    _check_rounding(rounding_mode, "astype")
    dtype = tile_dtype(dtype)
    return Tile(as_tile(x).data.to(_TORCH_DTYPES[dtype]), dtype)


def reshape(x: Tile, shape) -> Tile:
    data = x.data.reshape(tuple(shape) if not isinstance(shape, int) else (shape,))
    _check_shape(data.shape, "reshape")
    return Tile(data, x.dtype)


def permute(x: Tile, axes) -> Tile:
    return Tile(x.data.permute(tuple(axes)), x.dtype)


def transpose(x: Tile, axis0=None, axis1=None) -> Tile:
    if axis0 is None and axis1 is None:
        if x.ndim != 2:
            raise EmulationError(f"transpose() of a {x.ndim}-d tile needs axis0 and axis1")
        axis0, axis1 = 0, 1
    return Tile(x.data.transpose(axis0, axis1), x.dtype)


def expand_dims(x: Tile, axis) -> Tile:
    return Tile(x.data.unsqueeze(axis), x.dtype)


def broadcast_to(x, shape) -> Tile:
    x = as_tile(x)
    return Tile(x.data.broadcast_to(_check_shape(shape, "broadcast_to")), x.dtype)


def cat(tiles, axis) -> Tile:
    a, b = tiles
    if a.shape != b.shape or a.dtype != b.dtype:
        raise EmulationError(f"cat needs two tiles of one shape and dtype, got {a.shape} {a.dtype.name} and "
                             f"{b.shape} {b.dtype.name}")
    return Tile(torch.cat((a.data, b.data), dim=axis), a.dtype)


def where(cond, x, y) -> Tile:
    cond = as_tile(cond)
    if cond.dtype != ct.bool_:
        raise EmulationError(f"where: the condition must be bool, got {cond.dtype.name}")
    a, b, dtype = _operands(x, y)
    return Tile(torch.where(cond.data, a, b), dtype)


# ---------------------------------------------------------------------------------------------
# Matrix products


def _check_matrix_shapes(x: Tile, y: Tile, op: str) -> None:
    if x.ndim not in (2, 3) or y.ndim not in (2, 3) or x.shape[-1] != y.shape[-2]:
        raise EmulationError(f"{op}: shapes {x.shape} and {y.shape} do not multiply (2-d or 3-d, inner dims equal)")


def mma(x: Tile, y: Tile, acc: Tile, *, use_fast_acc: bool = False) -> Tile:
    """(x @ y) + acc in the accumulator's dtype; x and y are not promoted (cuTile's rule)."""
    _check_matrix_shapes(x, y, "mma")
    if x.dtype != y.dtype:
        raise EmulationError(f"mma: operands of different dtypes {x.dtype.name} and {y.dtype.name} "
                             "(cuTile does not promote them)")
    allowed = MMA_ACCUMULATORS.get(x.dtype, ())
    if acc.dtype not in allowed:
        raise EmulationError(f"mma: {x.dtype.name} inputs need a {'/'.join(d.name for d in allowed) or '(none)'} "
                             f"accumulator, got {acc.dtype.name}")
    torch_acc = _TORCH_DTYPES[acc.dtype]
    product = torch.matmul(x.data.to(torch_acc), y.data.to(torch_acc))
    if tuple(product.shape) != tuple(torch.broadcast_shapes(product.shape, acc.shape)):
        raise EmulationError(f"mma: accumulator shape {acc.shape} does not match the product {tuple(product.shape)}")
    return Tile(product + acc.data, acc.dtype)


def matmul(x: Tile, y: Tile) -> Tile:
    """x @ y in the promoted input dtype (accumulated in fp32 for 16-bit floats)."""
    x, y = as_tile(x), as_tile(y)
    dtype = promote_dtypes(x.dtype, y.dtype)
    if not _is_float(dtype):
        raise EmulationError(f"matmul of {dtype.name} tiles is not emulated")
    wide = torch.float64 if dtype == ct.float64 else torch.float32
    return Tile(torch.matmul(x.data.to(wide), y.data.to(wide)), dtype)


# ---------------------------------------------------------------------------------------------
# Elementwise math


def _float_unary(fn: Callable, name: str):
    def op(x, *, rounding_mode=None, flush_to_zero: bool = False) -> Tile:
        _check_rounding(rounding_mode, name)
        x = as_tile(x, None if isinstance(x, Tile) else ct.float32)
        if not _is_float(x.dtype):
            raise EmulationError(f"{name} of a {x.dtype.name} tile (cuTile takes floats)")
        return Tile(fn(x.data), x.dtype)
    op.__name__ = name
    return op


exp = _float_unary(torch.exp, "exp")
exp2 = _float_unary(torch.exp2, "exp2")
log = _float_unary(torch.log, "log")
log2 = _float_unary(torch.log2, "log2")
sqrt = _float_unary(torch.sqrt, "sqrt")
rsqrt = _float_unary(torch.rsqrt, "rsqrt")
tanh = _float_unary(torch.tanh, "tanh")
sin = _float_unary(torch.sin, "sin")
cos = _float_unary(torch.cos, "cos")
floor = _float_unary(torch.floor, "floor")
ceil = _float_unary(torch.ceil, "ceil")


def abs(x) -> Tile:
    x = as_tile(x)
    return Tile(torch.abs(x.data), x.dtype)


def negative(x) -> Tile:
    return -as_tile(x)


def isnan(x) -> Tile:
    return Tile(torch.isnan(as_tile(x).data), ct.bool_)


def _rounded_binary(fn: Callable, symbol: str):
    def op(x, y, *, rounding_mode=None, flush_to_zero: bool = False) -> Tile:
        _check_rounding(rounding_mode, symbol)
        return _binary(fn, x, y, symbol)
    return op


add = _rounded_binary(torch.add, "+")
sub = _rounded_binary(torch.sub, "-")
mul = _rounded_binary(torch.mul, "*")


def truediv(x, y, *, rounding_mode=None, flush_to_zero: bool = False) -> Tile:
    """x / y; integer operands divide as float32 (cuTile's rule, checked with its compiler)."""
    _check_rounding(rounding_mode, "/")
    dtype = _common_dtype(x, y)
    if not _is_float(dtype):
        dtype = ct.float32
    return Tile(torch.div(as_tile(x, dtype).data, as_tile(y, dtype).data), dtype)


def floordiv(x, y) -> Tile:
    a, b, dtype = _operands(x, y)
    return Tile(torch.div(a, b, rounding_mode="floor"), dtype)


def mod(x, y) -> Tile:
    a, b, dtype = _operands(x, y)
    return Tile(torch.remainder(a, b), dtype)


def maximum(x, y, *, flush_to_zero: bool = False, propagate_nan: bool = False) -> Tile:
    a, b, dtype = _operands(x, y)
    return Tile((torch.maximum if propagate_nan or not _is_float(dtype) else torch.fmax)(a, b), dtype)


def minimum(x, y, *, flush_to_zero: bool = False, propagate_nan: bool = False) -> Tile:
    a, b, dtype = _operands(x, y)
    return Tile((torch.minimum if propagate_nan or not _is_float(dtype) else torch.fmin)(a, b), dtype)


def pow(x, y) -> Tile:
    return _binary(torch.pow, x, y, "**")


for _name, _fn in (("greater", torch.gt), ("greater_equal", torch.ge), ("less", torch.lt),
                   ("less_equal", torch.le), ("equal", torch.eq), ("not_equal", torch.ne)):
    globals()[_name] = functools.partial(_compare, _fn)


def bitwise_and(x, y): return _bitwise(torch.bitwise_and, x, y, "&")
def bitwise_or(x, y): return _bitwise(torch.bitwise_or, x, y, "|")
def bitwise_xor(x, y): return _bitwise(torch.bitwise_xor, x, y, "^")
def bitwise_not(x): return ~as_tile(x)


# ---------------------------------------------------------------------------------------------
# Reductions


def _reduce(fn: Callable, x: Tile, axis, keepdims: bool, name: str) -> Tile:
    if x.dtype == ct.bool_:
        raise EmulationError(f"{name} of a bool tile is not emulated (its result dtype is not documented)")
    dims = tuple(range(x.ndim)) if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    dims = tuple(d % x.ndim for d in dims)
    return Tile(fn(x.data, dims, keepdims).to(x.data.dtype), x.dtype)


def sum(x, axis=None, *, keepdims=False, rounding_mode=None, flush_to_zero=False) -> Tile:
    _check_rounding(rounding_mode, "sum")
    return _reduce(lambda d, dims, k: torch.sum(d, dim=dims, keepdim=k), as_tile(x), axis, keepdims, "sum")


def _nan_ignoring(extreme: Callable, fill: float):
    def reduce(data, dims, keepdim):
        if data.is_floating_point():
            data = torch.where(torch.isnan(data), fill, data)
        return extreme(data, dim=dims, keepdim=keepdim)
    return reduce


def max(x, axis=None, *, keepdims=False, flush_to_zero=False, propagate_nan=False) -> Tile:
    fn = (lambda d, dims, k: torch.amax(d, dim=dims, keepdim=k)) if propagate_nan else \
        _nan_ignoring(torch.amax, -math.inf)
    return _reduce(fn, as_tile(x), axis, keepdims, "max")


def min(x, axis=None, *, keepdims=False, flush_to_zero=False, propagate_nan=False) -> Tile:
    fn = (lambda d, dims, k: torch.amin(d, dim=dims, keepdim=k)) if propagate_nan else \
        _nan_ignoring(torch.amin, math.inf)
    return _reduce(fn, as_tile(x), axis, keepdims, "min")


# ---------------------------------------------------------------------------------------------
# The emulation namespace and launch

_IMPLEMENTED = (
    "bid", "num_blocks", "num_tiles", "cdiv", "assume_divisible_by", "load", "store", "gather", "scatter",
    "full", "zeros", "ones", "arange", "astype", "reshape", "permute", "transpose", "expand_dims",
    "broadcast_to", "cat", "where", "mma", "matmul", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh",
    "sin", "cos", "floor", "ceil", "abs", "negative", "isnan", "add", "sub", "mul", "truediv", "floordiv",
    "mod", "pow", "maximum", "minimum", "greater", "greater_equal", "less", "less_equal", "equal",
    "not_equal", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "sum", "max", "min",
)
# Names that mean the same on the host: dtypes, enums, annotations.
_PASSTHROUGH = ("DType", "PaddingMode", "RoundingMode", "MemoryOrder", "MemoryScope", "Constant",
                "ConstantAnnotation", "ByTarget", "Tile", "Array", "Scalar", "ScalarInt64", "IndexedWithInt64")


class _Namespace(types.ModuleType):
    """Stands for `cuda.tile` inside an emulated kernel; unknown names are refused by name."""

    def __getattr__(self, name: str):
        value = getattr(ct, name, None)
        if isinstance(value, ct.DType) or name in _PASSTHROUGH:
            return value
        raise EmulationError(f"cuda.tile.{name} is not implemented by the emulator (looplm_tile.emulator); "
                             f"implemented: {', '.join(_IMPLEMENTED)}")


EMULATED_TILE = _Namespace("cuda.tile (emulated)")
for _name in _IMPLEMENTED:
    setattr(EMULATED_TILE, _name, globals()[_name])
setattr(EMULATED_TILE, "kernel", ct.kernel)
setattr(EMULATED_TILE, "function", ct.function)


def _builtin_extreme(builtin: Callable, tile_op: Callable):
    """`max`/`min` inside tile code: cuTile lets them combine tiles elementwise."""
    def extreme(*args, **kwargs):
        if len(args) == 2 and not kwargs and any(isinstance(a, Tile) for a in args):
            return tile_op(*args)
        return builtin(*args, **kwargs)
    return extreme


_BUILTIN_OVERRIDES = {"max": _builtin_extreme(builtins.max, maximum), "min": _builtin_extreme(builtins.min, minimum)}


def _stub_replacements() -> dict[int, Any]:
    """cuda.tile's public functions by identity -> their emulations (for `from cuda.tile import load`)."""
    return {id(getattr(ct, name)): getattr(EMULATED_TILE, name) for name in _IMPLEMENTED if hasattr(ct, name)}


def _rebind(fn: types.FunctionType, memo: dict) -> types.FunctionType:
    """`fn` with its globals' references to cuda.tile (and helpers of its module) replaced."""
    if id(fn) in memo:
        return memo[id(fn)]
    original = fn.__globals__
    patched = dict(original)
    clone = types.FunctionType(fn.__code__, patched, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    memo[id(fn)] = clone
    stubs = _stub_replacements()
    for name, value in original.items():
        if value is ct:
            patched[name] = EMULATED_TILE
        elif id(value) in stubs:
            patched[name] = stubs[id(value)]
        elif isinstance(value, types.FunctionType) and value.__globals__ is original:
            patched[name] = _rebind(value, memo)  # a helper of the same module calls cuda.tile too
    patched.update(_BUILTIN_OVERRIDES)
    return clone


@functools.lru_cache(maxsize=None)
def emulated(kernel: ct.kernel) -> tuple[types.FunctionType, tuple[bool, ...], tuple[Any, ...]]:
    """The kernel's Python function bound to the emulation namespace, which of its parameters are
    constants, and the dtype of each scalar parameter."""
    pyfunc = kernel._pyfunc
    hints = typing.get_type_hints(pyfunc, include_extras=True)
    constant, scalar_dtype = [], []
    for name in inspect.signature(pyfunc).parameters:
        metadata = getattr(hints.get(name), "__metadata__", ())
        constant.append(any(isinstance(m, ct.ConstantAnnotation) for m in metadata))
        wide = any(getattr(m, "dtype", None) == ct.int64 for m in metadata)
        scalar_dtype.append(ct.int64 if wide else None)
    return _rebind(pyfunc, {}), tuple(constant), tuple(scalar_dtype)


def _kernel_argument(value, constant: bool, wide_int):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise EmulationError(f"the emulator runs on CPU tensors, got one on {value.device}")
        return Array(value)
    if constant or isinstance(value, (ct.DType, str)):
        return value
    if isinstance(value, (bool, int, float)):
        return as_tile(value, wide_int if isinstance(value, int) and not isinstance(value, bool) else None)
    raise EmulationError(f"kernel argument of type {type(value).__name__} is not emulated")


def launch(grid: Sequence[int], kernel: ct.kernel, args: Sequence[Any]) -> None:
    """Run `kernel` over `grid` (1 to 3 block counts) on CPU tensors, one block after another, as
    `ct.launch(stream, grid, kernel, args)` would on a GPU. Blocks run in row-major order of
    (z, y, x); cuTile promises no order, so kernels must not depend on it."""
    fn, constant, scalar_dtype = emulated(kernel)
    if len(args) != len(constant):
        raise TypeError(f"kernel {kernel._pyfunc.__name__} takes {len(constant)} arguments, got {len(args)}")
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    if len(grid) != 3 or builtins.min(grid) < 1:
        raise ValueError(f"grid must be 1 to 3 positive block counts, got {grid}")
    kernel_args = [_kernel_argument(a, c, d) for a, c, d in zip(args, constant, scalar_dtype)]
    previous = (_Grid.block, _Grid.size)
    _Grid.size = grid
    try:
        for z, y, x in itertools.product(range(grid[2]), range(grid[1]), range(grid[0])):
            _Grid.block = (x, y, z)
            fn(*kernel_args)
    finally:
        _Grid.block, _Grid.size = previous

