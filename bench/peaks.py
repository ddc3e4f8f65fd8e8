"""What the hardware allows: peak memory bandwidth and dense bf16 tensor throughput per known GPU.

The one table the report divides by. Figures are the vendor's published peaks (dense, i.e. without
2:4 sparsity, which vendors often quote doubled); real kernels top out below them, so 80-90% of the
bandwidth peak is excellent. A device matches an entry when its `torch.cuda.get_device_name()`
contains every one of the entry's `match` strings and none of its `exclude` strings; entries are
tried in order, most specific first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePeak:
    name: str
    memory_gbps: float  # GB/s, 1e9 bytes per second
    bf16_tflops: float  # dense bf16 tensor-core TFLOP/s with fp32 accumulation
    source: str
    match: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # For the design estimates of bench.roofline (None where not filled in):
    sms: Optional[int] = None  # streaming multiprocessors
    clock_ghz: Optional[float] = None  # boost clock
    arch: Optional[str] = None  # compile target, a key of tuning.gpus.ARCHS
    memory_latency_ns: Optional[float] = None  # an assumed typical DRAM load latency (not a vendor figure)
    l2_gbps: Optional[float] = None  # an assumed L2-to-SM bandwidth (microbenchmark scale, not a vendor figure)
    special_per_sm_per_clock: int = 16  # ex2 / rcp results per SM per clock (4 SFUs per SM partition)

    def matches(self, device_name: str) -> bool:
        name = device_name.lower()
        return all(m.lower() in name for m in self.match) and not any(x.lower() in name for x in self.exclude)


_HOPPER = "NVIDIA H100/H200 datasheets (dense = half the quoted sparse bf16 figure)"

PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("RTX 5070", 672.0, 61.7,
               "NVIDIA RTX 5070 spec page: 12 GB GDDR7, 192-bit, 28 Gbps = 672 GB/s; bf16 derived from its "
               "988 AI TOPS (FP4, sparse): /2 dense, /4 from FP4 to FP16, /2 for fp32 accumulation on GeForce; "
               "48 SMs at 2.51 GHz boost",
               match=("RTX 5070",), exclude=("Ti",), sms=48, clock_ghz=2.51, arch="sm_120", memory_latency_ns=600.0,
               l2_gbps=2500.0),
    DevicePeak("RTX 4090", 1008.0, 165.2,
               "NVIDIA Ada Lovelace architecture whitepaper, appendix: peak BF16 tensor TFLOPS with FP32 "
               "accumulate 165.2 dense; 24 GB GDDR6X at 1008 GB/s",
               match=("RTX 4090",)),
    DevicePeak("A100 SXM4 80GB", 2039.0, 312.0, "NVIDIA A100 datasheet: 2039 GB/s, BF16 312 TFLOPS dense",
               match=("A100", "80GB"), exclude=("PCIe",)),
    DevicePeak("A100 PCIe 80GB", 1935.0, 312.0, "NVIDIA A100 datasheet: 1935 GB/s, BF16 312 TFLOPS dense",
               match=("A100", "80GB", "PCIe")),
    DevicePeak("A100 40GB", 1555.0, 312.0, "NVIDIA A100 datasheet: 1555 GB/s, BF16 312 TFLOPS dense",
               match=("A100",)),
    DevicePeak("H100 PCIe", 2000.0, 756.0, f"{_HOPPER}: 2.0 TB/s, BF16 1513 TFLOPS sparse",
               match=("H100", "PCIe")),
    DevicePeak("H100 NVL", 3900.0, 835.0, f"{_HOPPER}: 3.9 TB/s, BF16 1671 TFLOPS sparse",
               match=("H100", "NVL")),
    DevicePeak("H100 SXM", 3350.0, 989.0, f"{_HOPPER}: 3.35 TB/s, BF16 1979 TFLOPS sparse; 132 SMs at 1.98 GHz",
               match=("H100",), sms=132, clock_ghz=1.98, arch="sm_90", memory_latency_ns=650.0,
               l2_gbps=5500.0),
    DevicePeak("H200 NVL", 4800.0, 835.0, f"{_HOPPER}: 4.8 TB/s, BF16 1671 TFLOPS sparse",
               match=("H200", "NVL")),
    DevicePeak("H200 SXM", 4800.0, 989.0, f"{_HOPPER}: 4.8 TB/s, BF16 1979 TFLOPS sparse",
               match=("H200",)),
    DevicePeak("B200", 8000.0, 2250.0,
               "NVIDIA HGX B200 datasheet: 8 TB/s per GPU; FP16/BF16 36 PFLOPS sparse for 8 GPUs = 2.25 dense each",
               match=("B200",)),
    DevicePeak("L40S", 864.0, 362.05, "NVIDIA L40S datasheet: 864 GB/s, BF16 362.05 TFLOPS dense (733 sparse)",
               match=("L40S",)),
)


def find_peak(device_name: str) -> Optional[DevicePeak]:
    """The peak figures of the named device, or None when it is not in the table (a CPU, say)."""
    return next((peak for peak in PEAKS if peak.matches(device_name)), None)
