"""Every command-line tool answers bad input (a missing file, a corrupt checkpoint, a wrong-typed
option, an out-of-range value) with one line on stderr (and, where the message names a list, its
items indented below) and exit status 2, never a traceback."""
from __future__ import annotations

import json
import runpy
import sys
import warnings

import pytest
import torch

from looplm import LoopConfig, LoopGPT
from looplm import analyze, eval_addition, sample, train
from looplm.checkpoint import save_checkpoint
from looplm.cli import run_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A good checkpoint; a corrupt one (its weights cut short, the digest forgotten, as before digests
    were recorded); a rotten one (one bit of its weights flipped); one whose config.json has an
    ill-typed field; a missing one; and a config file that does not parse."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    config = LoopConfig(vocab_size=65, block_size=16, n_embd=16, n_head=2, n_loops=2)
    good = save_checkpoint(LoopGPT(config), root / "good", metadata={"task": {"task": "shakespeare"}})
    corrupt = save_checkpoint(LoopGPT(config), root / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    doc = json.loads((corrupt / "config.json").read_text())
    del doc["sha256"]
    (corrupt / "config.json").write_text(json.dumps(doc))
    rotten = save_checkpoint(LoopGPT(config), root / "rotten", metadata={"task": {"task": "shakespeare"}})
    data = bytearray((rotten / "model.safetensors").read_bytes())
    data[-1] ^= 0x04
    (rotten / "model.safetensors").write_bytes(bytes(data))
    badmeta = save_checkpoint(LoopGPT(config), root / "badmeta")
    doc = json.loads((badmeta / "config.json").read_text())
    (badmeta / "config.json").write_text(json.dumps({**doc, "metadata": "x"}))
    syntax = root / "syntax.py"
    syntax.write_text("batch_size = 4\nn_loops = (\n")
    return dict(good=good, corrupt=corrupt, missing=root / "missing", rotten=rotten, badmeta=badmeta, syntax=syntax)


def refusal(main, argv, capsys, prog):
    """Run a CLI's main through run_cli; -> its one line of stderr, after checking the exit status."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv], prog=prog)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    first, *details = err.strip("\n").splitlines()
    assert first.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert all(line.startswith("  ") for line in details), err  # a list the message refers to, indented
    return err


CASES = {  # CLI -> [(argv with the checkpoints' {names} to fill in, what the line must say)]
    "train": [
        (["{syntax}"], "syntax.py:2: '(' was never closed"),
        (["--init_from={rotten}", "--block_size=16", "--n_embd=16", "--n_head=2", "--n_loops=2"],
         "rotten/model.safetensors is damaged or another checkpoint's"),
        (["--init_from={missing}"], "does not exist"),
        (["--init_from={corrupt}", "--block_size=16", "--n_embd=16", "--n_head=2", "--n_loops=2"],
         "model.safetensors is corrupt"),
        (["--batch_size=twelve"], "batch_size must be int, got 'twelve'"),
        (["--learning_rate=-1"], "learning_rate must be >= 0"),
        (["no_such_config.py"], "config file 'no_such_config.py' does not exist"),
    ],
    "sample": [
        (["{missing}"], "does not exist"),
        (["{rotten}"], "rotten/model.safetensors is damaged or another checkpoint's"),
        (["{badmeta}"], "badmeta/config.json: field 'metadata' must be an object, got 'x'"),
        (["{corrupt}"], "model.safetensors is corrupt"),
        (["{good}", "--num_samples", "three"], "argument --num_samples: invalid int value: 'three'"),
        (["{good}", "--temperature", "-1", "--max_new_tokens", "2", "--num_samples", "1"],
         "temperature must be >= 0"),
        (["{good}", "--num_samples", "0"], "--num_samples must be >= 1"),
        (["{good}", "--device", "cuda:7"] if not torch.cuda.is_available() else ["{good}", "--top_k", "0"],
         "CUDA is not available" if not torch.cuda.is_available() else "top_k must be >= 1"),
    ],
    "eval_addition": [
        (["{missing}"], "does not exist"),
        (["{badmeta}"], "badmeta/config.json: field 'metadata' must be an object, got 'x'"),
        (["{corrupt}"], "config.json does not hold|not trained on addition"),
        (["{good}", "--max-loops", "many"], "argument --max-loops: invalid int value: 'many'"),
        (["{good}", "--digits", "0-3"], "digit counts must be >= 1"),
        (["{good}", "--limit", "0"], "--limit must be >= 1"),
    ],
    "analyze": [
        (["{missing}", "--text", "To be"], "does not exist"),
        (["{corrupt}", "--text", "To be"], "model.safetensors is corrupt"),
        (["{good}", "--text", "To be", "--loops", "x"], "argument --loops: invalid int value: 'x'"),
        (["{good}", "--text", "To be", "--loops", "1"], "--loops must be >= 2"),
        (["{good}", "--text", "To be", "--backend", "nope"], "unknown backend 'nope'"),
    ],
}
MAINS = {"train": train.main, "sample": sample.main, "eval_addition": eval_addition.main, "analyze": analyze.main}


@pytest.mark.parametrize("cli,argv,message", [(cli, argv, message) for cli, cases in CASES.items()
                                               for argv, message in cases],
                         ids=[f"{cli}-{i}" for cli, cases in CASES.items() for i in range(len(cases))])
def test_bad_input_is_one_line_and_exit_2(cli, argv, message, checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train's out_dir and data_dir default to relative paths
    argv = [a.format(**checkpoints) for a in argv]
    err = refusal(MAINS[cli], argv, capsys, f"looplm.{cli}")
    assert any(m in err for m in message.split("|")), err


@pytest.mark.parametrize("cli", list(MAINS))
def test_each_command_refuses_a_missing_checkpoint_as_a_command(cli, tmp_path, capsys, monkeypatch):
    """The same through `python -m looplm.<cli>`: the module's own entry point goes through run_cli
    (run in this process with runpy, as `python -m` runs it, without a fresh interpreter's start-up)."""
    argv = [f"--init_from={tmp_path / 'missing'}"] if cli == "train" else [str(tmp_path / "missing")]
    argv += ["--text", "To be"] if cli == "analyze" else []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"looplm/{cli}.py", *argv])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
        runpy.run_module(f"looplm.{cli}", run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith(f"looplm.{cli}: error: ") and "does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
