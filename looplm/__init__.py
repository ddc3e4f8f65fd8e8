"""LoopLM: weight-tied looped GPTs with per-token adaptive halting, on Triton and cuTile kernels."""
from looplm.backends import (Availability, Backend, BackendUnavailable, available_backends, get_backend,
                             register_backend)
from looplm.config import ConfigError, LoopConfig
from looplm.model import LoopGPT, LoopTrace

__version__ = "0.1.0"
__all__ = ["Availability", "Backend", "BackendUnavailable", "ConfigError", "LoopConfig", "LoopGPT", "LoopTrace",
           "available_backends", "get_backend", "register_backend"]
