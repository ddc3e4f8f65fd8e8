"""Entropy (nats) and max probability of softmax(logits) per row, in one pass over the vocabulary.

Algorithm: block m owns BLOCK_M rows and streams the vocabulary in BLOCK_V chunks. The online
softmax runs lane by lane (each column of the chunk keeps its own state, in fp32): a running max m,
Z = sum e^(x - m) and A = sum e^(x - m) (x - m) over the logits x it has seen. A new logit folds
in with one exponential and no reduction across the block:

    x > m:  d = m - x,  Z <- e^d Z + 1,   A <- e^d (A + Z d),   m <- x
    else:   d = x - m,  Z <- Z + e^d,     A <- A + e^d d

After the loop each row's lanes are combined once, shifted to the row's max M (a = e^(m - M)):
Z = sum a Z_lane, A = sum a (A_lane + Z_lane (m - M)). Then, with p = e^(x - M) / Z:

    entropy  = -sum p log p = log Z - A / Z
    max prob = 1 / Z

Keeping x - m (never x itself) in A avoids the cancellation of log Z + m - E[x] for large
logits. The exponentials are exp2 with flush-to-zero (e^x = 2^(x log2 e)), one instruction each.
Padding past the vocabulary loads as -inf: its weight is 0 and the where()s keep its 0 * -inf out
of A (as 0 log 0 = 0); a lane that has seen only -inf keeps m = -inf and Z = 0. Any vocabulary
size works, 65 or 50,304 alike.

Tuning knobs: BLOCK_M (rows per block, one by default), BLOCK_V (vocabulary chunk: larger chunks
mean fewer loop trips but three fp32 lanes of state per logit in registers), occupancy.
"""
import math

import torch
from torch import Tensor

import cuda.tile as ct

import tuning
from looplm.ops import check_kernel_dtype
from looplm_tile import runtime
from tuning.spec import KernelTuning

LOG2_E = 1.0 / math.log(2.0)


@ct.kernel
def softmax_entropy_kernel(Logits, Entropy, MaxProb, BLOCK_M: ct.Constant[int], BLOCK_V: ct.Constant[int]):
    m_block = ct.bid(0)
    # Per lane (column of the chunk): running max m, Z = sum e^(x - m), A = sum e^(x - m) (x - m).
    lane_max = ct.full((BLOCK_M, BLOCK_V), -math.inf, dtype=ct.float32)
    lane_z = ct.zeros((BLOCK_M, BLOCK_V), dtype=ct.float32)
    lane_a = ct.zeros((BLOCK_M, BLOCK_V), dtype=ct.float32)
    for j in range(ct.num_tiles(Logits, axis=1, shape=(BLOCK_M, BLOCK_V))):
        x = ct.load(Logits, index=(m_block, j), shape=(BLOCK_M, BLOCK_V), padding_mode=ct.PaddingMode.NEG_INF)
        x = x.astype(ct.float32)
        grows = x > lane_max
        # d <= 0: how far the old max lies below the new one, or the logit below the max; -inf for
        # a -inf logit (its weight is then 0), also while the lane has seen nothing else.
        d = ct.where(x == -math.inf, -math.inf, ct.where(grows, lane_max - x, x - lane_max))
        e = ct.exp2(d * LOG2_E, flush_to_zero=True)
        e_d = ct.where(e > 0.0, e * d, 0.0)
        z_d = ct.where(lane_z > 0.0, lane_z * d, 0.0)
        lane_a = ct.where(grows, e * (lane_a + z_d), lane_a + e_d)
        lane_z = ct.where(grows, e * lane_z + 1.0, lane_z + e)
        lane_max = ct.where(grows, x, lane_max)
    # Combine each row's lanes once, shifted to the row's max (0 for a row of only -inf).
    row_max = ct.max(lane_max, axis=1, keepdims=True)
    shift = ct.where(row_max == -math.inf, 0.0, row_max)
    offset = lane_max - shift  # <= 0, -inf for an empty lane
    scale = ct.exp2(offset * LOG2_E, flush_to_zero=True)
    z = ct.sum(scale * lane_z, axis=1, keepdims=True)
    a = ct.sum(scale * (lane_a + ct.where(lane_z > 0.0, lane_z * offset, 0.0)), axis=1, keepdims=True)
    z = ct.where(z > 0.0, z, 1.0)
    entropy = ct.log(z) - a / z
    ct.store(Entropy, index=(m_block,), tile=entropy.reshape((BLOCK_M,)))
    ct.store(MaxProb, index=(m_block,), tile=(1.0 / z).reshape((BLOCK_M,)))


def _blocks(config: dict, n_rows: int, vocab: int) -> tuple[int, int]:
    p2 = runtime.next_power_of_2
    return min(config["BLOCK_M"], p2(n_rows)), min(config["BLOCK_V"], p2(vocab))


def _launch(logits: Tensor, entropy: Tensor, max_prob: Tensor, config: dict) -> tuple[Tensor, Tensor]:
    n_rows, vocab = logits.shape
    block_m, block_v = _blocks(config, n_rows, vocab)
    runtime.launch((runtime.cdiv(n_rows, block_m),), softmax_entropy_kernel, (logits, entropy, max_prob, block_m,
                                                                              block_v), config)
    return entropy, max_prob


def softmax_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    check_kernel_dtype("softmax_entropy", "logits", logits)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"softmax_entropy: logits have an empty vocabulary, shape {tuple(logits.shape)}")
    rows = logits.reshape(-1, vocab).contiguous()
    entropy = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    max_prob = torch.empty_like(entropy)
    if rows.shape[0]:
        config = tuning.lookup_config("tile", "softmax_entropy", logits.dtype, rows.shape, default_config(vocab))
        _launch(rows, entropy, max_prob, config)
    return entropy.view(logits.shape[:-1]), max_prob.view(logits.shape[:-1])


# ---- tuning: shape key (rows, V)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    n_rows, vocab = shape
    logits = torch.randn(n_rows, vocab, dtype=dtype, device=device) * 3
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    return logits, entropy, torch.empty_like(entropy)


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return runtime.compile_run(_launch, arch, *_make_args(shape, dtype, "meta"), config)


def _expected(logits, entropy, max_prob) -> tuple[Tensor, Tensor]:
    from looplm import get_backend
    return get_backend("reference").ops["softmax_entropy"](logits)


def default_config(vocab: int) -> dict:
    """Rows and chunk for a vocabulary of `vocab`, without a tuning table: chunks of up to 2048
    logits (three fp32 lanes of state each: 4096 spill 8 to 56 bytes at occupancy 4), one row of a
    large vocabulary per block, 8 rows of a small one (65 characters), occupancy 4. Compiled
    without a spill for sm_80, sm_90, sm_100 and sm_120."""
    block_v = min(2048, runtime.next_power_of_2(vocab))
    return {"BLOCK_M": max(1, min(8, 1024 // block_v)), "BLOCK_V": block_v, "occupancy": 4}


TUNING = KernelTuning(
    backend="tile", kernel="softmax_entropy",
    default=default_config(50304),  # the GPT-2 vocabulary
    space=[{"BLOCK_M": bm, "BLOCK_V": bv, "occupancy": occ}
           for bm in (1, 2, 4, 8, 16) for bv in (128, 256, 512, 1024, 2048, 4096) for occ in (1, 2, 4, 8)
           if bm * bv <= 16384],
    make_args=_make_args,
    run=lambda logits, entropy, max_prob, config: _launch(logits, entropy, max_prob, config),
    compile=_compile,
    shape_key=lambda logits: (logits.numel() // logits.shape[-1], logits.shape[-1]),
    expected=_expected,
)
