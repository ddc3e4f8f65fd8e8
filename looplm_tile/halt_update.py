"""One halting step, out of place, in one pass over memory (semantics: reference/halt_update.py).

Algorithm: block m owns BLOCK_M tokens. It reads their active flags, step counts, scores and
thresholds once, then streams the state in BLOCK_C-wide column tiles, gathering for each token
only the row it keeps (h_new where the token is active, h where it has halted: the other load is
masked off and never touches memory) and writing it out; then it writes the new counts (+1 for
active tokens) and the new active flags. A token halts when step >= max_loops, or when step >=
min_loops and score < threshold (thresholds are per token: "wait to think" after chosen tokens).
One state row read and one written per token: the bandwidth floor of the op.

Tuning knobs: BLOCK_M (tokens per block), BLOCK_C (column tile; with C <= BLOCK_C a row is one
tile), occupancy.
"""
import torch
from torch import Tensor

import cuda.tile as ct

import tuning
from looplm.ops import check_halt_update
from looplm_tile import runtime
from tuning.spec import KernelTuning


@ct.kernel
def halt_update_kernel(H, HNew, Active, Steps, Score, Threshold, HOut, ActiveOut, StepsOut, step, min_loops,
                       max_loops, BLOCK_M: ct.Constant[int], BLOCK_C: ct.Constant[int]):
    m_block = ct.bid(0)
    pad = ct.PaddingMode.ZERO
    active = ct.load(Active, index=(m_block,), shape=(BLOCK_M,), padding_mode=pad)
    keep_new = active.reshape((BLOCK_M, 1))
    rows = (m_block * BLOCK_M + ct.arange(BLOCK_M, dtype=ct.int32)).reshape((BLOCK_M, 1))
    for j in range(ct.num_tiles(H, axis=1, shape=(BLOCK_M, BLOCK_C))):
        cols = (j * BLOCK_C + ct.arange(BLOCK_C, dtype=ct.int32)).reshape((1, BLOCK_C))
        fresh = ct.gather(HNew, (rows, cols), mask=keep_new)
        kept = ct.gather(H, (rows, cols), mask=~keep_new)
        ct.store(HOut, index=(m_block, j), tile=ct.where(keep_new, fresh, kept))
    steps = ct.load(Steps, index=(m_block,), shape=(BLOCK_M,), padding_mode=pad)
    ct.store(StepsOut, index=(m_block,), tile=ct.where(active, steps + 1, steps))
    score = ct.load(Score, index=(m_block,), shape=(BLOCK_M,), padding_mode=pad)
    threshold = ct.load(Threshold, index=(m_block,), shape=(BLOCK_M,), padding_mode=pad)
    sure = (score < threshold) & (step >= min_loops)
    halts = sure | (step >= max_loops)
    ct.store(ActiveOut, index=(m_block,), tile=active & ~halts)


def _blocks(config: dict, n_tokens: int, n_channels: int) -> tuple[int, int]:
    p2 = runtime.next_power_of_2
    return min(config["BLOCK_M"], p2(n_tokens)), min(config["BLOCK_C"], p2(n_channels))


def _launch(h, h_new, active, steps, score, threshold, h_out, active_out, steps_out, step, min_loops, max_loops,
            config: dict) -> tuple[Tensor, Tensor, Tensor]:
    block_m, block_c = _blocks(config, *h.shape)
    args = (h, h_new, active, steps, score, threshold, h_out, active_out, steps_out, int(step), int(min_loops),
            int(max_loops), block_m, block_c)
    runtime.launch((runtime.cdiv(h.shape[0], block_m),), halt_update_kernel, args, config)
    return h_out, active_out, steps_out


def halt_update(h: Tensor, h_new: Tensor, active: Tensor, steps: Tensor, score: Tensor, threshold: Tensor,
                step: int, min_loops: int, max_loops: int) -> tuple[Tensor, Tensor, Tensor]:
    check_halt_update(h, h_new, active, steps, score, threshold)
    n_tokens = h.shape[0]
    h, h_new = h.contiguous(), h_new.contiguous()
    h_out, active_out, steps_out = torch.empty_like(h), torch.empty_like(active), torch.empty_like(steps)
    if n_tokens:
        config = tuning.lookup_config("tile", "halt_update", h.dtype, tuple(h.shape),
                                      runtime.default_config(TUNING, h))
        _launch(h, h_new, active.contiguous(), steps.contiguous(), score.contiguous(), threshold.contiguous(), h_out,
                active_out, steps_out, step, min_loops, max_loops, config)
    return h_out, active_out, steps_out


# ---- tuning: shape key (N, C)

def _make_args(shape: tuple, dtype: torch.dtype, device) -> tuple:
    n_tokens, n_channels = shape
    h, h_new = torch.randn(2, n_tokens, n_channels, dtype=dtype, device=device)
    active = torch.rand(n_tokens, device=device) < 0.7
    steps = torch.randint(0, 4, (n_tokens,), dtype=torch.int32, device=device)
    score, threshold = torch.rand(2, n_tokens, device=device)
    return (h, h_new, active, steps, score, threshold, torch.empty_like(h), torch.empty_like(active),
            torch.empty_like(steps), 3, 2, 12)


def _compile(shape: tuple, dtype: torch.dtype, config: dict, arch: str) -> dict:
    return runtime.compile_run(_launch, arch, *_make_args(shape, dtype, "meta"), config=config)


def _expected(h, h_new, active, steps, score, threshold, h_out, active_out, steps_out, step, min_loops, max_loops):
    from looplm import get_backend
    return get_backend("reference").ops["halt_update"](h, h_new, active, steps, score, threshold, step, min_loops,
                                                       max_loops)


TUNING = KernelTuning(
    backend="tile", kernel="halt_update",
    default={"BLOCK_M": 1, "BLOCK_C": 1024, "occupancy": 4},
    space=[{"BLOCK_M": bm, "BLOCK_C": bc, "occupancy": occ}
           for bm in (1, 2, 4, 8, 16, 32) for bc in (128, 256, 512, 1024) for occ in (1, 2, 4, 8)],
    make_args=_make_args,
    run=lambda *args, config: _launch(*args, config=config),
    compile=_compile,
    shape_key=lambda h, h_new, active, steps, score, threshold, step, min_loops, max_loops: tuple(h.shape),
    expected=_expected,
)
