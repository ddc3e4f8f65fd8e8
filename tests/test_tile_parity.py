"""Backend "tile" against the reference, tier by tier.

tier 0: every kernel compiles to cubin for sm_80, sm_90, sm_100 and sm_120, on this machine, for
        the shipped model shapes. tier 1: each op against the reference in the CPU emulator.
tier 2: the looped core with each halting criterion. tier 3: the model. The GPU tests at the end
run the same comparisons natively and are skipped without a CUDA device.
"""
import pytest
import torch

from looplm import LoopConfig, LoopGPT, get_backend
from looplm.model import LoopTrace
from looplm.testing import assert_close
from looplm_tile import attention, halt_update, layer_norm, linear, runtime, softmax_entropy
import reference
from tests.test_torch_parity import scores_per_loop
from tuning.buckets import MODEL_SHAPES
from tuning.gpus import ARCHS

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

# ---- tier 0: ahead-of-time compilation for every target

# The shipped model configs (tuning.buckets): (batch, context, width, heads), and their vocabularies.
SHIPPED = {name: (m.batch, m.context, m.n_embd, m.n_head)
           for name, m in (("gpu", MODEL_SHAPES["shakespeare-char"]), ("cpu", MODEL_SHAPES["cpu"]))}
VOCABS = tuple(sorted({m.vocab for m in MODEL_SHAPES.values()}))


def shipped_signatures(model: str, dtype: torch.dtype) -> dict[str, list]:
    """kernel name -> the distinct (module, parameter constraints, config) that the launches of the
    shipped `model` config ("gpu" or "cpu") compile to."""
    launches: dict[str, list] = {name: [] for name in ("layer_norm", "linear", "attention", "softmax_entropy",
                                                        "halt_update")}
    for batch, seq, width, heads in [SHIPPED[model]]:
        rows = batch * seq
        for module, shape in ((layer_norm, (rows, width)), (attention, (batch, heads, seq, seq, width // heads)),
                              (halt_update, (rows, width)),
                              *((softmax_entropy, (rows, vocab)) for vocab in VOCABS)):
            config = module.TUNING.default
            launches[module.TUNING.kernel].append((module, module.compile_signature(shape, dtype, config), config))
        config = linear.TUNING.default
        block_linears = [((rows, 3 * width, width), {}), ((rows, width, width), {"has_residual": True}),
                         ((rows, 4 * width, width), {"gelu": True}), ((rows, width, 4 * width), {"has_residual": True})]
        head_linears = [((rows, vocab, width), {"has_bias": False}) for vocab in VOCABS]
        for shape, flags in block_linears + head_linears:
            launches["linear"].append((linear, linear.compile_signature(shape, dtype, config, **flags), config))
    distinct = {}
    for name, entries in launches.items():
        unique = {repr(params): entry for entry in entries for params in [entry[1]]}
        distinct[name] = list(unique.values())
    return distinct


KERNEL_OF = {"layer_norm": layer_norm.layer_norm_kernel, "linear": linear.linear_kernel,
             "attention": attention.attention_kernel, "softmax_entropy": softmax_entropy.softmax_entropy_kernel,
             "halt_update": halt_update.halt_update_kernel}


# The GPU model's shapes for every target; the CPU model's (smaller tiles) once, for the oldest.
TARGETS = [("gpu", arch) for arch in runtime.ARCHES] + [("cpu", "sm_80")]


@pytest.mark.parametrize("model, arch", TARGETS)
@pytest.mark.parametrize("kernel", list(KERNEL_OF))
def test_hierarchical_parity_tier0_compiles(kernel, model, arch):
    for _, params, config in shipped_signatures(model, torch.bfloat16)[kernel]:
        resources = runtime.compile_cubin(KERNEL_OF[kernel], params, arch, config)
        assert resources["cubin_bytes"] > 0
        if "shared_mem" in resources:
            assert resources["shared_mem"] <= ARCHS[arch].shared_mem_per_block, resources


# ---- tier 1: each op against the reference, in the emulator (or natively on a GPU)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE = get_backend("tile")


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (5, 128), (3, 7, 200)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_hierarchical_parity_tier1_layer_norm(shape, with_bias):
    x = torch.randn(shape, device=DEVICE) * 3 + 1
    weight, bias = torch.randn(2, shape[-1], device=DEVICE)
    bias = bias if with_bias else None
    assert_close(TILE.ops["layer_norm"](x, weight, bias), reference.layer_norm(x, weight, bias))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 70, 33), (37, 65, 96), (130, 20, 7)])
@pytest.mark.parametrize("activation, with_bias, with_residual",
                         [("none", False, False), ("none", True, True), ("gelu", True, False), ("gelu", False, True)])
def test_hierarchical_parity_tier1_linear(m, n, k, activation, with_bias, with_residual):
    x = torch.randn(m, k, device=DEVICE)
    weight = torch.randn(n, k, device=DEVICE) * k ** -0.5 * 2  # outputs of a few units: GELU's curved part
    bias = torch.randn(n, device=DEVICE) if with_bias else None
    residual = torch.randn(m, n, device=DEVICE) if with_residual else None
    assert_close(TILE.ops["linear"](x, weight, bias, activation, residual),
                 reference.linear(x, weight, bias, activation, residual))


def test_hierarchical_parity_tier1_linear_bf16_and_leading_dims():
    x = torch.randn(2, 9, 40, device=DEVICE, dtype=torch.bfloat16)
    weight = (torch.randn(24, 40, device=DEVICE) * 40 ** -0.5).bfloat16()
    residual = torch.randn(2, 9, 24, device=DEVICE, dtype=torch.bfloat16)
    out = TILE.ops["linear"](x, weight, None, "gelu", residual)
    assert out.shape == (2, 9, 24) and out.dtype == torch.bfloat16
    assert_close(out, reference.linear(x, weight, None, "gelu", residual))


@pytest.mark.parametrize("t_q, t_k, head_dim", [(1, 1, 32), (7, 7, 64), (1, 9, 64), (9, 5, 32), (70, 70, 32),
                                               (5, 67, 64), (3, 3, 128), (6, 6, 48)])
@pytest.mark.parametrize("causal", [True, False])
def test_hierarchical_parity_tier1_attention(t_q, t_k, head_dim, causal):
    q = torch.randn(2, 3, t_q, head_dim, device=DEVICE)
    k, v = torch.randn(2, 2, 3, t_k, head_dim, device=DEVICE)
    out = TILE.ops["attention"](q, k, v, causal)
    assert not out.isnan().any()
    assert_close(out, reference.attention(q, k, v, causal))


def test_hierarchical_parity_tier1_attention_rows_without_a_visible_key_are_zero():
    # Tq > Tk with bottom-right alignment: the first Tq - Tk queries see no key at all.
    q, k, v = torch.randn(1, 2, 9, 32, device=DEVICE), torch.randn(1, 2, 4, 32, device=DEVICE), \
        torch.randn(1, 2, 4, 32, device=DEVICE)
    out = TILE.ops["attention"](q, k, v, causal=True, scale=0.3)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert_close(out, reference.attention(q, k, v, causal=True, scale=0.3))


def test_hierarchical_parity_tier1_attention_strided_views():
    # The block passes head views of its qkv projection; strided inputs and output are read in place.
    qkv = torch.randn(2, 11, 3, 2, 32, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = torch.empty(2, 11, 2, 32, device=DEVICE)
    attention.attention_into(q, k, v, out.transpose(1, 2), causal=True, scale=0.2)
    assert_close(out.transpose(1, 2), reference.attention(q, k, v, scale=0.2))


@pytest.mark.parametrize("rows, vocab", [(1, 1), (1, 65), (7, 65), (3, 50257), (5, 3000)])
def test_hierarchical_parity_tier1_softmax_entropy(rows, vocab):
    logits = torch.randn(rows, vocab, device=DEVICE) * 4
    logits[0, vocab // 2] += 30  # one sure row: entropy near 0, max probability near 1
    entropy, max_prob = TILE.ops["softmax_entropy"](logits)
    ref_entropy, ref_max_prob = reference.softmax_entropy(logits)
    assert entropy.dtype == max_prob.dtype == torch.float32 and entropy.shape == (rows,)
    assert_close(entropy, ref_entropy)
    assert_close(max_prob, ref_max_prob)


def test_hierarchical_parity_tier1_softmax_entropy_large_logits_and_bf16():
    logits = (torch.randn(2, 3, 300, device=DEVICE) * 2 + 500).bfloat16()  # far from 0: no cancellation
    entropy, max_prob = TILE.ops["softmax_entropy"](logits)
    ref_entropy, ref_max_prob = reference.softmax_entropy(logits)
    assert_close(entropy, ref_entropy, dtype=torch.float32)
    assert_close(max_prob, ref_max_prob, dtype=torch.float32)


@pytest.mark.parametrize("n_tokens, channels", [(1, 1), (1, 33), (37, 100), (130, 600)])
@pytest.mark.parametrize("step, min_loops, max_loops", [(1, 2, 5), (2, 2, 5), (5, 1, 5), (3, 1, 9)])
def test_hierarchical_parity_tier1_halt_update(n_tokens, channels, step, min_loops, max_loops):
    h, h_new = torch.randn(2, n_tokens, channels, device=DEVICE)
    active = torch.rand(n_tokens, device=DEVICE) < 0.7
    steps = torch.randint(0, step, (n_tokens,), dtype=torch.int32, device=DEVICE)
    score, threshold = torch.rand(2, n_tokens, device=DEVICE)  # per-token thresholds
    args = (h, h_new, active, steps, score, threshold, step, min_loops, max_loops)
    for got, want in zip(TILE.ops["halt_update"](*args), reference.halt_update(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_hierarchical_parity_tier1_block():
    weights, x = _block_weights(width=64, seed=1), torch.randn(2, 13, 64, device=DEVICE)
    assert_close(TILE.ops["block"](x, weights, 2), reference.block(x, weights, 2), composed=True)


def _block_weights(width: int, seed: int):
    from looplm.ops import BlockWeights
    g = torch.Generator().manual_seed(seed)
    shapes = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
              (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    tensors = [torch.randn(s, generator=g) * (s[-1] ** -0.5 if len(s) == 2 else 0.1) for s in shapes]
    tensors[0] += 1
    tensors[6] += 1
    return BlockWeights(*(t.to(DEVICE) for t in tensors))


# ---- tier 2: the looped core with halting

CRITERIA = ("entropy", "confidence", "delta", "kl", "gate")


def _tiny_model(halt: str = "none", threshold=None, **overrides) -> LoopGPT:
    cfg = dict(vocab_size=65, block_size=16, n_embd=32, n_head=2, n_loops=4, halt=halt, halt_threshold=threshold,
               min_loops=2, max_loops=6, step_encoding="sinusoidal", update="euler")
    cfg.update(overrides)
    model = LoopGPT(LoopConfig(**cfg)).to(DEVICE).eval()
    with torch.no_grad():  # random weights give near-uniform readouts; sharpen them so scores spread
        model.lm_head.weight.mul_(20)
    if halt == "gate":  # an untrained gate scores every token alike; give it an opinion
        torch.nn.init.normal_(model.halt_gate.weight, std=2.0)
        torch.nn.init.zeros_(model.halt_gate.bias)
    return model


def _recorded_scores(model: LoopGPT, idx: torch.Tensor) -> torch.Tensor:
    """The reference's halting scores with every token running every loop, (loops, tokens), in the
    lower-is-surer units."""
    model.set_backend("reference")
    scores = scores_per_loop(model, model.embed(idx), model.config.max_loops)
    return torch.stack([score.reshape(-1) for score in scores])


# A threshold no score passes, for the recording run (criterion units, within the allowed range).
_NEVER = {"entropy": 0.0, "confidence": 1.0, "delta": 0.0, "kl": 0.0, "gate": 1.0}


def _separating_threshold(model: LoopGPT, idx: torch.Tensor) -> float:
    """A threshold that halts some tokens and not others, and that no recorded score comes near,
    so that both backends take the same decisions unless one of them is wrong."""
    scores = _recorded_scores(model, idx)
    finite = scores[scores.isfinite()]
    candidates = torch.quantile(finite, torch.linspace(0.2, 0.8, 25, device=finite.device))
    margins = torch.stack([(finite - c).abs().min() for c in candidates])
    best = int(margins.argmax())
    assert margins[best] > 1e-4, f"no threshold keeps clear of the scores (margin {margins[best]:.2e})"
    value = float(candidates[best])
    return -value if model.config.halt in ("confidence", "gate") else value


@pytest.mark.parametrize("criterion", CRITERIA)
def test_hierarchical_parity_tier2_loop_halting(criterion):
    idx = torch.randint(0, 65, (2, 12), device=DEVICE)
    model = _tiny_model(criterion, 0.5)
    with torch.no_grad():
        threshold = _separating_threshold(model, idx)
        per_token = torch.full(idx.shape, threshold, device=DEVICE)
        per_token[:, ::3] = _NEVER[criterion]  # every third token runs to max_loops
        results = {}
        for backend in ("reference", "tile"):
            model.set_backend(backend)
            trace = LoopTrace(steps=torch.empty(0))
            state = model.loop(model.embed(idx), idx, model.config.max_loops, True, per_token, trace)
            results[backend] = (state, trace.steps)
    (state_ref, steps_ref), (state, steps) = results["reference"], results["tile"]
    assert torch.equal(steps, steps_ref), f"{criterion}: steps differ\n{steps_ref}\n{steps}"
    assert steps_ref.min() >= model.config.min_loops and steps_ref.max() == model.config.max_loops
    assert len(steps_ref.unique()) > 1, f"{criterion}: every token took {steps_ref.flatten()[0]} steps"
    assert_close(state, state_ref, composed=True)


# ---- tier 3: the model

def test_hierarchical_parity_tier3_logits_and_loss():
    model = _tiny_model(n_loops=3)
    idx, targets = torch.randint(0, 65, (2, 2, 16), device=DEVICE)
    with torch.no_grad():
        logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
        logits, loss = model.set_backend("tile")(idx, targets)
    assert_close(logits, logits_ref, composed=True)
    assert_close(loss, loss_ref, composed=True)


@pytest.mark.parametrize("criterion", ["entropy", "delta"])
def test_hierarchical_parity_tier3_halting_decisions(criterion):
    model = _tiny_model(criterion, 0.5)
    idx = torch.randint(0, 65, (3, 10), device=DEVICE)
    with torch.no_grad():
        model.config.halt_threshold = _separating_threshold(model, idx)
        logits_ref, _, trace_ref = model.set_backend("reference")(idx, return_trace=True)
        logits, _, trace = model.set_backend("tile")(idx, return_trace=True)
    assert torch.equal(trace.steps, trace_ref.steps)
    assert trace.loops_run == trace_ref.loops_run
    assert_close(logits, logits_ref, composed=True)


def test_hierarchical_parity_tier3_greedy_generation():
    model = _tiny_model("entropy", 4.0)
    prompt = torch.randint(0, 65, (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = model.set_backend("reference").generate(prompt, max_new_tokens=6, temperature=0)
        generated = model.set_backend("tile").generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(generated, expected)


def test_tile_backend_mode_on_this_machine():
    from looplm import BackendUnavailable
    if torch.cuda.is_available():
        assert TILE.mode == "native" and TILE.device_type == "cuda"
    else:  # emulated on CPU tensors; a model on any other device is told so
        assert TILE.mode == "emulated" and TILE.device_type == "cpu"
        with pytest.raises(BackendUnavailable, match="emulated on cpu"):
            TILE.check_device(torch.device("meta"))


# ---- on a GPU: the shipped shapes, natively, fp32 and bf16

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (capability 8.0+) to run the cuTile kernels natively; "
                                      "the emulator covers the numerics at small shapes above")
GPU_DTYPES = [torch.float32, torch.bfloat16]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_hierarchical_parity_tier1_gpu_ops_at_shipped_shapes(dtype):
    batch, seq, width, heads = SHIPPED["gpu"]
    x = torch.randn(batch, seq, width, device="cuda", dtype=dtype)
    weight, bias = torch.randn(2, width, device="cuda", dtype=dtype)
    assert_close(TILE.ops["layer_norm"](x, weight, bias), reference.layer_norm(x, weight, bias))
    fc = (torch.randn(4 * width, width, device="cuda") * width ** -0.5).to(dtype)
    assert_close(TILE.ops["linear"](x, fc, None, "gelu"), reference.linear(x, fc, None, "gelu"))
    q, k, v = torch.randn(3, batch, heads, seq, width // heads, device="cuda", dtype=dtype)
    assert_close(TILE.ops["attention"](q, k, v), reference.attention(q, k, v))
    for vocab in VOCABS:
        logits = torch.randn(batch, seq, vocab, device="cuda", dtype=dtype) * 3
        for got, want in zip(TILE.ops["softmax_entropy"](logits), reference.softmax_entropy(logits)):
            assert_close(got, want, dtype=dtype)
    rows = batch * seq
    args = (x.view(rows, width), torch.randn_like(x).view(rows, width), torch.rand(rows, device="cuda") < 0.5,
            torch.randint(0, 3, (rows,), device="cuda", dtype=torch.int32), torch.rand(rows, device="cuda"),
            torch.rand(rows, device="cuda"), 3, 2, 12)
    for got, want in zip(TILE.ops["halt_update"](*args), reference.halt_update(*args)):
        assert torch.equal(got, want)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_hierarchical_parity_tier3_gpu_model_at_shipped_shapes(dtype, vocab):
    batch, seq, width, heads = SHIPPED["gpu"]
    cfg = LoopConfig(vocab_size=vocab, block_size=seq, n_embd=width, n_head=heads, n_loops=4)
    model = LoopGPT(cfg).eval()
    with torch.no_grad():  # about unit gain: at GPT's initialisation the core barely moves the logits
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    model.to("cuda", dtype)
    idx, targets = torch.randint(0, vocab, (2, batch, seq), device="cuda")
    with torch.no_grad():
        logits_ref, loss_ref = model.set_backend("reference")(idx, targets)
        logits, loss = model.set_backend("tile")(idx, targets)
    assert_close(logits, logits_ref, composed=True)
    assert_close(loss, loss_ref, dtype=dtype, composed=True)
