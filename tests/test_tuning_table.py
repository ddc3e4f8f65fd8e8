"""Tuning tables: schema round trip, atomic and concurrent writes, merging, refusal of bad tables."""
import json
import multiprocessing
import os

import pytest

from looplm.fileio import atomic_write_text

from tuning import table

DEVICE = "NVIDIA GeForce RTX 5070"
RUN = {"date": "2025-01-01T00:00:00+00:00", "driver": "570.00", "versions": {"torch": "2.13.0"}, "forced": False}


def entry(kernel="layer_norm", bucket=(4096, 512), best_ms=0.5, config=None):
    config = config or {"BLOCK_M": 4, "num_warps": 4}
    return {"backend": "triton", "kernel": kernel, "dtype": "bfloat16", "bucket": list(bucket),
            "shape": list(bucket), "best": {"config": config, "median_ms": best_ms}, "default_ms": best_ms * 2,
            "runners_up": [{"config": {**config, "num_warps": 8}, "median_ms": best_ms * 3}],
            "failed": [{"config": {**config, "num_warps": 1}, "reason": "RuntimeError: out of resources"}],
            "pruned": [{"config": {**config, "BLOCK_M": 64}, "reason": "needs 200000 bytes of shared memory"}]}


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "rtx5070.json"
    written = table.record(path, "rtx5070", DEVICE, (12, 0), RUN, [entry()])
    loaded = table.load(path)
    assert loaded == json.loads(json.dumps(written))
    assert loaded["schema"] == table.SCHEMA_VERSION
    assert loaded["device"] == {"name": DEVICE, "capability": [12, 0]}
    assert loaded["runs"] == [{"run": 1, **RUN}]
    (got,) = loaded["entries"]
    assert got == {**entry(), "run": 1}


def test_dumps_is_json_with_one_line_per_config():
    value = {"entries": [entry(), entry(kernel="linear")]}
    text = table.dumps(value)
    assert json.loads(text) == value
    assert '"config": {"BLOCK_M": 4, "num_warps": 4}' in text


def test_merge_replaces_only_retuned_keys_and_drops_unused_runs(tmp_path):
    path = tmp_path / "t.json"
    table.record(path, "rtx5070", DEVICE, (12, 0), RUN, [entry("a"), entry("b")])
    table.record(path, "rtx5070", DEVICE, (12, 0), {**RUN, "date": "later"}, [entry("b", best_ms=0.1)])
    t = table.load(path)
    by_kernel = {e["kernel"]: e for e in t["entries"]}
    assert by_kernel["a"]["run"] == 1 and by_kernel["a"]["best"]["median_ms"] == 0.5
    assert by_kernel["b"]["run"] == 2 and by_kernel["b"]["best"]["median_ms"] == 0.1
    assert [r["run"] for r in t["runs"]] == [1, 2]
    table.record(path, "rtx5070", DEVICE, (12, 0), {**RUN, "date": "last"}, [entry("a", best_ms=0.2)])
    assert [r["date"] for r in table.load(path)["runs"]] == ["later", "last"]  # run 1 is no longer used


def test_record_refuses_a_table_of_another_device(tmp_path):
    path = tmp_path / "t.json"
    table.record(path, "rtx5070", DEVICE, (12, 0), RUN, [entry()])
    with pytest.raises(table.TableError, match="RTX 4090"):
        table.record(path, "rtx5070", "NVIDIA GeForce RTX 4090", (8, 9), RUN, [entry()])


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"schema": 99, "device": {"name": "x", "capability": [9, 0]}, "runs": [], "entries": []}', "newer"),
    ('{"schema": 1, "device": {"name": "x"}, "runs": [], "entries": []}', "capability"),
    ('{"schema": 1, "device": {"name": "x", "capability": [9, 0]}, "runs": [], "entries": [{"backend": 1}]}',
     "backend"),
    ("[]", "not a JSON object"),
])
def test_bad_tables_are_refused_and_never_overwritten(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(table.TableError, match=match):
        table.load(path)
    with pytest.raises(table.TableError):
        table.record(path, "x", "x", (9, 0), RUN, [entry()])
    assert path.read_text() == text


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    atomic_write_text(path, "old")

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def _write_many(path, writer, n):
    for i in range(n):
        table.record(path, "rtx5070", DEVICE, (12, 0), {**RUN, "date": f"{writer}-{i}"},
                     [entry(f"k{writer}", bucket=(1 << i, 64))])


def test_concurrent_writers_lose_nothing_and_readers_never_see_a_torn_file(tmp_path):
    path = tmp_path / "t.json"
    context = multiprocessing.get_context("fork")  # the writers do file work only
    writers = [context.Process(target=_write_many, args=(path, w, 8)) for w in range(4)]
    for p in writers:
        p.start()
    reads = 0
    while any(p.is_alive() for p in writers):
        if path.exists():
            table.load(path)  # raises on a partial file
            reads += 1
    for p in writers:
        p.join()
        assert p.exitcode == 0
    t = table.load(path)
    assert len(t["entries"]) == 4 * 8
    assert {e["run"] for e in t["entries"]} == {r["run"] for r in t["runs"]}
    assert reads > 0
