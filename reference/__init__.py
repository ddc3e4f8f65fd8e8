"""The oracle: plain PyTorch ops, fp32 inside, obviously correct. Registered as backend "reference".

Each op upcasts to float32, computes the textbook formula and casts back to the input dtype, so
the kernel backends are compared with one fixed numerical meaning.
"""
from looplm.ops import OP_NAMES
from reference.attention import attention
from reference.block import block
from reference.halt_update import halt_update
from reference.layer_norm import layer_norm
from reference.layer_norm_linear import layer_norm_linear
from reference.linear import linear
from reference.softmax_entropy import softmax_entropy

OPS = {name: globals()[name] for name in OP_NAMES}  # the op set of looplm.ops, by name

__all__ = ["OPS", "attention", "block", "halt_update", "layer_norm", "layer_norm_linear", "linear",
           "softmax_entropy"]
