"""Entropy (nats) and max probability of softmax(logits) per row, in one pass over the vocabulary.

Algorithm: block m owns BLOCK_M rows and streams the vocabulary in BLOCK_V chunks, keeping per
row, in fp32, the running max m, Z = sum e^(x - m) and A = sum e^(x - m) (x - m). When a chunk
raises the max to m', both rescale by a = e^(m - m'): Z' = a Z and A' = a (A + Z (m - m')).
At the end, with p = e^(x - m) / Z:

    entropy  = -sum p log p = log Z - A / Z
    max prob = e^(m - m) / Z = 1 / Z

Keeping x - m (never x itself) in A avoids the cancellation of log Z + m - E[x] for large
logits. The exponentials are exp2 with flush-to-zero (e^x = 2^(x log2 e)), one instruction each.
Padding past the vocabulary loads as -inf: its e^(x - m) is 0, and the where() keeps its
0 * -inf out of A (as 0 log 0 = 0). Any vocabulary size works, 65 or 50,304 alike. The shift is
the true running max, 0 only while a row has seen nothing but -inf (a first chunk of -inf logits
must not pin the max at 0).

Tuning knobs: BLOCK_M (rows per block, one by default), BLOCK_V (vocabulary chunk: larger chunks
mean fewer rescales and loop trips, more registers), occupancy.
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
    row_max = ct.full((BLOCK_M, 1), -math.inf, dtype=ct.float32)
    z = ct.zeros((BLOCK_M, 1), dtype=ct.float32)
    a = ct.zeros((BLOCK_M, 1), dtype=ct.float32)
    for j in range(ct.num_tiles(Logits, axis=1, shape=(BLOCK_M, BLOCK_V))):
        x = ct.load(Logits, index=(m_block, j), shape=(BLOCK_M, BLOCK_V), padding_mode=ct.PaddingMode.NEG_INF)
        x = x.astype(ct.float32)
        new_max = ct.maximum(row_max, ct.max(x, axis=1, keepdims=True))
        # The shift is the true running max; 0 only while a row has seen nothing but -inf (rows
        # past the end, or a first chunk of -inf logits), which keeps the arithmetic finite
        # without ever pinning the max at 0.
        shift = ct.where(new_max == -math.inf, 0.0, new_max)
        shifted = x - shift
        e = ct.exp2(shifted * LOG2_E, flush_to_zero=True)
        rescale = ct.exp2((row_max - shift) * LOG2_E, flush_to_zero=True)
        a = rescale * (a + ct.where(z > 0.0, z * (row_max - shift), 0.0)) + \
            ct.sum(ct.where(e > 0.0, e * shifted, 0.0), axis=1, keepdims=True)
        z = rescale * z + ct.sum(e, axis=1, keepdims=True)
        row_max = new_max
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
        config = tuning.lookup_config("tile", "softmax_entropy", logits.dtype, rows.shape,
                                      runtime.default_config(TUNING, rows))
        _launch(rows, entropy, max_prob, config)
    return entropy.view(logits.shape[:-1]), max_prob.view(logits.shape[:-1])


# ---- tuning: shape key (rows, V)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    n_rows, vocab = shape
    logits = torch.randn(n_rows, vocab, dtype=dtype, device=device) * 3
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    return logits, entropy, torch.empty_like(entropy)


def compile_signature(shape: tuple, dtype: torch.dtype, config: dict) -> list:
    """The parameter constraints of the launch at shape (rows, V), as the JIT derives them."""
    ((_, kernel, args, _),) = runtime.capture(_launch, *_make_args(shape, dtype, "meta"), config)
    return runtime.signature_of(kernel, args)


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return runtime.compile_run(_launch, arch, *_make_args(shape, dtype, "meta"), config)


def _expected(logits, entropy, max_prob) -> tuple[Tensor, Tensor]:
    from looplm import get_backend
    return get_backend("reference").ops["softmax_entropy"](logits)


# One row per block by default; many rows per block stay in the space for small vocabularies.
TUNING = KernelTuning(
    backend="tile", kernel="softmax_entropy",
    default={"BLOCK_M": 1, "BLOCK_V": 4096, "occupancy": 4},
    space=[{"BLOCK_M": bm, "BLOCK_V": bv, "occupancy": occ}
           for bm in (1, 2, 4, 8, 16) for bv in (256, 512, 1024, 2048, 4096) for occ in (1, 2, 4, 8)
           if bm * bv <= 16384],
    make_args=_make_args,
    run=lambda logits, entropy, max_prob, config: _launch(logits, entropy, max_prob, config),
    compile=_compile,
    shape_key=lambda logits: (logits.numel() // logits.shape[-1], logits.shape[-1]),
    expected=_expected,
)
