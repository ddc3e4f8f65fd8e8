"""Nothing lost, nothing silent: what a forgotten flag, a killed save, a full disk, a foreign train
state or a torn log do to a run, on tiny runs of a few iterations.

- a new run refuses an out_dir holding a run; a resume refuses settings and train states that are
  not the checkpoint's, before it changes anything;
- a save killed at any step leaves the old checkpoint or the new one, and the next save or resume
  removes what it left;
- every atomic write flushes its file before the rename and the folder after it;
- a full disk is one line, and the checkpoint already written is intact;
- a torn last log record is dropped with a warning; a corrupt one before it is an error naming
  the file and line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm import ConfigError, LoopConfig, LoopGPT
from looplm import checkpoint as ckpt_module
from looplm import fileio
from looplm.checkpoint import CheckpointWriteError, load_checkpoint, load_train_state, save_checkpoint
from looplm.train import LogError, main, train
from tests.test_checkpoint import forget_digests
from tests.test_cli import refusal
from tests.test_train import tiny_run


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory (hidden ones too) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_refusal(argv: list[str], capsys, cli_main=main, prog: str = "looplm.train") -> str:
    """A CLI's main (looplm.train's by default) through run_cli (tests.test_cli.refusal): -> its one
    line on stderr, after checking exit status 2."""
    err = refusal(cli_main, argv, capsys, prog)
    assert len(err.strip().splitlines()) == 1, err
    return err


def argv_of(tmp_path, **overrides) -> list[str]:
    """A tiny addition run's command line (tests.test_train.tiny_run's settings)."""
    values = dict(out_dir=str(tmp_path / "run"), task="addition", train_digits=(1, 2), test_digits=(1, 2, 3),
                  n_train=300, n_test=20, batch_size=4, max_iters=4, eval_interval=2, eval_iters=2, log_interval=1,
                  warmup_iters=1, progress=False, report=False, device="cpu", block_size=16, n_embd=16, n_head=2,
                  n_loops=3)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of 4 iterations (checkpoints at 2 and 4), copied fresh for each test."""
    root = tmp_path_factory.mktemp("finished")
    train(*tiny_run(root))
    return root / "run"


@pytest.fixture
def run_dir(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# ---- a run never destroys another run's results


def test_a_new_run_refuses_an_out_dir_that_holds_a_run(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    err = cli_refusal(argv_of(tmp_path, max_iters=2), capsys)
    assert "already holds a run (log.jsonl, metrics.csv, last, best)" in err
    assert "--init_from=resume" in err and "--overwrite=True" in err
    assert snapshot(run_dir) == before
    shutil.rmtree(run_dir / "best")
    shutil.rmtree(run_dir / "last")
    (run_dir / "metrics.csv").unlink()  # a log alone is a run too
    assert "already holds a run (log.jsonl)" in cli_refusal(argv_of(tmp_path, max_iters=2), capsys)


def test_overwrite_replaces_the_run(run_dir, tmp_path):
    result = main(argv_of(tmp_path, max_iters=1, eval_interval=1, overwrite=True))
    assert result.iter_num == 1
    assert [json.loads(line)["iter"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [0, 1, 1]
    assert json.loads((run_dir / "best" / "config.json").read_text())["metadata"]["iter_num"] == 1
    with pytest.raises(ConfigError, match="overwrite=True replaces .* init_from='resume' continues it"):
        main(argv_of(tmp_path, overwrite=True, init_from="resume"))


@pytest.mark.parametrize("override, message", [
    ("--n_embd=64", "n_embd=16 there, 64 given"),
    ("--halt_thresholds_after={3: 0.5}", "halt_thresholds_after={} there"),
    ("--train_digits=(1, 3)", "train_digits=[1, 2] there, [1, 3] given"),
    ("--task=shakespeare", "task='addition' there, 'shakespeare' given"),
])
def test_resume_refuses_settings_that_contradict_the_checkpoint(run_dir, tmp_path, capsys, override, message):
    before = snapshot(run_dir)
    err = cli_refusal([*argv_of(tmp_path, init_from="resume", max_iters=6), override], capsys)
    assert f"init_from=resume continues {run_dir / 'last'} as saved ({message}" in err
    assert snapshot(run_dir) == before


def test_resume_may_change_training_knobs_and_repeat_the_model_keys(run_dir, tmp_path):
    result = main(argv_of(tmp_path, init_from="resume", max_iters=6, learning_rate=2e-3, min_lr=2e-4,
                          max_loops=None))  # max_loops=None is the saved max_loops (n_loops)
    assert result.iter_num == 6 and result.model.config.n_embd == 16


def edit_train_state(checkpoint: Path, **changes) -> None:
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, checkpoint / "train_state.pt")


def test_a_foreign_train_state_is_refused_before_the_logs_are_touched(run_dir, tmp_path, capsys):
    """Another run's train_state.pt (another width, another iteration) is refused with one line naming
    the file and field, whichever check meets it first, and the logs keep every record."""
    train(*tiny_run(tmp_path / "other", max_iters=2, n_embd=32))
    last = run_dir / "last"
    shutil.copy(tmp_path / "other" / "run" / "last" / "train_state.pt", last / "train_state.pt")
    before = snapshot(run_dir)
    resume = argv_of(tmp_path, init_from="resume", max_iters=6)
    state_file = last / "train_state.pt"
    assert f"{state_file} is damaged or another checkpoint's" in cli_refusal(resume, capsys)
    forget_digests(last)  # as a checkpoint saved before digests were recorded
    before = snapshot(run_dir)
    assert f"{state_file}: field 'iter_num' is 2 but {last / 'config.json'} records iter_num 4" in cli_refusal(
        resume, capsys)
    edit_train_state(last, iter_num=4)
    assert f"{state_file}: field 'looplm_config' differs from" in cli_refusal(resume, capsys)
    edit_train_state(last, looplm_config=None)  # as a train state saved before it recorded the config
    err = cli_refusal(resume, capsys)
    assert f"{state_file}: field 'optimizer' holds exp_avg of shape (14, 32) for transformer.wte.weight" in err
    edit_train_state(last, iter_num=None)
    assert f"{state_file}: no field 'iter_num'" in cli_refusal(resume, capsys)
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if "train_state" not in k} == \
        {k: v for k, v in before.items() if "train_state" not in k}


# ---- torn and corrupt logs


def test_a_torn_last_record_is_dropped_with_a_warning_and_resume_goes_on(run_dir, tmp_path, capsys):
    straight = tmp_path / "straight"
    train(*tiny_run(straight, max_iters=6))
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 5, "lo')  # an append cut short
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("6,3,2.5")
    train(*tiny_run(tmp_path, max_iters=6, init_from="resume"))
    err = capsys.readouterr().err
    assert f"warning: {run_dir / 'log.jsonl'}: dropped its last record (line 8), cut short" in err
    assert f"warning: {run_dir / 'metrics.csv'}: dropped its last record (line 5), cut short" in err
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iter"]) for r in records] == \
        [(json.loads(line)["kind"], json.loads(line)["iter"]) for line in
         (straight / "run" / "log.jsonl").read_text().splitlines()]
    assert [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()] == \
        ["iter", "0", "2", "4", "6"]


@pytest.mark.parametrize("log, line, damage", [
    ("log.jsonl", 3, '{"kind": "tr'),
    ("log.jsonl", 2, '{"kind": "train", "loss": 1.0}'),
    ("metrics.csv", 2, "0,3,2.6,"),
    ("metrics.csv", 1, "iteration,loss"),
])
def test_a_corrupt_record_before_the_last_is_an_error_naming_the_file_and_line(run_dir, tmp_path, capsys, log,
                                                                                line, damage):
    lines = (run_dir / log).read_text().splitlines()
    lines[line - 1] = damage
    (run_dir / log).write_text("\n".join(lines) + "\n")
    before = snapshot(run_dir)
    err = cli_refusal(argv_of(tmp_path, init_from="resume", max_iters=6), capsys)
    assert f"{run_dir / log}, line {line}: " in err
    assert snapshot(run_dir) == before
    with pytest.raises(LogError):
        train(*tiny_run(tmp_path, init_from="resume", max_iters=6))


# ---- kill points inside a save


SAVE_STEPS = {  # the calls a save makes, each a point where a kill may fall
    "os": ("fsync", "replace", "rename", "chmod", "open"),
    "shutil": ("rmtree",),
    "tempfile": ("mkdtemp", "mkstemp"),
}


def _killed_at(step: int, save) -> None:
    """In a forked child: run save() and SIGKILL this process at its step-th call of SAVE_STEPS
    (a file write is killed half written)."""
    count = [0]

    def point() -> None:
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def instrument(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            point()
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    for module_name, names in SAVE_STEPS.items():
        for name in names:
            instrument(sys.modules[module_name], name)
    real_write = Path.write_bytes

    def write_bytes(self, data):
        count[0] += 1
        if count[0] == step:  # half of the file reaches the disk, then the kill
            real_write(self, data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, data)
    Path.write_bytes = write_bytes
    save()


def weights_of(model: LoopGPT) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kill points run each save in a forked child (POSIX only)")
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path):
    config = LoopConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_loops=2)
    old, new, third = (LoopGPT(config) for _ in range(3))
    path = tmp_path / "ckpt"
    outcomes = []
    for step in range(1, 100):
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        save_checkpoint(old, path, metadata={"which": "old"}, train_state={"which": torch.zeros(1)})
        pid = os.fork()
        if pid == 0:  # the child: save `new`, killed at `step`
            try:
                _killed_at(step, lambda: save_checkpoint(new, path, metadata={"which": "new"},
                                                         train_state={"which": torch.ones(1)}))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        loaded = load_checkpoint(path)  # from path, or from the backup when the kill fell between the renames
        which = ckpt_module.read_checkpoint_doc(path)["metadata"]["which"]
        expected = old if which == "old" else new
        assert all(torch.equal(a, b) for a, b in zip(weights_of(loaded), weights_of(expected))), step
        assert load_train_state(path)["which"].item() == (which == "new"), step
        outcomes.append(which)
        save_checkpoint(third, path)  # the next save completes and clears what the killed one left
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], (step, list(tmp_path.iterdir()))
        assert all(torch.equal(a, b) for a, b in zip(weights_of(load_checkpoint(path)), weights_of(third)))
        if not killed:  # the save ran past its last step
            assert os.WIFEXITED(status) and which == "new"
            break
    assert "old" in outcomes and "new" in outcomes and len(outcomes) >= 15, outcomes


def test_resume_removes_what_a_killed_save_left(run_dir, tmp_path):
    stale = [run_dir / ".last.tmp-k1ll3d", run_dir / ".best.tmp-x7y8z9"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (run_dir / ".log.jsonl.abc123xy.tmp").write_text("{}")
    (run_dir / ".metrics.csv.zz99zz99.tmp").write_text("iter")
    (run_dir / "notes.tmp").write_text("not ours")  # names of other writers stay
    train(*tiny_run(tmp_path, max_iters=6, init_from="resume"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "last", "log.jsonl", "metrics.csv", "notes.tmp"]


# ---- durable writes


class FsyncSpy:
    """Records, in order, each fsync (of which file or folder, by inode) and each rename."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", (st.st_dev, st.st_ino)))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst):
                st = os.stat(src)
                folder = os.stat(Path(dst).parent)
                self.events.append(("rename", (st.st_dev, st.st_ino), (folder.st_dev, folder.st_ino), str(src)))
                return real(src, dst)
            return rename
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def check(self) -> int:
        """Every temporary file or folder renamed into place was fsynced before its rename, and the
        folder it went into after it; -> how many such renames were seen."""
        renames = [(i, e) for i, e in enumerate(self.events) if e[0] == "rename" and ".tmp" in Path(e[3]).name]
        for i, (_, source, folder, name) in renames:
            assert ("fsync", source) in self.events[:i], f"{name} was renamed into place before it was fsynced"
            assert ("fsync", folder) in self.events[i + 1:], f"the folder of {name} was not fsynced after its rename"
        return len(renames)


def test_every_atomic_write_is_flushed_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    fileio.atomic_write_text(tmp_path / "a.txt", "text")
    fileio.atomic_write_bytes(tmp_path / "sub" / "b.bin", b"bytes")
    with fileio.atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    assert spy.check() == 3
    spy.events.clear()
    model = LoopGPT(LoopConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_loops=2))
    save_checkpoint(model, tmp_path / "ckpt", train_state={"step": torch.ones(1)})
    assert spy.check() == 4  # three files, then the directory
    spy.events.clear()
    save_checkpoint(model, tmp_path / "ckpt")  # replacing one: the same, with the old moved aside between
    assert spy.check() == 3
    assert (tmp_path / "a.txt").read_text() == "text" and load_checkpoint(tmp_path / "ckpt")


# ---- a full disk


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(run_dir, tmp_path, capsys, monkeypatch):
    before = snapshot(run_dir / "last")
    real_write = ckpt_module.atomic_write_bytes

    def disk_full(path, data):
        if Path(path).name == "train_state.pt":
            real_write(path, data[:100])  # what fitted, in the new directory the failed save removes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)
    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", disk_full)
    err = cli_refusal(argv_of(tmp_path, init_from="resume", max_iters=6), capsys)
    assert f"cannot save checkpoint {run_dir / 'last'}: writing train_state.pt: no space left on device " \
           f"(the checkpoint there is unchanged)" in err
    assert snapshot(run_dir / "last") == before and not list(run_dir.glob(".*"))
    monkeypatch.undo()
    assert train(*tiny_run(tmp_path, max_iters=6, init_from="resume")).iter_num == 6  # and it resumes


def _mount_tmpfs(where: Path, size: str) -> str:
    """Mount a tmpfs at `where`; -> '' or why it cannot be done here."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs Linux and root"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    return "" if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


def test_a_full_tmpfs_during_training(tmp_path, capsys):
    """A real full disk: a run on a small tmpfs, resumed once the disk is filled to a few pages."""
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "1m")
    if reason:
        pytest.skip(reason)
    try:
        argv = argv_of(disk, max_iters=2)
        main(argv)
        before = snapshot(disk / "run" / "last")
        free = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(free.f_bavail * free.f_frsize - 16 * 1024, 0))
        err = cli_refusal(argv_of(disk, init_from="resume", max_iters=4), capsys)
        assert "no space left on device" in err and str(disk / "run") in err, err
        assert snapshot(disk / "run" / "last") == before
        (disk / "filler").unlink()
        assert main(argv_of(disk, init_from="resume", max_iters=4)).iter_num == 4
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- errors a user can cause, each one line naming the file and field


def test_bit_rot_in_a_checkpoint_is_one_line(run_dir, capsys):
    from looplm import sample
    weights = run_dir / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    err = cli_refusal([run_dir / "best", "--num_samples=1", "--max_new_tokens=2"], capsys, sample.main, "looplm.sample")
    assert f"looplm.sample: error: {weights} is damaged or another checkpoint's" in err


@pytest.mark.parametrize("text, where", [
    ("batch_size = 4\nn_loops = (\n", ":2: '(' was never closed"),
    ("batch_size = 4\nlearning_rate = 1e-3 +\n", ":2: invalid syntax"),
    ("batch_size = 4\n\nn_loops = undefined\n", ":3: NameError: name 'undefined' is not defined"),
])
def test_a_config_file_that_does_not_run_is_one_line_with_its_line(tmp_path, capsys, text, where):
    config = tmp_path / "config.py"
    config.write_text(text)
    assert f"{config}{where}" in cli_refusal([str(config)], capsys)


@pytest.mark.parametrize("damage, message", [
    ("meta", "meta.json: field 'chars' (the vocabulary, a string) is missing"),
    ("empty", "val.bin is empty (0 bytes"),
    ("vocabulary", "train.bin holds token id 64, outside meta.json's vocabulary of 3"),
])
def test_damaged_data_files_are_named(tmp_path, capsys, damage, message):
    argv = argv_of(tmp_path, task="shakespeare", data_dir=tmp_path / "data", max_iters=1, eval_iters=1)
    main(argv)
    data = tmp_path / "data" / "shakespeare_char"
    if damage == "meta":
        (data / "meta.json").write_text('{"vocab_size": 65}')
    elif damage == "empty":
        (data / "val.bin").write_bytes(b"")
    else:
        (data / "meta.json").write_text('{"vocab_size": 3, "chars": "abc"}')
    assert f"{data}/{message}" in cli_refusal(argv_of(tmp_path / "again", task="shakespeare",
                                                      data_dir=tmp_path / "data"), capsys)


def test_the_write_error_names_the_checkpoint_when_nothing_was_there(tmp_path, monkeypatch):
    def no_permission(path, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", no_permission)
    model = LoopGPT(LoopConfig(vocab_size=11, block_size=8, n_embd=16, n_head=2, n_loops=2))
    with pytest.raises(CheckpointWriteError, match=r"ckpt: writing model.safetensors: Permission denied "
                                                   r"\(nothing was saved\)") as info:
        save_checkpoint(model, tmp_path / "ckpt")
    assert info.value.errno == errno.EACCES and isinstance(info.value, OSError)
    assert not list(tmp_path.iterdir())


def test_overwrite_refuses_to_fine_tune_from_inside_the_run_it_removes(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    err = cli_refusal(argv_of(tmp_path, init_from=run_dir / "last", overwrite=True), capsys)
    assert f"init_from='{run_dir / 'last'}' lies in out_dir '{run_dir}', which overwrite=True removes first" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("path, value, message", [
    (("metadata", "task", "train_digits"), "x",
     "config.json: field 'metadata.task' does not rebuild the task: train_digits must be digit counts"),
    (("looplm_config", "halt_thresholds_after"), {"a": 1.0}, "config.json does not hold a valid LoopConfig"),
])
def test_ill_typed_checkpoint_fields_are_named_by_eval_addition(run_dir, capsys, path, value, message):
    from looplm import eval_addition
    config = run_dir / "best" / "config.json"
    doc = json.loads(config.read_text())
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    config.write_text(json.dumps(doc))
    err = cli_refusal([run_dir / "best", "--limit=1"], capsys, eval_addition.main, "looplm.eval_addition")
    assert f"looplm.eval_addition: error: {run_dir / 'best'}/{message}" in err


def test_overwrite_removes_the_old_run_only_once_the_new_one_starts(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    err = cli_refusal(argv_of(tmp_path, overwrite=True, n_loops=0), capsys)
    assert "n_loops must be an integer >= 1" in err and snapshot(run_dir) == before
