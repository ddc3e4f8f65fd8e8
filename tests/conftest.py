import os
import tempfile

import pytest
import torch

# Under pytest-xdist each worker compiles into a cache of its own: workers sharing one inductor cache
# read each other's half-written files.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.getpid()}-{os.environ['PYTEST_XDIST_WORKER']}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
