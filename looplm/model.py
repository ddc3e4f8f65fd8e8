"""LoopGPT: a GPT whose core of n_layer blocks is applied n_loops times, with per-token halting.

    x0 = embed(idx) (+ prelude)
    h  = init(x0)                             zeros | embed | noise
    for t in 1 .. loops:
        u = inject(h, x0) + step(t_token)     none | add | norm_add;  none | learned | sinusoidal
        g = core(u)                           the tied block(s)
        h_new = g  |  h + alpha * (g - h)     replace | euler (alpha learned, per channel)
        h, active, steps = halt_update(h, h_new, active, steps, score, threshold, t)
    logits = lm_head(ln_f(coda(h)))

n_layer=12, n_loops=1 is GPT-12L; n_layer=1, n_loops=12 is LoopLM 1Lx12. Parameter names follow
nanoGPT (transformer.wte, .wpe, .ln_f, lm_head; blocks with ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj) with the looped blocks under transformer.core.

The loop itself, with halting, lives in `looplm.engine`: a halted token keeps its state and, at
every layer, offers the keys and values of its last loop, so the core runs for the active tokens
only. Every op goes through the backend (`looplm.backends`), which decides between kernels and the
fast torch ops for autograd.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from looplm.backends import Backend, get_backend, hybrid_ops
from looplm import halting as halting_rules
from looplm.config import LoopConfig
from looplm.engine import KVStore, LoopTrace, blocks_with_cache, run_loop
from looplm.ops import BlockWeights

__all__ = ["Block", "CausalSelfAttention", "LayerNorm", "LoopGPT", "LoopTrace", "MLP", "check_sampling",
           "sample_next_token"]

GATE_BIAS_INIT = -4.0  # sigmoid(-4) ~ 0.02: an untrained gate halts late


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's), computed by the backend's `layer_norm` op."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.backend = get_backend("torch")  # LoopGPT.set_backend sets every module's

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.op("layer_norm")(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention of (B, T, C) normalised inputs, nanoGPT's c_attn and c_proj."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.n_head = config.n_head
        self.c_attn = nn.Linear(C, 3 * C, bias=bias)
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.backend = get_backend("torch")  # LoopGPT.set_backend sets every module's

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        linear = self.backend.op("linear")
        q, k, v = linear(x, self.c_attn.weight, self.c_attn.bias).view(B, T, 3, self.n_head, C // self.n_head) \
            .permute(2, 0, 3, 1, 4)
        y = self.backend.op("attention")(q, k, v, causal=True).transpose(1, 2).reshape(B, T, C)
        return linear(y, self.c_proj.weight, self.c_proj.bias)


class MLP(nn.Module):
    """c_fc, exact GELU, c_proj (nanoGPT's)."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.c_fc = nn.Linear(C, 4 * C, bias=bias)
        self.c_proj = nn.Linear(4 * C, C, bias=bias)
        self.backend = get_backend("torch")  # LoopGPT.set_backend sets every module's

    def forward(self, x: Tensor) -> Tensor:
        linear = self.backend.op("linear")
        return linear(linear(x, self.c_fc.weight, self.c_fc.bias, "gelu"), self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)), computed in one call of
    the backend's fused `block` op. The loop engine runs it on a subset of tokens through the split
    ops (`looplm.engine.block_on_rows`)."""

    def __init__(self, config: LoopConfig):
        super().__init__()
        C, bias = config.n_embd, config.bias
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.backend = get_backend("torch")  # LoopGPT.set_backend sets every module's
        self.ln_1 = LayerNorm(C, bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(C, bias)
        self.mlp = MLP(config)

    def weights(self) -> BlockWeights:
        a, m = self.attn, self.mlp
        return BlockWeights(self.ln_1.weight, self.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                            a.c_proj.bias, self.ln_2.weight, self.ln_2.bias, m.c_fc.weight, m.c_fc.bias,
                            m.c_proj.weight, m.c_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.op("block")(x, self.weights(), self.n_head, self.dropout if self.training else 0.0)


def sinusoidal_encoding(t: Tensor, dim: int) -> Tensor:
    """Transformer sinusoids of the (integer) loop index t (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class LoopGPT(nn.Module):
    """LoopGPT(config, backend="torch"); without a config, the shakespeare LoopLM 1Lx12 (LoopConfig()'s
    defaults: vocab 65, block 256, 384 wide, 6 heads, 1 layer, 12 loops)."""

    def __init__(self, config: Optional[LoopConfig] = None, backend: Union[str, Backend] = "torch"):
        super().__init__()
        if config is None:
            config = LoopConfig()
        if not isinstance(config, LoopConfig):
            raise TypeError(f"LoopGPT(config, backend): config must be a LoopConfig or None (the shakespeare "
                            f"LoopLM 1Lx12), got {type(config).__name__} {config!r}; name a backend with backend=...")
        self.config = config
        C, bias = config.n_embd, config.bias
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            wpe=nn.Embedding(config.n_positions, C),
            drop=nn.Dropout(config.dropout),
            prelude=nn.ModuleList([Block(config) for _ in range(config.n_prelude)]),
            core=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            coda=nn.ModuleList([Block(config) for _ in range(config.n_coda)]),
            ln_f=LayerNorm(C, bias),
        ))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        if config.inject == "norm_add":
            self.ln_inject = LayerNorm(C, bias)
        if config.step_encoding == "learned":
            self.step_emb = nn.Embedding(config.n_loops, C)  # loops past n_loops reuse the last row
        if config.update == "euler":
            self.step_size_logit = nn.Parameter(torch.zeros(C))  # alpha = sigmoid(.) starts at 1/2
        if config.halt == "gate":
            self.halt_gate = nn.Linear(C, 1)
        self.capacity_plans = halting_rules.CapacityPlans()  # the halting loop's slots per input shape (looplm.engine)
        # Tokens a frozen capacity plan left without a slot (they stopped early), summed on the device.
        self.register_buffer("capacity_dropped", torch.zeros((), dtype=torch.int64), persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.effective_depth))
        if config.halt == "gate":
            nn.init.zeros_(self.halt_gate.weight)
            nn.init.constant_(self.halt_gate.bias, GATE_BIAS_INIT)
        self.set_backend(backend)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_backend(self, backend: Union[str, Backend]) -> "LoopGPT":
        self.backend = get_backend(backend)
        for module in self.modules():
            if isinstance(module, (LayerNorm, CausalSelfAttention, MLP, Block)):
                module.backend = self.backend
        return self

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; as nanoGPT, position embeddings are left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---- the pieces of the forward pass

    def embed(self, idx: Tensor, start: int = 0, pos: Optional[Tensor] = None, *,
              kv: Optional[KVStore] = None) -> Tensor:
        """(B, T) token ids at positions start.. (or at the position ids `pos` (B, T) a task gives)
        -> x0 (B, T, C), through the prelude. With `kv` (cached generation) the prelude also attends
        to the earlier tokens' keys and values kept there."""
        if pos is None:
            pos = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if kv is not None:
            return blocks_with_cache(self, self.transformer.prelude, x, kv)
        for blk in self.transformer.prelude:
            x = blk(x)
        return x

    def initial_state(self, x0: Tensor) -> Tensor:
        if self.config.state_init == "embed":
            return x0
        if self.config.state_init == "noise":
            return torch.randn_like(x0) * self.config.state_noise_std
        return torch.zeros_like(x0)

    def inject(self, h: Tensor, x0: Tensor, loop_index: Union[int, Tensor]) -> Tensor:
        """The core's input at loop `loop_index`: an int when every token is at that loop (the loop
        engine's case: one encoding row for all, and no per-token index to build when there is no
        step encoding), or each token's own loop count (B, T)."""
        cfg = self.config
        u = h if cfg.inject == "none" else h + (x0 if cfg.inject == "add" else self.ln_inject(x0))
        if cfg.step_encoding == "none":
            return u
        if isinstance(loop_index, int):  # no index to copy from the host: a row, or a fill on the device
            if cfg.step_encoding == "learned":
                return u + self.step_emb.weight[min(loop_index, cfg.n_loops) - 1]
            loop_index = torch.full((), loop_index, device=h.device)
        if cfg.step_encoding == "learned":
            u = u + self.step_emb((loop_index - 1).clamp(max=cfg.n_loops - 1))
        else:
            u = u + sinusoidal_encoding(loop_index, cfg.n_embd).to(u.dtype)
        return u

    def core(self, u: Tensor) -> Tensor:
        """The tied layers on every token (the loop engine splits them to run the active tokens only)."""
        for blk in self.transformer.core:
            u = blk(u)
        return u

    def update(self, h: Tensor, g: Tensor) -> Tensor:
        if self.config.update == "euler":
            return h + torch.sigmoid(self.step_size_logit).to(h.dtype) * (g - h)
        return g

    def head(self, h: Tensor) -> Tensor:
        """Final state (B, T, C) -> logits (B, T, V): coda, then ln_f and the tied lm_head."""
        for blk in self.transformer.coda:
            h = blk(h)
        return self.logits(h)

    def logits(self, h: Tensor) -> Tensor:
        """ln_f and the tied lm_head, one op: (..., C) -> (..., V)."""
        ln = self.transformer.ln_f
        return self.backend.op("layer_norm_linear")(h, ln.weight, ln.bias, self.lm_head.weight)

    def _dropout_p(self) -> float:
        return self.config.dropout if self.training else 0.0

    # ---- halting

    def halt_thresholds(self, idx: Tensor, thresholds: Optional[Tensor] = None) -> Tensor:
        """Per-token thresholds (B, T) in the criterion's own units (`looplm.halting.thresholds`)."""
        return halting_rules.thresholds(self.config, idx, thresholds)

    def halt_bar(self, idx: Tensor, thresholds: Optional[Tensor] = None) -> Tensor:
        """Per-token thresholds as halt_update takes them: (B*T,) float32, lower score is surer."""
        return halting_rules.halt_bar(self.config.halt, self.halt_thresholds(idx, thresholds))

    # ---- the loop

    def loop(self, x0: Tensor, idx: Tensor, n_loops: int, halting: bool, thresholds: Optional[Tensor] = None,
             trace: Optional[LoopTrace] = None, states: Optional[list[Tensor]] = None,
             grad_loops: Optional[int] = None, compact: bool = True) -> Tensor:
        """Run the tied core from x0 (B, T, C); returns the final state. Fills `trace` if given.
        For training: `states` receives the state after every loop (to supervise each one), and
        `grad_loops` keeps the graph of the state through the last grad_loops loops only (truncated
        backprop; x0 still gets every loop's gradient through the injection).

        With halting the core runs for the active tokens only (`looplm.engine`); compact=False runs
        it for every token and discards the halted tokens' results: the same semantics, the reference
        the compacted loop is checked against."""
        threshold = self.halt_bar(idx, thresholds) if halting else None
        h, _ = run_loop(self, x0, n_loops, threshold, compact=compact, trace=trace, states=states,
                        grad_loops=grad_loops, plans=self.capacity_plans)
        return h

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *, n_loops: Optional[int] = None,
                halting: Optional[bool] = None, thresholds: Optional[Tensor] = None, return_trace: bool = False,
                pos: Optional[Tensor] = None, halt: Optional[bool] = None):
        """nanoGPT's call: (logits, loss); logits for the last position only when targets is None.

        pos: position ids (B, T) in [0, n_positions) that a task gives its tokens (e.g. place values
        in addition), used instead of 0..T-1. Attention stays causal in the order of idx.

        halting: None halts in eval mode when the config names a criterion, never in training; True or
        False forces it (`halt=` is its former name, still taken). n_loops: the loop budget (default
        n_loops, or max_loops when halting). thresholds (B, T): per-token thresholds (criterion units).
        return_trace: also return a LoopTrace, as (logits, loss, trace).
        """
        cfg = self.config
        self._check_inputs(idx, targets, pos)
        halting = halting_rules.resolve(cfg, halting, self.training, halt)
        budget = halting_rules.loop_budget(cfg, halting, n_loops)
        trace = LoopTrace(steps=torch.empty(0)) if return_trace else None
        if not self.training:
            hybrid_ops(self.backend, "the model is in eval mode")

        x0 = self.embed(idx, pos=pos)
        h = self.loop(x0, idx, budget, halting, thresholds, trace)
        if targets is not None:
            logits = self.head(h)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:  # only the last position is needed; the coda attends, so it still sees every token
            logits = self.head(h)[:, [-1], :] if self.transformer.coda else self.head(h[:, [-1], :])
            loss = None
        return (logits, loss, trace) if return_trace else (logits, loss)

    def _check_inputs(self, idx: Tensor, targets: Optional[Tensor], pos: Optional[Tensor] = None) -> None:
        cfg = self.config
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of int64 token ids, got "
                             f"{type(idx).__name__} {getattr(idx, 'dtype', '')} {tuple(getattr(idx, 'shape', ()))}")
        if idx.size(1) > cfg.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {cfg.block_size}")
        if idx.numel() == 0:
            raise ValueError(f"idx is empty: {tuple(idx.shape)}")
        device = self.lm_head.weight.device
        if idx.device != device:
            raise ValueError(f"idx is on {idx.device} but the model is on {device}; move one of them")
        self.backend.check_device(device)
        if not torch.compiler.is_compiling():  # a data-dependent check would break a compiled graph
            lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one reduction, one read
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if targets.device != device:
                raise ValueError(f"targets are on {targets.device} but the model is on {device}")
        if pos is not None:
            self._check_positions(pos, tuple(idx.shape))
        elif idx.size(1) > cfg.n_positions:
            raise ValueError(f"sequence length {idx.size(1)} exceeds the {cfg.n_positions} rows of the position "
                             "table (n_positions); pass position ids pos=... in [0, n_positions)")

    def _check_positions(self, pos: Tensor, shape: tuple[int, ...]) -> None:
        n = self.config.n_positions
        if not isinstance(pos, Tensor) or pos.dtype not in (torch.long, torch.int32) or tuple(pos.shape) != shape:
            raise ValueError(f"pos must be a {shape} tensor of int64 position ids, got {type(pos).__name__} "
                             f"{getattr(pos, 'dtype', '')} {tuple(getattr(pos, 'shape', ()))}")
        if pos.device != self.lm_head.weight.device:
            raise ValueError(f"pos is on {pos.device} but the model is on {self.lm_head.weight.device}")
        if torch.compiler.is_compiling():  # a data-dependent check would break a compiled graph
            return
        lo, hi = torch.stack(torch.aminmax(pos)).tolist()  # one read
        if lo < 0 or hi >= n:
            raise ValueError(f"position ids must be in [0, {n}) (n_positions), got values in [{lo}, {hi}]")

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 *, use_cache: bool = True, halting: Optional[bool] = None, n_loops: Optional[int] = None,
                 pos: Optional[Tensor] = None, halt: Optional[bool] = None) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T), nanoGPT's way. temperature=0 is greedy;
        halting (or its former name halt) and n_loops as in forward. By default the prompt runs once
        and then each new token in one step over static per-loop K/V caches
        (`looplm.generation.generate_static`: the same tokens as without the cache; no host read per
        token; on CUDA the step is compiled and replayed as a CUDA graph, on every backend; on
        the CPU a halting step stops when every row has halted). use_cache=False reruns the whole
        (cropped) context per token.
        pos: position ids (B, T + max_new_tokens) of the prompt and of the tokens to come, as the
        task gives them (the last column is never fed; see LoopGPT.forward)."""
        halting = halting_rules.resolve(self.config, halting, self.training, halt)
        if use_cache:
            from looplm.generation import generate_static  # generation builds on this module
            compile = self.lm_head.weight.device.type == "cuda"
            return generate_static(self, idx, max_new_tokens, temperature, top_k, halting=halting, n_loops=n_loops,
                                   pos=pos, compile=compile)[0]
        check_sampling(max_new_tokens, temperature, top_k)
        if pos is not None:
            self._check_positions(pos, (idx.size(0), idx.size(1) + max_new_tokens))
        for _ in range(max_new_tokens):
            end, start = idx.size(1), max(0, idx.size(1) - self.config.block_size)
            idx_cond = idx[:, start:]
            logits, _ = self(idx_cond, halting=halting, n_loops=n_loops, pos=None if pos is None else pos[:, start:end])
            idx = torch.cat((idx, sample_next_token(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int]) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def sample_next_token(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """Next token ids (B, 1) from logits (B, V): argmax at temperature 0, else sampled from the top_k.
    On the device, with no host read (the top_k filter is a comparison, not a boolean index), so that
    a CUDA graph holds it: the draw is an exponential race, argmax of p / E with E ~ Exp(1) per
    token, which token i wins with probability p_i, where torch.multinomial checks its input on the
    host in some releases."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[:, [-1]], -float("inf"), logits)
    probs = F.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_().clamp_(min=torch.finfo(probs.dtype).tiny)  # (an E of 0 makes 0/0)
    return (probs / race).argmax(dim=-1, keepdim=True)
