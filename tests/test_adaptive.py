"""Halting that saves compute: the compacted loop against the masked loop, the reference semantics,
on every backend, for every model shape and criterion (looplm.engine)."""
from __future__ import annotations

import pytest
import torch

from looplm import LoopConfig, LoopGPT, LoopTrace
from looplm import halting as halting_rules
from looplm.backends import Backend, get_backend
from looplm.engine import run_loop
from looplm.halting import CapacityPlan, CapacityPlans, capacity_reads, running_counts
from looplm.ops import OP_NAMES
from looplm.testing import assert_close, backend_or_skip, count_host_syncs, cuda_graph_rules, device_for
from tests.models import sharpen

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

# Thresholds at which this seed's sharpened tiny model halts tokens after many different loop counts.
CRITERIA = {"entropy": 2.65, "confidence": 0.15, "delta": 0.35, "kl": 0.01, "gate": 0.7}
# A threshold no score passes (criterion units): tokens given it think to the budget.
NEVER = {"entropy": 0.0, "confidence": 1.0, "delta": 0.0, "kl": 0.0, "gate": 1.0}
MAX_LOOPS = 8
SHAPES = {  # n_layer 1, 2 and 3, with prelude and coda
    "1L": dict(n_layer=1),
    "2L-prelude-coda": dict(n_layer=2, n_prelude=1, n_coda=1),
    "3L-coda2": dict(n_layer=3, n_coda=2),
}


def sharpened_model(criterion: str = "entropy", threshold: float | None = None, **overrides) -> LoopGPT:
    """A tiny model whose weights are scaled up, so that tokens grow sure at different loops."""
    torch.manual_seed(0)
    base = dict(vocab_size=17, block_size=16, n_embd=32, n_head=4, n_layer=1, n_loops=3, max_loops=MAX_LOOPS,
                step_encoding="learned", halt=criterion, halt_threshold=threshold or CRITERIA[criterion])
    model = LoopGPT(LoopConfig(**{**base, **overrides})).eval()
    sharpen(model)
    with torch.no_grad():
        if criterion == "gate":
            model.halt_gate.weight.normal_(0.0, 0.3)
            model.halt_gate.bias.zero_()
    return model


def mixed_thresholds(criterion: str, idx: torch.Tensor) -> torch.Tensor:
    """The criterion's threshold for most tokens, and one no score passes for every third."""
    thresholds = torch.full(idx.shape, CRITERIA[criterion])
    thresholds[:, ::3] = NEVER[criterion]
    return thresholds


def run_both(model: LoopGPT, idx: torch.Tensor, **loop_kwargs) -> tuple[tuple, tuple]:
    """(state, trace) of the masked loop and of the compacted loop, from the same start."""
    results = []
    for compact in (False, True):
        trace = LoopTrace(steps=torch.empty(0))
        torch.manual_seed(1)  # the same noise for a noise-initialised state
        with torch.no_grad():
            h = model.loop(model.embed(idx), idx, model.config.max_loops, True, trace=trace, compact=compact,
                           **loop_kwargs)
        results.append((h, trace))
    return results[0], results[1]


def assert_same_run(masked: tuple, compacted: tuple) -> None:
    (h_ref, ref), (h, got) = masked, compacted
    assert torch.equal(got.steps, ref.steps), "tokens halted after different loop counts"
    assert got.loops_run == ref.loops_run
    for t in range(ref.loops_run):
        assert torch.equal(got.active[t], ref.active[t]), f"loop {t + 1}: different tokens active"
        assert_close(got.entropy[t], ref.entropy[t], composed=True, msg=f"loop {t + 1} entropy")
        assert_close(got.delta[t], ref.delta[t], composed=True, msg=f"loop {t + 1} state change")
    assert_close(h, h_ref, composed=True, msg="final states")


def assert_mixed_halting(trace: LoopTrace, max_loops: int) -> None:
    steps = trace.steps
    assert (steps < max_loops).any() and (steps == max_loops).any(), f"steps {steps.unique().tolist()}"
    assert len(steps.unique()) >= 2


# The PyTorch backends run every (shape, criterion); the kernels, interpreted or emulated on a CPU
# and slow there, every shape and every criterion once.
KERNEL_CASES = [("1L", "gate"), ("1L", "confidence"), ("1L", "kl"), ("2L-prelude-coda", "delta"),
                ("3L-coda2", "entropy")]
TIER2_CASES = [(backend, shape, criterion) for backend in ("torch", "reference") for shape in SHAPES
               for criterion in sorted(CRITERIA)]
TIER2_CASES += [(backend, shape, criterion) for backend in ("triton", "tile") for shape, criterion in KERNEL_CASES]


@pytest.mark.parametrize("backend,shape,criterion", TIER2_CASES)
def test_hierarchical_parity_tier2_compacted_equals_masked(backend, shape, criterion):
    """Per backend, model shape and criterion: the compacted loop halts the same tokens after the
    same loops as the masked loop, with the same traces and states."""
    kernel = backend in ("triton", "tile")
    max_loops = 5 if kernel else MAX_LOOPS
    backend, device = backend_or_skip(backend), device_for(backend)
    model = sharpened_model(criterion, max_loops=max_loops, **SHAPES[shape]).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 10) if kernel else (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    masked, compacted = run_both(model, idx, thresholds=mixed_thresholds(criterion, idx).to(device))
    assert_mixed_halting(masked[1], max_loops)
    assert_same_run(masked, compacted)


@pytest.mark.parametrize("overrides", [
    dict(inject="norm_add", step_encoding="sinusoidal", update="euler"),
    dict(state_init="noise", n_prelude=1, min_loops=2),
    dict(state_init="embed", inject="none", step_encoding="none", halt_thresholds_after={3: 2.5}),
], ids=["norm_add-sinusoidal-euler", "noise-prelude-min_loops", "embed-none-trigger"])
def test_hierarchical_parity_tier2_compacted_loop_per_config(overrides):
    model = sharpened_model("entropy", **overrides)
    idx = torch.randint(0, 17, (3, 11), generator=torch.Generator().manual_seed(3))
    masked, compacted = run_both(model, idx)
    assert len(masked[1].steps.unique()) >= 2
    assert_same_run(masked, compacted)


def counting(backend: Backend, rows: dict[str, int]) -> Backend:
    """`backend` with every op counting the rows (leading elements) it is given; the MLP's first
    linear (the one with a GELU) counts as "mlp"."""
    def wrap(name, op):
        def counted(x, *args, **kwargs):
            key = "mlp" if kwargs.get("activation") == "gelu" else name
            rows[key] = rows.get(key, 0) + x.numel() // x.size(-1)
            return op(x, *args, **kwargs)
        return counted
    return Backend("counting", {name: wrap(name, op) for name, op in backend.ops.items()},
                   differentiable=frozenset(OP_NAMES))


@pytest.mark.parametrize("shape", ["1L", "2L-prelude-coda"])
def test_compaction_skips_the_work_of_halted_tokens(shape):
    """Half the tokens halt after one loop: the compacted loop runs the MLP, the readout and the
    halting update on the active tokens only; the masked loop on every token every loop."""
    model = sharpened_model("entropy", **SHAPES[shape])
    idx = torch.randint(0, 17, (2, 12))
    thresholds = torch.zeros(idx.shape)
    thresholds[:, ::2] = 100.0  # entropy is always below: these halt after loop 1; the rest never halt
    rows = {False: {}, True: {}}
    outputs = {}
    for compact in (False, True):
        model.set_backend(counting(get_backend("torch"), rows[compact]))
        with torch.no_grad():
            outputs[compact] = model.loop(model.embed(idx), idx, MAX_LOOPS, True, thresholds, compact=compact)
    assert_close(outputs[True], outputs[False], composed=True)
    n_layer, n_coda = model.config.n_layer, model.config.n_coda
    token_loops = idx.numel() * MAX_LOOPS
    active_token_loops = idx.numel() // 2 * (1 + MAX_LOOPS)
    for compact, expected in ((False, token_loops), (True, active_token_loops)):
        counted = rows[compact]
        assert counted["halt_update"] == counted["softmax_entropy"] == expected, compact
        assert counted["mlp"] == (n_layer + n_coda) * expected, compact  # the coda runs in the readout


def test_forward_runs_the_compacted_loop_by_default():
    """The model's own call, in eval and in training with forced halting, runs the core for the
    active tokens only, and training still reaches the weights."""
    model = sharpened_model("entropy")
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(4))
    thresholds = torch.zeros(idx.shape)
    thresholds[:, ::2] = 100.0  # these halt after loop 1; the rest never halt
    active_token_loops = idx.numel() // 2 * (1 + MAX_LOOPS)
    for training in (False, True):
        rows = {}
        model.train(training).set_backend(counting(get_backend("torch"), rows))
        model.zero_grad()
        with torch.set_grad_enabled(training):
            _, loss, trace = model(idx, idx, halting=True, thresholds=thresholds, return_trace=True)
        assert (trace.steps[:, ::2] == 1).all() and (trace.steps[:, 1::2] == MAX_LOOPS).all()
        assert rows["halt_update"] == active_token_loops, f"training={training}: the masked loop ran"
        if training:
            loss.backward()
            assert model.transformer.core[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_compacted_loop_keeps_gradients():
    """Training with forced halting: the compacted loop gives the masked loop's gradients, also
    with truncated backprop, whose detach must cut the kept keys and values too."""
    model = sharpened_model("entropy", n_layer=2, n_coda=1).train()
    idx = torch.randint(0, 17, (2, 10))
    thresholds = mixed_thresholds("entropy", idx)
    grads = {}
    for compact in (False, True):
        model.zero_grad()
        states = []
        h = model.loop(model.embed(idx), idx, MAX_LOOPS, True, thresholds, states=states, grad_loops=3,
                       compact=compact)
        (model.head(h).logsumexp(-1).sum() + sum(s.square().mean() for s in states)).backward()
        grads[compact] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert_close(grads[True][name], grad, composed=True, msg=name)


def test_readout_is_computed_only_when_needed():
    """delta and gate halting without a trace read nothing out; the readout criteria once a loop."""
    idx = torch.randint(0, 17, (2, 12))
    for criterion, readouts in (("delta", 0), ("gate", 0), ("entropy", 1), ("kl", 0)):
        model = sharpened_model(criterion)
        rows = {}
        model.set_backend(counting(get_backend("torch"), rows))
        with torch.no_grad():
            model.loop(model.embed(idx), idx, MAX_LOOPS, True)
        assert ("softmax_entropy" in rows) == bool(readouts), criterion  # kl takes one log-softmax instead


@pytest.mark.parametrize("criterion", ["entropy", "kl"])
def test_no_readout_before_a_token_may_halt(criterion):
    """Before min_loops (for KL, the loop before it) the loop reads nothing out and scores nothing,
    and that changes no result: the forward equals one whose trace makes it read out every loop."""
    min_loops, budget = 3, 5
    model = sharpened_model(criterion, min_loops=min_loops)
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(0))
    thresholds = torch.full(idx.shape, NEVER[criterion])  # no token halts: every loop's readout is counted
    readouts, logits = [], model.logits
    model.logits = lambda h: readouts.append(h.size(0)) or logits(h)
    with torch.no_grad():
        plain = model(idx, halting=True, n_loops=budget, thresholds=thresholds)[0]
        loop_readouts = len(readouts) - 1  # less the final head's
        traced = model(idx, halting=True, n_loops=budget, thresholds=thresholds, return_trace=True)[0]
    assert loop_readouts == budget - halting_rules.first_scored_loop(criterion, min_loops) + 1
    assert loop_readouts == budget - min_loops + 1 + (criterion == "kl")
    assert torch.equal(plain, traced)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "tile"])
def test_halting_loop_reads_the_device_only_at_its_capacity_reads(backend):
    """No loop waits on the host: the masked loop never reads the device, whatever halts; the
    compacted loop reads once at each of its capacity reads (after loops 1, 2, 4 of 8), not per loop.
    A kernel backend's own host reads (the Triton interpreter, the cuTile emulator) are not the loop's."""
    kernel = backend in ("triton", "tile")
    backend, device = backend_or_skip(backend), device_for(backend)
    model = sharpened_model("entropy", max_loops=4 if kernel else MAX_LOOPS).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 6) if kernel else (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    thresholds = mixed_thresholds("entropy", idx).to(device)
    n_loops = model.config.max_loops
    bar = model.halt_bar(idx, thresholds)
    with torch.no_grad():
        x0 = model.embed(idx)
        for compact in (False, True):
            with count_host_syncs() as syncs:
                _, steps = run_loop(model, x0, n_loops, bar, compact=compact)
            reads = capacity_reads(model.config.min_loops, n_loops) if compact else ()
            assert len(steps.unique()) >= 2, "the test needs tokens that halt after different loops"
            assert 0 < syncs.count <= len(reads) if compact else syncs.count == 0, (compact, syncs.ops)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "tile"])
def test_planned_halting_reads_once_a_forward_and_reruns_what_overflows(backend):
    """With the plan the forward before recorded, the compacted loop takes its slots from the plan
    and reads the device once a forward, at its end, with the masked loop's result. A forward that
    runs more tokens than its plan has slots for is found out by that read, rerun reading as it
    goes (the same result again), and widens the plans that follow."""
    kernel = backend in ("triton", "tile")
    backend, device = backend_or_skip(backend), device_for(backend)
    model = sharpened_model("entropy", max_loops=4 if kernel else MAX_LOOPS).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 6) if kernel else (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    n_loops, key = model.config.max_loops, (*idx.shape, model.config.max_loops)
    most_halt = torch.full(idx.shape, 2.75)  # most tokens stop after loop 1, the rest after 2 to 8
    fewer_halt = most_halt.clone()
    fewer_halt[:, ::3] = NEVER["entropy"]
    most_halt, fewer_halt = (model.halt_bar(idx, x.to(device)) for x in (most_halt, fewer_halt))
    plans, reads = CapacityPlans(), capacity_reads(model.config.min_loops, n_loops)
    with torch.no_grad():
        x0 = model.embed(idx)
        for bar in (most_halt, fewer_halt):
            h_ref, steps_ref = run_loop(model, x0, n_loops, bar, compact=False)
            with count_host_syncs() as syncs:  # no plan yet, or one with too few slots
                h, steps = run_loop(model, x0, n_loops, bar, plans=plans)
            assert 1 < syncs.count <= 2 * len(reads) + 2, syncs.ops
            assert torch.equal(steps, steps_ref)
            assert_close(h, h_ref, composed=True)
            assert plans.get(key).shrinks(idx.numel(), idx.size(1)), "the test needs a plan whose slots shrink"
            with count_host_syncs() as syncs:  # the plan fits: one read
                h, steps = run_loop(model, x0, n_loops, bar, plans=plans)
            assert syncs.count == 1, syncs.ops
            assert torch.equal(steps, steps_ref)
            assert_close(h, h_ref, composed=True)
    assert plans.get(key).slack == 1 / 16, "the second set of thresholds overflowed the first's plan"
    assert model.capacity_plans.get(key) is None
    with torch.no_grad():
        model(idx, halting=True)  # the model's forward keeps its own plans
    assert model.capacity_plans.get(key) is not None


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_planned_halting_equals_the_masked_loop_for_every_criterion_and_shape(criterion, shape):
    """A plan's slots, spare ones included (the slack after an overflow), give the masked loop's
    result for every criterion (KL's kept distributions too) and model shape (core layers, prelude,
    coda): the plan from one set of thresholds, then another that overflows it and is rerun, then
    the widened plan that fits with spare slots."""
    model = sharpened_model(criterion, **SHAPES[shape])
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(3))
    uniform = torch.full(idx.shape, CRITERIA[criterion])
    plans, n_loops = CapacityPlans(), model.config.max_loops
    with torch.no_grad():
        x0 = model.embed(idx)
        for thresholds in (uniform, mixed_thresholds(criterion, idx), mixed_thresholds(criterion, idx)):
            bar = model.halt_bar(idx, thresholds)
            h_ref, steps_ref = run_loop(model, x0, n_loops, bar, compact=False)
            h, steps = run_loop(model, x0, n_loops, bar, plans=plans)
            assert torch.equal(steps, steps_ref)
            assert_close(h, h_ref, composed=True)


def frozen_plan_case(backend: Backend = None):
    """A model on `backend` (None: torch) with a plan recorded, by that backend on its device,
    where most tokens stop after loop 1, frozen; and thresholds under which every third token
    never stops: more tokens run than the plan has slots for. Tensors on the backend's device."""
    backend = backend or get_backend("torch")
    kernel, device = backend.name in ("triton", "tile"), device_for(backend)
    model = sharpened_model("entropy", max_loops=4 if kernel else MAX_LOOPS).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 6) if kernel else (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    most_halt = torch.full(idx.shape, 2.75, device=device)
    fewer_halt = most_halt.clone()
    fewer_halt[:, ::3] = NEVER["entropy"]
    with torch.no_grad():
        model(idx, halting=True, thresholds=most_halt)
    model.capacity_plans.freeze()
    return model, idx, most_halt, fewer_halt


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "tile"])
def test_frozen_plan_reads_nothing_and_stops_the_tokens_it_has_no_slot_for(backend):
    """Frozen, the plan's forward never reads the device. Where its slots fit, it is the masked
    loop; where they do not, the tokens without a slot stop at that loop with the state they had
    there, the others run on, and the device counts the stopped ones."""
    backend = backend_or_skip(backend)
    model, idx, most_halt, fewer_halt = frozen_plan_case(backend)
    n_loops, plans = model.config.max_loops, model.capacity_plans
    plan = plans.get((*idx.shape, n_loops))
    first_shrink = min(plan.shrinks(idx.numel(), idx.size(1)))
    slots, slots_in_row = plan.shrinks(idx.numel(), idx.size(1))[first_shrink]
    with torch.no_grad():
        x0 = model.embed(idx)
        for thresholds in (most_halt, fewer_halt):
            bar = model.halt_bar(idx, thresholds)
            states: list[torch.Tensor] = []
            h_ref, steps_ref = run_loop(model, x0, n_loops, bar, compact=False, states=states)
            model.capacity_dropped.zero_()
            with count_host_syncs() as syncs:
                h, steps = run_loop(model, x0, n_loops, bar, plans=plans)
            assert syncs.count == 0, syncs.ops
            if thresholds is most_halt:  # the plan's own forward: its slots fit
                assert torch.equal(steps, steps_ref) and int(model.capacity_dropped) == 0
                assert_close(h, h_ref, composed=True)
                continue
            # Up to the first shrink both runs are one; there the plan keeps, in token order, at
            # most slots_in_row tokens of a row and slots in all, and the rest stop.
            running = (steps_ref > first_shrink).view(idx.shape).cpu()
            within = (running & (running.cumsum(1) <= slots_in_row)).view(-1)
            kept = torch.zeros_like(within)
            kept[within.nonzero().view(-1)[:slots]] = True
            stopped = running.view(-1) & ~kept
            assert stopped.any(), "the test needs tokens the plan has no slot for"
            assert (steps.cpu()[stopped] == first_shrink).all()
            assert int(model.capacity_dropped) >= int(stopped.sum())
            h, before = h.reshape(-1, h.size(-1)).cpu(), states[first_shrink - 1].reshape(-1, h.size(-1)).cpu()
            assert_close(h[stopped], before[stopped], composed=True, msg="a stopped token keeps its state")
    assert plans.get((*idx.shape, n_loops)) == plan, "a frozen plan does not change"


def test_frozen_plan_compiles_whole_once_and_its_compute_falls():
    """Under torch.compile(fullgraph=True), a frozen plan's forward is one graph (no host read),
    equal to the eager one, replayed unchanged as the share of halting tokens changes; it runs the
    readout on the plan's slots, fewer than the tokens (without a plan a compiled forward runs
    every token every loop)."""
    torch._dynamo.reset()
    model, idx, most_halt, fewer_halt = frozen_plan_case()
    cases = [most_halt, fewer_halt, torch.full(idx.shape, NEVER["entropy"])]  # fitting, not, none halting
    with torch.no_grad():
        eager = []
        for thresholds in cases:
            model.capacity_dropped.zero_()
            eager.append((model(idx, halting=True, thresholds=thresholds)[0], int(model.capacity_dropped)))
        assert eager[0][1] == 0 and eager[1][1] > 0
        compiled = torch.compile(model, fullgraph=True, backend=cuda_graph_rules)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for thresholds, (logits, dropped) in zip(cases, eager):
                model.capacity_dropped.zero_()
                assert_close(compiled(idx, halting=True, thresholds=thresholds)[0], logits, composed=True)
                assert int(model.capacity_dropped) == dropped
    torch._dynamo.reset()
    rows, logits = [], model.logits
    model.logits = lambda h: rows.append(h.size(0)) or logits(h)
    with torch.no_grad():
        model(idx, halting=True, thresholds=most_halt)
    assert min(rows) < idx.numel() / 2, rows


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("shape", ["1L", "2L-prelude-coda"])
def test_frozen_plan_compiles_whole_for_every_criterion_and_shape(criterion, shape):
    """Every criterion (KL's kept distributions, the gate, the readout through a coda) on a frozen
    plan: one graph, equal to the eager forward and dropping the same tokens, whether the plan fits
    or not."""
    torch._dynamo.reset()
    model = sharpened_model(criterion, **SHAPES[shape])
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(2))
    uniform = torch.full(idx.shape, CRITERIA[criterion])
    compiled = torch.compile(model, fullgraph=True, backend=cuda_graph_rules)
    with torch.no_grad():
        model(idx, halting=True, thresholds=uniform)
        model.capacity_plans.freeze()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for thresholds in (uniform, mixed_thresholds(criterion, idx)):
                results = []
                for forward in (model, compiled):
                    model.capacity_dropped.zero_()
                    results.append((forward(idx, halting=True, thresholds=thresholds)[0], int(model.capacity_dropped)))
                (eager, dropped), (graph, graph_dropped) = results
                assert_close(graph, eager, composed=True)
                assert graph_dropped == dropped
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU (on the CPU the "
                    "compiled-forward tests hold the graph to a CUDA graph's rules, looplm.testing.cuda_graph_rules)")
@pytest.mark.parametrize("backend", ["torch", "triton", "tile"])
def test_frozen_plan_forward_is_captured_in_a_cuda_graph(backend):
    """On a GPU, torch.compile(mode="reduce-overhead") of a frozen plan's forward is captured in a
    CUDA graph (inductor skips none) and its replays equal the eager forward, dropping the same
    tokens, whether the plan's slots fit or not."""
    from torch._dynamo.utils import counters
    backend = backend_or_skip(backend)
    if device_for(backend).type != "cuda":
        pytest.skip(f"backend {backend.name!r} runs on the CPU here, not natively on the GPU")
    torch._dynamo.reset()
    counters.clear()
    model, idx, most_halt, fewer_halt = frozen_plan_case(backend)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for thresholds in (most_halt, fewer_halt, most_halt):
            results = []
            for forward in (model, compiled):
                model.capacity_dropped.zero_()
                logits = forward(idx, halting=True, thresholds=thresholds)[0].clone()
                results.append((logits, int(model.capacity_dropped)))
            (eager, dropped), (graph, graph_dropped) = results
            assert_close(graph, eager, composed=True)
            assert graph_dropped == dropped
    assert counters["inductor"]["cudagraph_skips"] == 0, \
        "inductor ran the forward without a CUDA graph (its log says why)"
    torch._dynamo.reset()


def test_capacity_plan_shrinks_by_a_quarter_or_to_none_and_widens_after_an_overflow():
    plan = CapacityPlan(running=(100, 90, 70, 40, 40, 0, 0), most_in_row=(30, 28, 20, 12, 12, 0, 0))
    assert plan.shrinks(100, 32) == {3: (70, 20), 4: (40, 12), 6: (0, 0)}
    wide = CapacityPlan(plan.running, plan.most_in_row, slack=1 / 8)  # 70 -> 79 slots: not 3/4 of 100
    assert wide.shrinks(100, 32) == {4: (45, 14), 6: (0, 0)}
    plans, key = CapacityPlans(), (4, 32, 8)
    plans.record(key, [5], [2], overflowed=False)
    assert plans.get(key).slack == 0
    for slack in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1 / 2):
        plans.record(key, [5], [2], overflowed=True)
        assert plans.get(key) == CapacityPlan((5,), (2,), slack)
    for T in range(1, CapacityPlans.MAX_SHAPES + 1):  # the oldest shape goes first
        plans.record((3, T, 8), [1], [1], overflowed=False)
    assert plans.get(key) is None and plans.get((3, 1, 8)) is not None


def test_running_counts_per_loop_and_most_in_a_row():
    steps = torch.tensor([[1, 3, 3, 2], [4, 4, 1, 1]], dtype=torch.int32)
    assert running_counts(steps, 4).tolist() == [[5, 4, 2], [3, 2, 2]]  # after loops 1, 2, 3


def test_host_sync_counter_counts_the_reads_a_gpu_would_wait_for():
    x = torch.randn(8)
    with count_host_syncs() as syncs:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        x[x > 0]
        x.unique()
        x.tolist()
        x.numpy()
    assert syncs.count == 7, syncs.ops
    with count_host_syncs() as syncs:
        torch.nonzero_static(x > 0, size=3)
        torch.where(x > 0, x, 0).sum()
        x.index_select(0, torch.tensor([1, 2]))
    assert syncs.count == 0, syncs.ops


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_halting_forward_compiles_whole_and_once(criterion):
    """torch.compile(fullgraph=True) captures the halting forward in one graph (no graph break: no
    host read), equal to the eager forward, and replays it as the share of halting tokens changes,
    from none to all (a recompile is an error). Dynamo's capture is what is checked, the graph run
    eagerly under a CUDA graph's rules (`looplm.testing.cuda_graph_rules`)."""
    torch._dynamo.reset()
    model = sharpened_model(criterion, n_layer=2, n_coda=1)
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, fullgraph=True, backend=cuda_graph_rules)
    thresholds = mixed_thresholds(criterion, idx)
    with torch.no_grad():
        logits, _, trace = model(idx, halting=True, thresholds=thresholds, return_trace=True)
        assert len(trace.steps.unique()) >= 2
        assert_close(compiled(idx, halting=True, thresholds=thresholds)[0], logits, composed=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            every = 1.0 if halting_rules.CRITERIA[criterion].higher_is_surer else 100.0
            for value in (NEVER[criterion], CRITERIA[criterion], every):  # none, some, every token halting early
                uniform = torch.full(idx.shape, value)
                assert_close(compiled(idx, halting=True, thresholds=uniform)[0],
                             model(idx, halting=True, thresholds=uniform)[0], composed=True)
    torch._dynamo.reset()
