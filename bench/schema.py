"""What every benchmark case records in pytest-benchmark's `extra_info`, and the report reads back.

Work is counted as the least a perfect implementation must do: `bytes` the compulsory memory
traffic (every input read once, every output written once), `flops` the arithmetic (a multiply-add
is 2). Dividing by the measured time gives GB/s and TFLOP/s; dividing those by the device's peaks
(bench.peaks) gives how close a case comes to what the hardware allows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from bench.peaks import DevicePeak

ShapeValue = Union[int, str]
STATS = ("median", "min", "mean")  # pytest-benchmark's statistics a report may read
TENSOR_CORE_DTYPES = ("bfloat16", "float16")  # the peak FLOP/s of bench.peaks are for these


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


@dataclass(frozen=True)
class Measurement:
    info: CaseInfo
    seconds: float

    @property
    def key(self) -> tuple[str, str, str]:
        """The case, whatever the backend: rows of the summary."""
        return self.info.suite, self.info.case, self.info.dtype

    @property
    def gbps(self) -> Optional[float]:
        return self.info.bytes / self.seconds / 1e9 if self.info.bytes else None

    @property
    def tflops(self) -> Optional[float]:
        return self.info.flops / self.seconds / 1e12 if self.info.flops else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.info.tokens / self.seconds if self.info.tokens else None


@dataclass(frozen=True)
class PeakUse:
    """Percent of the device's peaks one measurement reaches (None where it cannot be said)."""
    bandwidth: Optional[float]
    compute: Optional[float]
    roofline: Optional[float]


def load_measurements(data: dict, stat: str = "median") -> list[Measurement]:
    """The cases of a pytest-benchmark JSON that recorded a bench.schema.CaseInfo."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list):
        raise ValueError("not a pytest-benchmark JSON: no 'benchmarks' list (write one with --benchmark-json=PATH)")
    out, seen = [], {}
    for bench in benchmarks:
        extra = bench.get("extra_info") or {}
        if "backend" not in extra:
            continue  # a benchmark outside bench/'s schema
        m = Measurement(CaseInfo.from_extra_info(extra), float(bench["stats"][stat]))
        cell = (*m.key, m.info.backend)
        if cell in seen:
            raise ValueError(f"benchmarks {seen[cell]!r} and {bench['name']!r} both record case {m.info.case!r} "
                             f"({m.info.dtype}) on backend {m.info.backend!r}; put what tells them apart into "
                             "the case's shape")
        seen[cell] = bench["name"]
        out.append(m)
    return out


def peak_use(m: Measurement, peak: Optional[DevicePeak]) -> PeakUse:
    if peak is None:
        return PeakUse(None, None, None)
    bandwidth = 100.0 * m.gbps / peak.memory_gbps if m.gbps is not None else None
    compute = None
    if m.tflops is not None and m.info.dtype in TENSOR_CORE_DTYPES:
        compute = 100.0 * m.tflops / peak.bf16_tflops
    bounds = []
    if m.info.bytes:
        bounds.append(m.info.bytes / (peak.memory_gbps * 1e9))
    if m.info.flops and m.info.dtype in TENSOR_CORE_DTYPES:
        bounds.append(m.info.flops / (peak.bf16_tflops * 1e12))
    roofline = 100.0 * max(bounds) / m.seconds if bounds else None
    return PeakUse(bandwidth, compute, roofline)
