"""Tier 0 for the cuTile backend: every kernel compiles to cubin for sm_80, sm_90, sm_100 and sm_120 on
this machine, no GPU needed, for the launches of the shipped model configs, specialised as cuTile's
JIT specialises a real launch, and fits the architecture's shared memory."""
import pytest
import torch

pytest.importorskip("cuda.tile")

from looplm_tile import attention, halt_update, layer_norm, linear, runtime, softmax_entropy  # noqa: E402
from tuning.buckets import MODEL_SHAPES  # noqa: E402
from tuning.gpus import ARCHS  # noqa: E402

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
