"""Set-up shared by tests/ and bench/, read before either is collected."""
import os

import torch

# Triton reads this once, at import: on a machine without a GPU its kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors, where a second CPU thread costs more in hand-offs than it computes
# (and much more on a loaded machine). Benchmarks may ask for more with --bench-threads.
torch.set_num_threads(1)
