"""Causal flash attention, forward: softmax(q k^T * scale) v without materialising the scores.

Algorithm: each block owns BLOCK_M query rows of one head. It streams BLOCK_N keys at a time:
scores = q @ k^T on the tensor cores (k read transposed through the load's `order`), an online
softmax in base 2 (running row max m_i and row sum l_i in fp32; the scale is applied to the row
max and fused into the exponent; the accumulator is rescaled by 2^(m_old - m_new) whenever the max
grows), and acc += p @ v. Causal masking is aligned bottom-right as `looplm.ops.attention`
documents: query i sits at key position Tk - Tq + i. Key tiles wholly in the past of every query
of the block run unmasked; only the diagonal band (and a ragged last tile) pays for the compare
and select; tiles wholly in the future are never visited. A row that has seen no key keeps
m_i = -inf; the shift is then 0, so its weights are exact zeros (never -inf - -inf = NaN), and its
output divides by 1 instead of l_i = 0: zeros, not NaN. exp2 flushes denormals to zero and the
final divide is approximate: one instruction each.

Blocks run on one grid axis, (query block, batch x head) flattened (CUDA caps grid axes 1 and 2
at 65535, which B x H may exceed), in the causal order of `looplm.kernels` (`attention_program`):
heads in sections whose keys and values fit in L2 (`attention_section`), and within a section
longest first: every head's latest query block (the heaviest under causal masking), then every
head's next one. Head by head (each head's blocks heaviest first) leaves the last wave ragged where
B x H is small: 1.26x the ideal makespan for 64 heads at T = 1024 with 128 x 128 tiles on 132 SMs,
against 1.03x in sections, which keep at most 32 MiB of K and V live where longest first across
all heads would keep all of it (`python -m bench.roofline --causal-order` simulates them).

key_len (optional, (B,) int32 on the device) serves a static decode cache: K and V hold Tk places
of which batch row b has filled its first key_len[b]. Each block gathers its row's length and slices
K and V to it (`Array.slice`, bounds read on the device), so every count, mask and the causal offset
(key_len[b] - Tq) follow from the sliced shape as they follow from Tk without one, and a load that
crosses the row's end pads with zeros as one past the cache's end does: the places past a row's keys
(which may hold anything, NaN included) never reach its softmax. The length never reaches the host,
so a compiled or captured decode step replays one launch as it grows. HAS_KEY_LEN is a compile-time
flag: without key_len nothing is gathered or sliced.

q, k, v may be strided views (the tied block passes head views of its fused qkv projection, no
copies); only the head dim must be contiguous. The head size is a compile-time constant, padded
to the next power of two with zeros, which change neither q k^T nor the stored columns.

Tuning knobs: BLOCK_M (query rows per block), BLOCK_N (keys per step), occupancy, KV_LATENCY
(DRAM latency hint of the streamed k and v loads); without a tuning table, long sequences take
larger tiles on the architectures listed in LONG (`default_config`).
"""
import math
from typing import Optional

import torch
from torch import Tensor

import cuda.tile as ct

import tuning
from looplm.kernels import attention_section, head_kv_bytes
from looplm.ops import check_kernel_dtype, check_key_len
from looplm_tile import runtime
from tuning.spec import KernelTuning

LOG2_E = 1.0 / math.log(2.0)


def _key_tile(q, K, V, batch, head, j, row_pos, key_in_tile, n_keys, scale_log2, m_i, l_i, acc, masked, causal,
              BLOCK_D, BLOCK_M, BLOCK_N, KV_LATENCY):
    """One step of the online softmax over key tile j; masked: compare and select per score."""
    k_t = ct.load(K, index=(batch, head, 0, j), shape=(1, 1, BLOCK_D, BLOCK_N), order=(0, 1, 3, 2),
                  padding_mode=ct.PaddingMode.ZERO, latency=KV_LATENCY).reshape((BLOCK_D, BLOCK_N))
    scores = ct.mma(q, k_t, ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32))
    if masked:
        key_pos = j * BLOCK_N + key_in_tile
        visible = key_pos < n_keys
        if causal:
            visible = visible & (key_pos <= row_pos)
        scores = ct.where(visible, scores, -math.inf)
        m_new = ct.maximum(m_i, ct.max(scores, axis=1, keepdims=True) * scale_log2)
        shift = ct.where(m_new == -math.inf, 0.0, m_new)  # rows with no visible key yet
    else:
        m_new = ct.maximum(m_i, ct.max(scores, axis=1, keepdims=True) * scale_log2)
        shift = m_new
    p = ct.exp2(scores * scale_log2 - shift, flush_to_zero=True)
    alpha = ct.exp2(m_i - shift, flush_to_zero=True)
    l_i = l_i * alpha + ct.sum(p, axis=1, keepdims=True)
    v = ct.load(V, index=(batch, head, j, 0), shape=(1, 1, BLOCK_N, BLOCK_D), padding_mode=ct.PaddingMode.ZERO,
                latency=KV_LATENCY).reshape((BLOCK_N, BLOCK_D))
    acc = ct.mma(p.astype(V.dtype), v, acc * alpha)
    return m_new, l_i, acc


@ct.kernel
def attention_kernel(Q, K, V, Out, KeyLen, qk_scale, batch_heads, section, N_HEAD: ct.Constant[int],
                     CAUSAL: ct.Constant[bool], HAS_KEY_LEN: ct.Constant[bool], BLOCK_D: ct.Constant[int],
                     BLOCK_M: ct.Constant[int], BLOCK_N: ct.Constant[int], KV_LATENCY: ct.Constant[int]):
    # One grid axis, in looplm.kernels' causal order (attention_program): heads in sections of
    # `section`, each section's latest query blocks first across its heads.
    m_blocks = ct.cdiv(Q.shape[2], BLOCK_M)
    block = ct.bid(0)
    per_section = section * m_blocks
    first_head = block // per_section * section
    in_section = block % per_section
    heads_here = min(section, batch_heads - first_head)
    m_block = m_blocks - 1 - in_section // heads_here
    batch = (first_head + in_section % heads_here) // N_HEAD
    head = (first_head + in_section % heads_here) % N_HEAD
    if HAS_KEY_LEN:  # this batch row's keys: the cache's first key_len[batch] places, read on the device
        held = ct.gather(KeyLen, batch)
        K = K.slice(axis=2, start=0, stop=held)  # loads past it now pad with zeros, as past the cache's end
        V = V.slice(axis=2, start=0, stop=held)
    n_keys = K.shape[2]
    scale_log2 = qk_scale * LOG2_E

    q = ct.load(Q, index=(batch, head, m_block, 0), shape=(1, 1, BLOCK_M, BLOCK_D),
                padding_mode=ct.PaddingMode.ZERO).reshape((BLOCK_M, BLOCK_D))
    # Query i may see key j when j <= n_keys - Tq + i (bottom-right alignment).
    first_row_pos = n_keys - Q.shape[2] + m_block * BLOCK_M
    row_pos = first_row_pos + ct.arange(BLOCK_M, dtype=ct.int32)[:, None]
    key_in_tile = ct.arange(BLOCK_N, dtype=ct.int32)[None, :]

    m_i = ct.full((BLOCK_M, 1), -math.inf, dtype=ct.float32)
    l_i = ct.zeros((BLOCK_M, 1), dtype=ct.float32)
    acc = ct.zeros((BLOCK_M, BLOCK_D), dtype=ct.float32)

    if CAUSAL:
        # keys 0 .. first_row_pos are visible to every row of the block
        unmasked_tiles = max(min(first_row_pos + 1, n_keys), 0) // BLOCK_N
        visited_tiles = ct.cdiv(min(max(first_row_pos + BLOCK_M, 0), n_keys), BLOCK_N)
    else:
        unmasked_tiles = n_keys // BLOCK_N
        visited_tiles = ct.cdiv(n_keys, BLOCK_N)
    for j in range(unmasked_tiles):
        m_i, l_i, acc = _key_tile(q, K, V, batch, head, j, row_pos, key_in_tile, n_keys, scale_log2, m_i, l_i, acc,
                                  False, CAUSAL, BLOCK_D, BLOCK_M, BLOCK_N, KV_LATENCY)
    for j in range(unmasked_tiles, visited_tiles):
        m_i, l_i, acc = _key_tile(q, K, V, batch, head, j, row_pos, key_in_tile, n_keys, scale_log2, m_i, l_i, acc,
                                  True, CAUSAL, BLOCK_D, BLOCK_M, BLOCK_N, KV_LATENCY)
    out = ct.truediv(acc, ct.where(l_i > 0.0, l_i, 1.0), rounding_mode=ct.RoundingMode.APPROX, flush_to_zero=True)
    ct.store(Out, index=(batch, head, m_block, 0), tile=out.reshape((1, 1, BLOCK_M, BLOCK_D)).astype(Out.dtype))


def _blocks(config: dict, t_q: int, t_k: int) -> tuple[int, int]:
    p2 = runtime.next_power_of_2
    return min(config["BLOCK_M"], p2(t_q)), min(config["BLOCK_N"], p2(t_k))


def attention_grid(batch: int, n_head: int, t_q: int, block_m: int) -> tuple[int]:
    """Blocks of one launch, all on grid axis 0 (up to 2^31 - 1): B x H may exceed the 65535 of
    axes 1 and 2."""
    return (runtime.cdiv(t_q, block_m) * batch * n_head,)


def _launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, causal: bool, scale: float, config: dict,
            key_len: Optional[Tensor] = None) -> Tensor:
    batch, n_head, t_q, head_dim = q.shape
    t_k = k.shape[2]
    block_m, block_n = _blocks(config, t_q, t_k)
    heads = batch * n_head
    section = attention_section(heads, head_kv_bytes(t_k, head_dim, k.element_size()))
    # Without key_len the kernel never reads its KeyLen array; q stands in for it.
    args = (q, k, v, out, q if key_len is None else key_len, float(scale), heads, section, n_head, bool(causal),
            key_len is not None, runtime.next_power_of_2(head_dim), block_m, block_n, config["KV_LATENCY"])
    runtime.launch(attention_grid(batch, n_head, t_q, block_m), attention_kernel, args, config)
    return out


def _head_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
              key_len: Optional[Tensor] = None) -> Tensor:
    check_kernel_dtype("attention", "q", q)
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: q (B, H, Tq, D) and k, v (B, H, Tk, D) must agree, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_key_len("attention", q, k, key_len)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return out
    if k.shape[2] == 0:
        return out.zero_()
    return attention_into(q, k, v, out, causal, scale, key_len)


SHORT_T = 512
# Long sequences (T > SHORT_T) on the architectures where a larger tile compiles for cuTile without
# spilling (bf16, checked ahead of time): (arch, largest head size) -> config. 128 x 128 is the
# flash-attention tile of Hopper and TileGym's first Blackwell candidate (occupancy 2 there); on
# sm_120 TileGym runs 64 x 64 at occupancy 2. Head size 128 on sm_90 keeps 64 x 64 (its 128-row
# tiles spill 120 to 400 bytes). Short sequences keep the default: B x H x T / 128 blocks would
# leave an H200 half idle at T = 256.
LONG: dict[tuple[str, int], dict] = {
    ("sm_90", 64): {"BLOCK_M": 128, "BLOCK_N": 128, "occupancy": 1, "KV_LATENCY": 2},
    ("sm_100", 128): {"BLOCK_M": 128, "BLOCK_N": 128, "occupancy": 2, "KV_LATENCY": 2},
    ("sm_120", 64): {"BLOCK_M": 64, "BLOCK_N": 64, "occupancy": 2, "KV_LATENCY": 2},
}


def default_config(t_q: int, head_dim: int, dtype: torch.dtype, arch: Optional[str]) -> dict:
    """The built-in config of a launch with t_q queries of head size head_dim on `arch` (None: no
    GPU): the architecture's LONG tiles for long sequences where it has them, else TUNING's."""
    if dtype != torch.float32 and t_q > SHORT_T:
        for (target, max_d), config in LONG.items():
            if target == arch and head_dim <= max_d:
                return config
    return TUNING.default_for(dtype, arch)


def attention_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, causal: bool, scale: float,
                   key_len: Optional[Tensor] = None) -> Tensor:
    """attention writing into `out` (B, H, Tq, D), which may be a strided view (e.g. of (B, T, C));
    `key_len` as `looplm.ops.attention` takes it."""
    batch, n_head, t_q, head_dim = q.shape
    config = tuning.lookup_config("tile", "attention", q.dtype, (batch, n_head, t_q, k.shape[2], head_dim),
                                  default_config(t_q, head_dim, q.dtype, runtime.arch_of(q)))
    q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
    _launch(q, k, v, out, causal, scale, config, key_len)
    return out


# ---- tuning: shape key (B, H, Tq, Tk, D)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    batch, n_head, t_q, t_k, head_dim = shape
    q = torch.randn(batch, n_head, t_q, head_dim, dtype=dtype, device=device)
    k, v = torch.randn(2, batch, n_head, t_k, head_dim, dtype=dtype, device=device)
    return q, k, v, torch.empty_like(q), True, head_dim ** -0.5


def compile_variant(shape: tuple, dtype: torch.dtype, config: dict, arch: str, key_len: bool = False) -> dict:
    """Resources of the launch at `shape` for `arch`, with a key_len per batch row (a decode step
    over a static cache) or without."""
    args = _make_args(shape, dtype, "meta")
    lengths = torch.empty(shape[0], dtype=torch.int32, device="meta") if key_len else None
    return runtime.compile_run(_launch, arch, *args, config, lengths)


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return compile_variant(shape, dtype, config, arch)


def _expected(q, k, v, out, causal, scale) -> Tensor:
    from looplm import get_backend
    return get_backend("reference").ops["attention"](q, k, v, causal, scale)


# 64 x 64 everywhere but sm_80, whose 4-warp code for it spills.
TUNING = KernelTuning(
    backend="tile", kernel="attention",
    default={"BLOCK_M": 64, "BLOCK_N": 64, "occupancy": 1, "KV_LATENCY": 2},
    arch_defaults={"sm_80": {"BLOCK_M": 64, "BLOCK_N": 32, "occupancy": 1, "KV_LATENCY": 2}},
    space=[{"BLOCK_M": bm, "BLOCK_N": bn, "occupancy": occ, "KV_LATENCY": 2}
           for bm in (32, 64, 128) for bn in (32, 64, 128) for occ in (1, 2, 4)],
    make_args=_make_args,
    run=lambda q, k, v, out, causal, scale, config: _launch(q, k, v, out, causal, scale, config),
    compile=_compile,
    shape_key=lambda q, k, v, causal=True, scale=None, key_len=None: (*q.shape[:3], k.shape[2], q.shape[3]),
    expected=_expected,
)
