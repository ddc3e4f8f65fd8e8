"""pytest set-up for the benchmarks.

Plain `pytest` collects bench/ with the tests, so unless benchmarking is asked for
(--benchmark-only, --benchmark-enable, or a --benchmark-json / --benchmark-save output), every case
runs single-shot (pytest-benchmark's --benchmark-disable): it still checks that the case works,
in seconds. The saved JSON carries what a reader of the numbers needs: the device, the library
versions and the exact command.

`--benchmark-only` deselects the tests that time nothing (rather than skipping each one), and lists
no skip reasons under `-ra`: the cases for another device or backend are counted in the last line,
so the run ends on its benchmark table.
"""
from __future__ import annotations

import platform
import shlex
from importlib import metadata

import pytest
import torch

_TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save", "benchmark_autosave")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-threads", type=int, default=None, metavar="N",
                     help="torch CPU threads for the benchmarks (default 1, set in the root conftest.py: it keeps "
                          "timings steady on a machine shared with other work, where threads wait on each other)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    option = config.option
    if hasattr(option, "benchmark_disable") and not any(getattr(option, name, None) for name in _TIMING_OPTIONS):
        option.benchmark_disable = True
    if getattr(option, "benchmark_only", False):
        option.reportchars = _without_skips(option.reportchars)
    threads = config.getoption("--bench-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _without_skips(reportchars: str) -> str:
    """pytest's -r characters with skips left out ('a' is every outcome but passes, 'A' every one)."""
    expanded = reportchars.replace("A", "fExXpP").replace("a", "fExX")
    return "".join(c for c in expanded if c not in "sS")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "benchmark_only", False):
        return
    timed = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if len(timed) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in timed])
        items[:] = timed


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    gpu = torch.cuda.is_available()
    machine_info["device"] = torch.cuda.get_device_name() if gpu else "cpu"
    if gpu:
        machine_info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        **{package: _version(package) for package in ("triton", "cuda-tile", "pytest-benchmark", "looplm")},
    }


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["command"] = shlex.join(["pytest", *config.invocation_params.args])
