"""Autotuning: per-GPU tables of the best launch configuration of every kernel.

Kernels ask `lookup_config` at every launch; `python -m tuning.autotune --gpu NAME` measures and
writes the tables; `python -m tuning.show [NAME]` prints them.
"""
from __future__ import annotations

from tuning.lookup import lookup_config
from tuning.spec import Config, KernelTuning

__all__ = ["Config", "KernelTuning", "lookup_config"]
