"""What every benchmark case records in pytest-benchmark's `extra_info`, and the report reads back.

Work is counted as the least a perfect implementation must do: `bytes` the compulsory memory
traffic (every input read once, every output written once), `flops` the arithmetic (a multiply-add
is 2). Dividing by the measured time gives GB/s and TFLOP/s; dividing those by the device's peaks
(bench.peaks) gives how close a case comes to what the hardware allows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

ShapeValue = Union[int, str]


def case_label(op: str, shape: dict[str, ShapeValue]) -> str:
    """'attention B=16 H=32 T=1024 D=64': the op and its named dims, the way the report shows a case."""
    return " ".join([op, *(f"{k}={v}" for k, v in shape.items())])


REQUIRED = ("suite", "op", "backend", "shape", "dtype", "device")


@dataclass(frozen=True)
class CaseInfo:
    suite: str  # "kernel" | "loop" | "model"
    op: str  # an op of looplm.ops, or a model task: "eval_forward", "generate", "train_step", "loop"
    backend: str  # a registry backend, or a baseline: "eager", "compile", "sdpa"
    shape: dict[str, ShapeValue]
    dtype: str  # "bfloat16", "float32", ...
    device: str  # torch.cuda.get_device_name(), or "cpu"
    bytes: Optional[int] = None  # compulsory memory traffic per call
    flops: Optional[int] = None  # arithmetic per call
    tokens: Optional[int] = None  # tokens produced or consumed per call, for tokens/s
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. loops run and mean steps with halting

    @property
    def case(self) -> str:
        return case_label(self.op, self.shape)

    def to_extra_info(self) -> dict[str, Any]:
        return {**asdict(self), "case": self.case}

    @classmethod
    def from_extra_info(cls, extra_info: dict[str, Any]) -> "CaseInfo":
        missing = [name for name in REQUIRED if name not in extra_info]
        if missing:
            raise KeyError(f"benchmark extra_info lacks {missing}; bench cases record them through "
                           "bench.harness.measure")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in extra_info.items() if k in known})
