"""bench/conftest.py: a --benchmark-only run times the benchmarks and lists no skip reasons."""
from types import SimpleNamespace

from bench.conftest import _without_skips, pytest_collection_modifyitems


def test_benchmark_only_reports_no_skip_reasons():
    assert _without_skips("a") == "fExX"
    assert _without_skips("A") == "fExXpP"
    assert _without_skips("fsE") == "fE"


def run_hook(benchmark_only):
    deselected = []
    config = SimpleNamespace(option=SimpleNamespace(benchmark_only=benchmark_only),
                             hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    timed, plain = SimpleNamespace(fixturenames=["benchmark", "tmp_path"]), SimpleNamespace(fixturenames=["tmp_path"])
    items = [plain, timed, plain]
    pytest_collection_modifyitems(config, items)
    return items, deselected, timed, plain


def test_benchmark_only_deselects_what_times_nothing():
    items, deselected, timed, plain = run_hook(benchmark_only=True)
    assert items == [timed] and deselected == [plain, plain]
    items, deselected, timed, plain = run_hook(benchmark_only=False)
    assert items == [plain, timed, plain] and deselected == []
