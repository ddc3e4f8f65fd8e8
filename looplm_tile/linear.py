"""y = act(x @ W^T + b) + residual: a tiled matmul with the epilogue fused.

Algorithm: y is cut into BLOCK_M x BLOCK_N tiles. The launch is persistent (Triton tutorial 09,
TileGym's static persistent matmul): `occupancy` blocks per SM, each walking the tiles
`num_blocks` apart, so the next tile's loads overlap this tile's epilogue and no tail of
short-lived blocks is left. Tiles are taken in groups of GROUP_M row tiles (Triton tutorial 03):
tiles computed at the same time share a column of W tiles and a few rows of x while they are hot
in L2, instead of re-streaming x from memory for every pair of column tiles. Each tile walks K in
BLOCK_K steps, loading
an x tile and a W tile read transposed through the load's `order=(1, 0)` (W stays in nn.Linear's
(N, K) layout, no copy), and accumulates with `ct.mma` in fp32. The epilogue runs on the fp32
accumulator before the single store: bias, exact GELU, residual. Ragged edges are zero-padded on
load (zeros add nothing to the dot products) and dropped on store.

cuTile has no erf, so GELU's erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below fp32's
tolerance here), on |z| with the sign restored.

fp32 inputs multiply in full fp32 (not tf32), so they match the reference at fp32 tolerance.

Tuning knobs: BLOCK_M, BLOCK_N, BLOCK_K (tile shape: larger tiles reuse each load more but need
more registers and shared memory), GROUP_M (row tiles per group), occupancy (resident blocks per
SM), LATENCY (the DRAM latency hint, 1-10, of the streaming x and W loads).
"""
import math
from typing import Optional

import torch
from torch import Tensor

import cuda.tile as ct

import tuning
from looplm.ops import ACTIVATIONS, check_kernel_dtype
from looplm_tile import runtime
from looplm_tile.layer_norm import layer_norm
from tuning.spec import KernelTuning

ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
INV_SQRT2 = 1.0 / math.sqrt(2.0)


def gelu(x):
    """x * Phi(x) with erf from A&S 7.1.26; x is an fp32 tile."""
    z = ct.abs(x * INV_SQRT2)
    t = 1.0 / (1.0 + ERF_P * z)
    poly = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))))
    erf_abs = 1.0 - poly * ct.exp(-z * z)
    erf = ct.where(x < 0.0, -erf_abs, erf_abs)
    return 0.5 * x * (1.0 + erf)


def _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M):
    """(row tile, column tile) of the tile-th output tile in grouped order."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


def _output_tile(X, W, Bias, Residual, Y, m, n, k_steps, HAS_BIAS, GELU, HAS_RESIDUAL, BLOCK_M, BLOCK_N, BLOCK_K,
                 LATENCY):
    """Tile (m, n) of y: the K loop on the tensor cores, then the epilogue and the one store."""
    acc = ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32)
    for k in range(k_steps):
        x = ct.load(X, index=(m, k), shape=(BLOCK_M, BLOCK_K), padding_mode=ct.PaddingMode.ZERO, latency=LATENCY)
        w = ct.load(W, index=(k, n), shape=(BLOCK_K, BLOCK_N), order=(1, 0), padding_mode=ct.PaddingMode.ZERO,
                    latency=LATENCY)
        acc = ct.mma(x, w, acc)
    if HAS_BIAS:
        acc = acc + ct.load(Bias, index=(n,), shape=(BLOCK_N,), padding_mode=ct.PaddingMode.ZERO).astype(ct.float32)
    if GELU:
        acc = gelu(acc)
    if HAS_RESIDUAL:
        residual = ct.load(Residual, index=(m, n), shape=(BLOCK_M, BLOCK_N), padding_mode=ct.PaddingMode.ZERO)
        acc = acc + residual.astype(ct.float32)
    ct.store(Y, index=(m, n), tile=acc.astype(Y.dtype))


@ct.kernel
def linear_kernel(X, W, Bias, Residual, Y, HAS_BIAS: ct.Constant[bool], GELU: ct.Constant[bool],
                  HAS_RESIDUAL: ct.Constant[bool], PERSISTENT: ct.Constant[bool], BLOCK_M: ct.Constant[int],
                  BLOCK_N: ct.Constant[int], BLOCK_K: ct.Constant[int], GROUP_M: ct.Constant[int],
                  LATENCY: ct.Constant[int]):
    tiles_m = ct.cdiv(X.shape[0], BLOCK_M)
    tiles_n = ct.cdiv(W.shape[0], BLOCK_N)
    k_steps = ct.num_tiles(X, axis=1, shape=(BLOCK_M, BLOCK_K))
    if PERSISTENT:  # each block walks the output tiles num_blocks apart, in grouped order
        for tile in range(ct.bid(0), tiles_m * tiles_n, ct.num_blocks(0)):
            m, n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M)
            _output_tile(X, W, Bias, Residual, Y, m, n, k_steps, HAS_BIAS, GELU, HAS_RESIDUAL, BLOCK_M, BLOCK_N,
                         BLOCK_K, LATENCY)
    else:  # one tile per block
        m, n = _tile_coordinates(ct.bid(0), tiles_m, tiles_n, GROUP_M)
        _output_tile(X, W, Bias, Residual, Y, m, n, k_steps, HAS_BIAS, GELU, HAS_RESIDUAL, BLOCK_M, BLOCK_N, BLOCK_K,
                     LATENCY)


def _tiles(config: dict, m: int, n: int, k: int) -> tuple[int, int, int]:
    """The config's tile shape, shrunk to the problem where the problem is smaller."""
    p2 = runtime.next_power_of_2
    return min(config["BLOCK_M"], p2(m)), min(config["BLOCK_N"], p2(n)), min(config["BLOCK_K"], p2(k))


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], y: Tensor, gelu: bool,
            config: dict) -> Tensor:
    (m, k), n = x.shape, weight.shape[0]
    block_m, block_n, block_k = _tiles(config, m, n, k)
    persistent = rows_aligned(x, weight, y, residual)
    args = (x, weight, weight if bias is None else bias, y if residual is None else residual, y, bias is not None,
            gelu, residual is not None, persistent, block_m, block_n, block_k, config["GROUP_M"], config["LATENCY"])
    tiles = runtime.cdiv(m, block_m) * runtime.cdiv(n, block_n)
    blocks = (runtime.persistent_programs(x.device, tiles, config.get("occupancy") or 1, EMULATED_BLOCKS)
              if persistent else tiles)
    runtime.launch((blocks,), linear_kernel, args, config)
    return y


def rows_aligned(*tensors: Optional[Tensor]) -> bool:
    """Whether every row of these 2-D tensors (None: absent) starts 16 bytes after the last, so
    cuTile moves whole tiles with the copy engine. Those launches are persistent; the others
    (e.g. 65 logits a row) address element by element, and their loop of tiles spills (208 bytes
    on sm_90 at 128 x 128), so they run one tile per block."""
    return all(t is None or (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


EMULATED_BLOCKS = 3  # without a GPU: a few blocks, each walking several tiles (the persistent loop is tested)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none",
           residual: Optional[Tensor] = None) -> Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_kernel_dtype("linear", "x", x)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features but weight is {tuple(weight.shape)} (out, in)")
    out_shape = (*x.shape[:-1], n)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"linear: residual must have shape {out_shape}, got {tuple(residual.shape)}")
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.numel() and n:
        config = tuning.lookup_config("tile", "linear", x.dtype, (rows.shape[0], n, k),
                                      runtime.default_config(TUNING, rows))
        _launch(rows, weight.to(x.dtype).contiguous(), None if bias is None else bias.contiguous(),
                None if residual is None else residual.reshape(-1, n).contiguous(), y, activation == "gelu", config)
    return y.view(out_shape)


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                      bias: Optional[Tensor] = None, activation: str = "none", eps: float = 1e-5) -> Tensor:
    """act(layer_norm(x) @ weight.T + bias) as two launches: the row statistics are computed once per
    row by the layer-norm kernel, not once per output tile."""
    return linear(layer_norm(x, norm_weight, norm_bias, eps), weight, bias, activation)


# ---- tuning: shape key (M, N, K); the tuned variant has a bias and no activation or residual

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    m, n, k = shape
    x = torch.randn(m, k, dtype=dtype, device=device)
    weight = torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5
    bias = torch.randn(n, dtype=dtype, device=device)
    return x, weight, bias, None, torch.empty(m, n, dtype=dtype, device=device), False


def compile_variant(shape: tuple, dtype: torch.dtype, config: dict, arch: str, *, activation: str = "none",
                    residual: bool = False, bias: bool = True) -> dict:
    """Compile, for `arch`, the launch of one variant at shape (M, N, K) as its launcher makes it
    (the flags of the Triton kernel's `compile_variant`, less its fused norm)."""
    m, n, k = shape
    x, weight, bias_tensor, _, y, _ = _make_args(shape, dtype, "meta")
    res = torch.empty(m, n, dtype=dtype, device="meta") if residual else None
    return runtime.compile_run(_launch, arch, x, weight, bias_tensor if bias else None, res, y, activation == "gelu",
                               config)


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return compile_variant(shape, dtype, config, arch)


def _expected(x, weight, bias, residual, y, gelu) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["linear"](x, weight, bias, "gelu" if gelu else "none", residual)


# Large MMA tiles in groups of 8 row tiles: 128x128 on Hopper and Blackwell datacenter parts (TileGym's
# >= 128x128 on sm_90), 128x64 where cuTile's code for 128x128 spills (sm_80's 4 warps, sm_120's GELU
# epilogue). The space keeps small tiles for small shapes (the last-position lm_head, the CPU model).
HOPPER: dict = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "occupancy": 1, "LATENCY": 3}
TUNING = KernelTuning(
    backend="tile", kernel="linear",
    default={"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "occupancy": 1, "LATENCY": 3},
    arch_defaults={"sm_90": HOPPER, "sm_100": HOPPER},
    space=[{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "occupancy": occ, "LATENCY": 3}
           for bm in (32, 64, 128, 256) for bn in (32, 64, 128, 256) for bk in (32, 64) for occ in (1, 2, 4)
           if bm * bn <= 128 * 256],
    make_args=_make_args,
    run=lambda x, w, b, r, y, gelu, config: _launch(x, w, b, r, y, gelu, config),
    compile=_compile,
    shape_key=lambda x, weight, bias=None, activation="none", residual=None: (
        x.numel() // x.shape[-1], weight.shape[0], weight.shape[1]),
    expected=_expected,
)
