"""Cached generation (LoopGPT.generate's default): equal to uncached generation for every model
shape, at fixed depth and with halting; fill policies, schedules, exited rows."""
from __future__ import annotations

import pytest
import torch

from looplm import LoopConfig, LoopGPT
from looplm.backends import get_backend
from looplm.generation import Decoder, LoopKVCache, generate_cached, generate_static
from looplm.testing import CudaGraphRuleBroken, backend_or_skip, count_host_syncs, cuda_graph_rules, device_for
from tests.models import sharpen
from tests.test_adaptive import MAX_LOOPS, SHAPES, counting, sharpened_model


def fixed_depth_model(**overrides) -> LoopGPT:
    torch.manual_seed(0)
    base = dict(vocab_size=17, block_size=24, n_embd=32, n_head=4, n_layer=1, n_loops=4)
    model = LoopGPT(LoopConfig(**{**base, **overrides})).eval()
    sharpen(model)  # greedy choices far from ties
    return model


@pytest.mark.parametrize("overrides", [
    *SHAPES.values(), dict(step_encoding="learned", update="euler", inject="norm_add"),
], ids=[*SHAPES, "learned-euler-norm_add"])
def test_cached_equals_uncached_at_fixed_depth(overrides):
    model = fixed_depth_model(**overrides)
    idx = torch.randint(0, 17, (3, 5))
    out, stats = generate_cached(model, idx, 12, temperature=0)
    assert torch.equal(out, model.generate(idx, 12, temperature=0, use_cache=False))
    assert torch.equal(out, model.generate(idx, 12, temperature=0))  # the default is the cache
    assert stats.steps.shape == (3, 5 + 12 - 1) and (stats.steps == 4).all() and stats.loops_per_token == 4.0


def test_cached_generation_past_block_size_reruns_the_cropped_context():
    model = fixed_depth_model(n_prelude=1, n_coda=1, block_size=8)
    idx = torch.randint(0, 17, (2, 5))
    out = model.generate(idx, 10, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out, model.generate(idx, 10, temperature=0, use_cache=False))


@pytest.mark.parametrize("criterion", ["entropy", "delta", "kl"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_latest_fill_with_halting_equals_uncached_generation(shape, criterion):
    """A halted token offers its last loop's keys and values to later loops, at every layer (and
    every coda layer of the readout), as in forward."""
    model = sharpened_model(criterion, block_size=32, **SHAPES[shape])
    idx = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(4))
    out, stats = generate_cached(model, idx, 14, temperature=0)
    assert len(stats.steps.unique()) >= 2, "the test needs tokens that halt after different loops"
    assert torch.equal(out, model.generate(idx, 14, temperature=0, use_cache=False))
    assert stats.halting and stats.budget == MAX_LOOPS and 1 <= stats.loops_per_token <= MAX_LOOPS


def test_ring_interpolates_between_last_and_latest_and_bounds_memory():
    model = sharpened_model("entropy", block_size=32)
    idx = torch.randint(0, 17, (2, 5))
    runs = {name: generate_cached(model, idx, 12, temperature=0, fill=fill, ring_size=k)
            for name, fill, k in [("latest", "latest", None), ("last", "last", None), ("ring1", "ring", 1),
                                  ("ring_full", "ring", MAX_LOOPS), ("ring2", "ring", 2)]}
    assert torch.equal(runs["ring1"][0], runs["last"][0])
    assert torch.equal(runs["ring_full"][0], runs["latest"][0])
    assert not torch.equal(runs["last"][0], runs["latest"][0]), "reading only final entries changes this model"
    kv_bytes = {name: stats.cache_bytes for name, (_, stats) in runs.items()}
    assert kv_bytes["last"] < kv_bytes["ring2"] < kv_bytes["latest"] == kv_bytes["ring_full"]
    assert [runs[n][1].slots for n in ("last", "ring2", "latest")] == [1, 2, MAX_LOOPS]


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_fill_policies_read_the_documented_entries(slots):
    """Entry e of position p holds 100 e + p; reading loop t must give e = clamp(t, n - slots + 1, n)."""
    budget = 5
    steps = torch.tensor([[5, 1, 3, 4]], dtype=torch.int32)  # a token has one entry per loop it ran
    entries = steps
    cache = LoopKVCache(n_layer=1, slots=slots, batch=1, max_len=5, n_embd=2, budget=budget,
                        dtype=torch.float32, device=torch.device("cpu"))
    cache.begin(4)
    for e in range(1, budget + 1):  # in loop order, as the loop writes them
        rows = (entries[0] >= e).nonzero().squeeze(1)
        value = (100.0 * e + rows.float())[:, None].expand(-1, 2)
        cache.store(0, e, rows, value, -value)
    cache.commit(steps)
    for t in range(1, budget + 1):
        keys, values = cache.past(0, t)[:2]
        expected = torch.clamp(torch.tensor(t), entries[0] - slots + 1, entries[0])
        assert keys[0, :, 0].tolist() == (100.0 * expected + torch.arange(4)).tolist(), f"loop {t}"
        assert torch.equal(values, -keys)


def test_thresholds_after_a_trigger_token_apply_to_the_right_tokens():
    """Without '=' every token is sure at once; from '=' on (token 3) tokens think to the budget."""
    model = sharpened_model("entropy", threshold=100.0, block_size=32, halt_thresholds_after={3: 0.0})
    idx = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 4, 4, 5]])
    out, stats = generate_cached(model, idx, 6, temperature=0)
    assert torch.equal(out, model.generate(idx, 6, temperature=0))
    assert (stats.steps[0, :2] == 1).all() and (stats.steps[0, 2:] == MAX_LOOPS).all()
    triggered = (out[1, :-1] == 3).long().cummax(0).values.bool()  # the model may write '=' itself
    assert torch.equal(stats.steps[1], torch.where(triggered, MAX_LOOPS, 1).int())


@pytest.mark.parametrize("generate", ["cached", "static-stop_early"])
def test_batched_generation_stops_computing_exited_rows(generate):
    model = sharpened_model("entropy", threshold=100.0, block_size=32, halt_thresholds_after={3: 0.0})
    idx = torch.tensor([[3, 1], [1, 2]])  # row 0 thinks to the budget, row 1 stops after one loop
    rows = {}
    model.set_backend(counting(get_backend("torch"), rows))
    new = 4
    if generate == "cached":
        steps = generate_cached(model, idx, new, temperature=0)[1].steps
    else:
        steps = generate_static(model, idx, new, temperature=0, stop_early=True)[1]
    assert (steps[0] == MAX_LOOPS).all() and steps[1, 0] == 1
    assert rows["mlp"] == steps.sum().item() < steps.numel() * MAX_LOOPS  # none for exited rows


@pytest.mark.parametrize("kwargs,message", [
    (dict(fill="all"), "fill must be one of"),
    (dict(fill="ring"), "fill='ring' needs ring_size"),
    (dict(fill="latest", ring_size=2), "ring_size is for fill='ring'"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = {"max_new_tokens": 3, "temperature": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_cached(fixed_depth_model(), torch.zeros(1, 2, dtype=torch.long), **args)


# ---- decode as one step over static caches (generate_static, the default)

@pytest.mark.parametrize("halting,stop_early", [(False, False), (True, False), (True, True)],
                         ids=["fixed", "halting-masked", "halting-stop_early"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_static_decode_equals_cached_generation(shape, halting, stop_early):
    """The one-step decode (masked loops per token, or stopping when every row has halted) gives
    today's cached generation token for token, and the same loops per fed token, at fixed depth
    and with halting."""
    model = sharpened_model("entropy", block_size=32, **SHAPES[shape]) if halting else \
        fixed_depth_model(**SHAPES[shape])
    idx = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(4))
    out, steps = generate_static(model, idx, 14, temperature=0, stop_early=stop_early)
    expected, stats = generate_cached(model, idx, 14, temperature=0)
    assert torch.equal(out, expected) and torch.equal(steps, stats.steps)
    assert len(steps.unique()) >= (2 if halting else 1)
    torch.manual_seed(3)
    sampled, _ = generate_static(model, idx, 14, temperature=0.8, top_k=5, stop_early=stop_early)
    torch.manual_seed(3)
    assert torch.equal(sampled, generate_cached(model, idx, 14, temperature=0.8, top_k=5)[0])


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "tile"])
def test_decode_step_reads_nothing_on_the_host(backend):
    """Per backend: no host read in a decode step, halting included; the tokens equal the cached
    generation's. (A kernel backend's own reads in the interpreter or emulator are not counted.)"""
    backend, device = backend_or_skip(backend), device_for(backend)
    model = sharpened_model("entropy", block_size=16, max_loops=3).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(4)).to(device)
    decoder = Decoder(model, 2, 8, budget=3, halting=True, temperature=0, top_k=None)
    tokens = [decoder.prefill(idx, None)[0]]
    with count_host_syncs() as syncs:
        for _ in range(3):
            tokens.append(decoder.step(tokens[-1], None)[0])
    assert syncs.count == 0, syncs.ops
    expected, stats = generate_cached(model, idx, 4, temperature=0)
    assert torch.equal(torch.cat([idx, *tokens], dim=1), expected)
    assert len(stats.steps.unique()) >= 2, "the test needs tokens that halt after different loops"


@pytest.mark.parametrize("shape,new", [("1L", 200), ("2L-prelude-coda", 30), ("3L-coda2", 30)])
@pytest.mark.parametrize("halting", [False, True], ids=["fixed", "halting"])
def test_compiled_decode_step_is_one_graph_for_every_token(halting, shape, new):
    """torch.compile(fullgraph=True) of the decode step: one graph, never recompiled (over 200 tokens
    for one layer; the position and the halting state live on the device), equal to the cached
    generation. Dynamo's capture is what is checked, the graph run eagerly under a CUDA graph's
    rules (`cuda_graph_rules`: outputs overwritten by the next step, no write to a non-static input)."""
    torch._dynamo.reset()
    model = sharpened_model("entropy", block_size=208, max_loops=3, **SHAPES[shape]) if halting else \
        fixed_depth_model(block_size=208, n_loops=3, **SHAPES[shape])
    idx = torch.randint(0, 17, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, steps = generate_static(model, idx, new, temperature=0, compile=True, compiler=cuda_graph_rules)
    expected, stats = generate_cached(model, idx, new, temperature=0)
    assert torch.equal(out, expected) and torch.equal(steps, stats.steps)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "tile"])
@pytest.mark.parametrize("halting", [False, True], ids=["fixed", "halting"])
def test_compiled_decode_step_on_every_backend(backend, halting):
    """Per backend: the decode step compiles to one graph (fullgraph, no recompile as the cache
    fills), a kernel backend's ops as custom ops whose attention reads the filled places of the
    static caches through key_len, and gives the cached generation token for token with the same
    loops per token, under a CUDA graph's rules (`cuda_graph_rules`). A prelude and a coda: every
    cache kind (core, prelude, coda)."""
    backend, device = backend_or_skip(backend), device_for(backend)
    torch._dynamo.reset()
    shape = dict(n_layer=1, n_prelude=1, n_coda=1, block_size=16)
    model = sharpened_model("entropy", max_loops=3, **shape) if halting else fixed_depth_model(n_loops=3, **shape)
    model = model.to(device).set_backend(backend)
    idx = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(5)).to(device)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, steps = generate_static(model, idx, 6, temperature=0, compile=True, compiler=cuda_graph_rules)
    expected, stats = generate_cached(model, idx, 6, temperature=0)
    assert torch.equal(out, expected) and torch.equal(steps, stats.steps)
    assert len(steps.unique()) >= (2 if halting else 1)
    torch._dynamo.reset()


def test_compiled_decode_step_with_trigger_thresholds_keeps_cuda_graph_rules():
    """A trigger token's threshold (halt_thresholds_after, as the addition task's '=') is state the
    step writes on the device: a static input, so that inductor still captures the step in a CUDA
    graph; the tokens and loops equal the cached generation's, the trigger included."""
    torch._dynamo.reset()
    model = sharpened_model("entropy", threshold=100.0, block_size=32, halt_thresholds_after={3: 0.0})
    idx = torch.tensor([[1, 2, 3, 4], [1, 2, 4, 4]])
    out, steps = generate_static(model, idx, 6, temperature=0, compile=True, compiler=cuda_graph_rules)
    expected, stats = generate_cached(model, idx, 6, temperature=0)
    assert torch.equal(out, expected) and torch.equal(steps, stats.steps)
    assert (steps[0, 2:] == MAX_LOOPS).all() and steps[1, 0] == 1  # the trigger took effect in the step
    torch._dynamo.reset()


def test_cuda_graph_rules_catch_what_a_replayed_graph_breaks():
    """The backend the compiled-step tests run under fails code that would break under a CUDA graph:
    an output kept past the next call holds the next call's values, and a write to a non-static
    input is refused; a static one (mark_static_address) is allowed."""
    torch._dynamo.reset()
    counter = torch.zeros(())

    @torch.compile(backend=cuda_graph_rules, fullgraph=True)
    def count(x: torch.Tensor) -> torch.Tensor:
        counter.add_(1)
        return x + counter

    with pytest.raises(CudaGraphRuleBroken, match="not static"):
        count(torch.zeros(2))
    torch._dynamo.reset()
    torch._dynamo.mark_static_address(counter)
    first = count(torch.zeros(2))
    kept = first.clone()
    second = count(torch.zeros(2))
    assert first is second and torch.equal(first, kept + 1)  # the first call's output was overwritten
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU (on the CPU the "
                    "compiled-step tests hold the step to a CUDA graph's rules, looplm.testing.cuda_graph_rules)")
@pytest.mark.parametrize("backend", ["torch", "triton", "tile"])
def test_decode_step_is_captured_in_a_cuda_graph(backend):
    """On a GPU, generate's default: the step compiled by inductor with mode="reduce-overhead" is
    captured in a CUDA graph (inductor skips none, for whatever reason it would give) and its replays
    give the cached generation's tokens and loops, with halting and a trigger token's threshold."""
    from torch._dynamo.utils import counters
    backend, device = backend_or_skip(backend), device_for(backend)
    if device.type != "cuda":
        pytest.skip(f"backend {backend.name!r} runs on {device.type} here, not natively on the GPU")
    torch._dynamo.reset()
    counters.clear()
    model = sharpened_model("entropy", threshold=100.0, block_size=32, halt_thresholds_after={3: 0.0})
    model = model.to(device).set_backend(backend)
    idx = torch.tensor([[1, 2, 3, 4], [1, 2, 4, 4]], device=device)
    out, steps = generate_static(model, idx, 8, temperature=0, compile=True)
    expected, stats = generate_cached(model, idx, 8, temperature=0)
    assert torch.equal(out, expected) and torch.equal(steps, stats.steps)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran the step without a CUDA graph (its log says why)"
    torch._dynamo.reset()


def test_compiled_decoders_of_alternating_backends_are_each_reused():
    """Calls that alternate between backends (as a benchmark's interleaved rounds do) each get their
    own decoder back, its static caches where they were (what a captured CUDA graph replays over),
    and compile once per backend, however often they alternate."""
    torch._dynamo.reset()
    compiled = []

    def counting_compiler(graph: torch.fx.GraphModule, example_inputs) -> object:
        compiled.append(graph)
        return graph.forward
    model = fixed_depth_model(block_size=32, n_loops=2)
    idx = torch.randint(0, 17, (1, 4), generator=torch.Generator().manual_seed(6))
    expected = generate_cached(model, idx, 5, temperature=0)[0]
    decoders = {}
    for backend in ("torch", "reference", "torch", "reference", "torch"):
        decoder = Decoder.for_model(model.set_backend(backend), 1, 32, 2, False, 0, None, compile=True,
                                    compiler=counting_compiler)
        assert decoders.setdefault(backend, decoder) is decoder
        out = generate_static(model, idx, 5, temperature=0, compile=True, compiler=counting_compiler)[0]
        assert torch.equal(out, expected)
    assert len(compiled) == 2
    torch._dynamo.reset()


def test_compiled_decoder_made_under_inference_mode_serves_a_call_outside_it():
    """A kept decoder's caches are written in place by every later call: made by a call under
    torch.inference_mode, they must still take a call without it (an inference tensor refuses an
    in-place write outside inference mode), and the other way round."""
    torch._dynamo.reset()
    model = fixed_depth_model(block_size=32, n_loops=2)
    idx = torch.randint(0, 17, (1, 4), generator=torch.Generator().manual_seed(6))
    expected = generate_cached(model, idx, 5, temperature=0)[0]
    for inference in (True, False, True):
        with torch.inference_mode(inference):
            out = generate_static(model, idx, 5, temperature=0, compile=True, compiler=cuda_graph_rules)[0]
        assert torch.equal(out, expected)
    torch._dynamo.reset()


def test_compiled_decoder_is_reused_by_the_next_call():
    """A second generation with the same model and arguments replays the compiled step: no new
    compile, whatever the prompt's length, and the same tokens as a fresh cache."""
    torch._dynamo.reset()
    model = fixed_depth_model(block_size=32, n_loops=2)
    first = torch.randint(0, 17, (1, 4), generator=torch.Generator().manual_seed(6))
    out = generate_static(model, first, 6, temperature=0, compile=True, compiler="eager")[0]
    assert torch.equal(out, generate_cached(model, first, 6, temperature=0)[0])
    second = torch.randint(0, 17, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = generate_static(model, second, 9, temperature=0, compile=True, compiler="eager")[0]
    assert torch.equal(out, generate_cached(model, second, 9, temperature=0)[0])
    torch._dynamo.reset()
