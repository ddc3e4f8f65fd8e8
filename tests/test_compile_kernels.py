"""The kernel backends under torch.compile: every op is a torch.library custom op while traced
(one graph node, its fake implementation from `looplm.ops.FAKES`) and the plain launcher when called
eagerly (`looplm.backends.compilable`)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from looplm import backends
from looplm.backends import KERNEL_PACKAGES, kernel_ops
from looplm.ops import FAKES, OP_NAMES, BlockWeights, signature_mismatch
from looplm.testing import assert_close, backend_or_skip, device_for, dtype_problem
from tests.test_adaptive import NEVER, frozen_plan_case, sharpened_model

pytestmark = pytest.mark.filterwarnings("ignore:backend 'tile' runs its cuTile kernels in the CPU emulator")

KERNEL_BACKENDS = sorted(KERNEL_PACKAGES)
MATMUL_OPS = ("linear", "layer_norm_linear", "attention", "block")


def custom_ops_in(graphs: list[torch.fx.GraphModule], namespace: str) -> set[str]:
    """The names of `namespace`'s ops called in `graphs` (Dynamo's graphs, as a compiler receives them)."""
    return {str(node.target).split(".")[1] for graph in graphs for node in graph.graph.nodes
            if node.op == "call_function" and str(node.target).startswith(f"{namespace}.")}


def compile_counted(model: torch.nn.Module) -> tuple[torch.nn.Module, CompileCounterWithBackend]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, fullgraph=True, backend=counter), counter


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- the model, compiled whole

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_plain_and_halting_forwards_compile_whole_with_the_kernels_as_graph_nodes(backend):
    """(a) the plain eval forward and (b) the halting forward (the masked loop it compiles to) are
    each one graph through AOTAutograd, equal to the eager forward, whose kernel ops are the
    backend's custom ops; the halting graph is replayed, never recompiled, as thresholds go from
    halting no token to halting some and all."""
    name, backend = backend, backend_or_skip(backend)
    device, namespace = device_for(backend), KERNEL_PACKAGES[name]
    model = sharpened_model("entropy", max_loops=4).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        compiled, counter = compile_counted(model)
        assert_close(compiled(idx, halting=False)[0], model(idx, halting=False)[0], composed=True)
        assert counter.frame_count == 1
        # the fixed-depth core is the fused block; the readout is ln_f + lm_head
        assert custom_ops_in(counter.graphs, namespace) == {"block", "layer_norm_linear"}

        compiled, counter = compile_counted(model)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for value in (NEVER["entropy"], 2.75, 100.0):  # no token halting early, some, all
                thresholds = torch.full(idx.shape, value, device=device)
                logits, _, trace = model(idx, halting=True, thresholds=thresholds, return_trace=True)
                assert_close(compiled(idx, halting=True, thresholds=thresholds)[0], logits, composed=True)
                halted_at = set(trace.steps.unique().tolist())
                assert {NEVER["entropy"]: halted_at == {4}, 2.75: len(halted_at) >= 2,
                        100.0: len(halted_at) == 1 and 4 not in halted_at}[value], (value, halted_at)
    assert counter.frame_count == 1
    assert custom_ops_in(counter.graphs, namespace) == {
        "layer_norm_linear", "attention", "linear", "softmax_entropy", "halt_update"}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_frozen_plan_forward_compiles_whole_and_once(backend):
    """(c) the halting forward on a frozen capacity plan: one graph, equal to the eager forward, with
    the same count of tokens stopped for want of a slot, replayed unchanged whether the plan's slots
    fit, overflow, or no token halts."""
    name, backend = backend, backend_or_skip(backend)
    model, idx, most_halt, fewer_halt = frozen_plan_case(backend)
    cases = [most_halt, fewer_halt, torch.full(idx.shape, NEVER["entropy"], device=idx.device)]
    with torch.no_grad():
        eager = []
        for thresholds in cases:
            model.capacity_dropped.zero_()
            eager.append((model(idx, halting=True, thresholds=thresholds)[0], int(model.capacity_dropped)))
        assert eager[0][1] == 0 and eager[1][1] > 0, "the cases need a plan that fits and one that overflows"
        compiled, counter = compile_counted(model)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for thresholds, (logits, dropped) in zip(cases, eager):
                model.capacity_dropped.zero_()
                assert_close(compiled(idx, halting=True, thresholds=thresholds)[0], logits, composed=True)
                assert int(model.capacity_dropped) == dropped
    assert counter.frame_count == 1
    assert {"layer_norm_linear", "attention", "linear", "halt_update"} <= custom_ops_in(counter.graphs,
                                                                                       KERNEL_PACKAGES[name])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_training_traces_the_torch_ops(backend):
    """No kernel has a backward (`differentiable` is empty), so with gradients enabled a compiled
    training step traces the "torch" backend's ops (hybrid autograd) and its gradients are theirs."""
    name, backend = backend, backend_or_skip(backend)
    assert backend.differentiable == frozenset()
    device = device_for(backend)
    idx = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(5)).to(device)
    grads = []
    for which in (backend, "torch"):
        model = sharpened_model("entropy", max_loops=4).to(device).set_backend(which).train()
        compiled, counter = compile_counted(model) if which is backend else (model, None)
        _, loss = compiled(idx, idx)
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
        if counter is not None:
            assert counter.frame_count == 1 and not custom_ops_in(counter.graphs, KERNEL_PACKAGES[name])
    for compiled_grad, torch_grad in zip(*grads, strict=True):
        assert_close(compiled_grad, torch_grad, composed=True)


# ---- each op: its custom op against its launcher

def op_args(name: str, dtype: torch.dtype, device: torch.device, variant: str = "") -> tuple:
    """Tiny arguments for op `name` of `looplm.ops`, positional as its contract orders them; the
    tensors in the model's dtype, some strided views as the model passes them. Variant "key_len":
    attention over a cache that batch row b has filled to key_len[b]."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)
    C, H = 16, 2
    if name == "layer_norm":
        return rand(6, 2, C).transpose(0, 1), rand(C), rand(C), 1e-5  # a strided x
    if name == "linear":
        return rand(2, 3, C), rand(24, C, scale=C ** -0.5), rand(24), "gelu", rand(2, 3, 24)
    if name == "layer_norm_linear":
        return rand(2, 3, C), rand(C), rand(C), rand(24, C, scale=C ** -0.5), rand(24), "gelu", 1e-5
    if name == "attention" and variant == "key_len":
        q, (k, v) = rand(2, H, 1, C // H), rand(2, 2, H, 7, C // H)  # one query over a cache of 7 places
        return q, k, v, True, None, torch.tensor([3, 7], dtype=torch.int32, device=device)
    if name == "attention":
        q, k, v = rand(1, 5, 3, H, C // H).permute(2, 0, 3, 1, 4)  # strided head views of one qkv
        return q, k, v, True, None
    if name == "softmax_entropy":
        return (rand(2, 3, 17, scale=3.0),)
    if name == "halt_update":
        n = 6
        active = torch.tensor([True, True, False, True, False, True], device=device)
        return (rand(n, C), rand(n, C), active, torch.tensor([2, 2, 1, 2, 2, 2], dtype=torch.int32, device=device),
                torch.randn(n, generator=g).to(device), torch.zeros(n, device=device), 2, 1, 4)
    if name == "block":
        weights = BlockWeights(rand(C), rand(C), rand(3 * C, C, scale=C ** -0.5), rand(3 * C),
                               rand(C, C, scale=C ** -0.5), rand(C), rand(C), rand(C), rand(4 * C, C, scale=C ** -0.5),
                               rand(4 * C), rand(C, 4 * C, scale=(4 * C) ** -0.5), rand(C))
        return rand(1, 5, C), weights, H, 0.0
    raise AssertionError(name)


def spread(args: tuple) -> tuple:
    """The custom op's arguments: a BlockWeights spread into its tensors."""
    return tuple(x for a in args for x in (a if isinstance(a, BlockWeights) else (a,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,variant", [*((op, "") for op in OP_NAMES), ("attention", "key_len")],
                         ids=[*OP_NAMES, "attention-key_len"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_each_custom_op(backend, op, variant, dtype):
    """`torch.library.opcheck`: the schema holds (no input mutated or aliased), the fake implementation
    gives the kernel's shapes, dtypes and strides, and the op traces through AOTAutograd with dynamic
    shapes; the custom op computes what the launcher does."""
    name, backend = backend, backend_or_skip(backend)
    problem = dtype_problem(backend, dtype, matmul=op in MATMUL_OPS)
    if problem:
        pytest.skip(problem)
    args = op_args(op, dtype, device_for(backend), variant)
    custom_op = getattr(getattr(torch.ops, KERNEL_PACKAGES[name]), op).default
    torch.library.opcheck(custom_op, spread(args))
    expected, got = backend.ops[op](*args), custom_op(*spread(args))
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,), strict=True):
        assert torch.equal(e, g)


def test_every_fake_has_its_ops_signature():
    assert set(FAKES) == set(OP_NAMES)
    for op, fake in FAKES.items():
        assert signature_mismatch(op, fake) is None


def test_the_block_custom_op_takes_the_weights_spread():
    backend_or_skip("triton")
    schema = str(torch.ops.looplm_triton.block.default._schema)
    assert schema.startswith("looplm_triton::block(Tensor x, Tensor ln1_w, Tensor? ln1_b, Tensor attn_w")
    assert schema.endswith("SymInt n_head, float dropout_p=0.) -> Tensor")


# ---- eager calls launch directly

class CustomOpCalls(TorchDispatchMode):
    """Records the ops of the kernel namespaces that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in KERNEL_PACKAGES.values():
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_calls_run_the_launcher_and_never_the_custom_op(backend, monkeypatch):
    """Eagerly an op is its launcher: a spy launcher runs once per call and no custom op is
    dispatched (a recorder that does see a direct custom-op call sees none). Traced, the same op is
    the custom op, which runs that launcher."""
    import importlib
    name, backend = backend, backend_or_skip(backend)
    package, device = KERNEL_PACKAGES[name], device_for(backend)
    module = importlib.import_module(f"{package}.layer_norm")
    launches = []

    def spy(*args, **kwargs):
        launches.append(args[0].shape)
        return original(*args, **kwargs)
    original = module.layer_norm
    monkeypatch.setattr(module, "layer_norm", spy)
    monkeypatch.setattr(backends, "_LAUNCHERS", dict(backends._LAUNCHERS))  # restored after the test
    layer_norm = kernel_ops(package)["layer_norm"]
    x, weight, bias, _ = op_args("layer_norm", torch.float32, device)
    with CustomOpCalls() as calls:
        eager = layer_norm(x, weight, bias)
        getattr(torch.ops, package).layer_norm(x, weight, bias)  # the recorder sees a custom op called
    assert calls.names == [f"{package}.layer_norm.default"] and len(launches) == 2
    with torch.no_grad():
        compiled, counter = compile_counted(lambda x: layer_norm(x, weight, bias) * 2)
        assert_close(compiled(x), eager * 2)
    assert custom_ops_in(counter.graphs, package) == {"layer_norm"} and len(launches) == 3
    # the model's eager forward dispatches none of them
    model = sharpened_model("entropy", max_loops=4).to(device).set_backend(backend)
    idx = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(5)).to(device)
    with CustomOpCalls() as calls, torch.no_grad():
        model(idx, halting=True)
        model(idx, halting=False)
    assert calls.names == []
