"""Checkpoints: round trip, refusals, atomic replacement, nanoGPT import, layer transplant."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from looplm import LoopConfig, LoopGPT
from looplm import checkpoint as ckpt_module
from looplm.checkpoint import (CheckpointError, CheckpointWriteError, backup_path, import_nanogpt, load_checkpoint,
                               load_train_state, read_checkpoint_doc, read_config, save_checkpoint, transplant_layer)
from looplm.testing import assert_close
from tests.nanogpt_arch import GPT, GPTConfig


def small(**overrides) -> LoopConfig:
    base = dict(vocab_size=23, block_size=16, n_embd=32, n_head=4, n_layer=1, n_loops=3, step_encoding="learned",
                update="euler", halt="entropy", halt_threshold=0.5, halt_thresholds_after={7: 0.1})
    return LoopConfig(**{**base, **overrides})


def test_round_trip_gives_the_same_model(tmp_path):
    model = LoopGPT(small()).eval()
    path = save_checkpoint(model, tmp_path / "ckpt", metadata={"iter": 12})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text())["metadata"] == {"iter": 12}
    loaded = load_checkpoint(path).eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr(), "tying survives loading"
    idx = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, idx)[0], model(idx, idx)[0], rtol=0, atol=0)


def test_overwrite_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    first = LoopGPT(small())
    path = save_checkpoint(first, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def disk_full(target, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"cannot save checkpoint .*ckpt: writing model.safetensors: "
                                                   r"no space left on device \(the checkpoint there is unchanged\)"):
        save_checkpoint(LoopGPT(small(n_loops=5)), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary directory is left behind"


def test_loading_refuses_what_does_not_fit(tmp_path):
    path = save_checkpoint(LoopGPT(small()), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="saved with another config.*'n_loops': \\(4, 3\\)"):
        load_checkpoint(path, expected_config=small(n_loops=4))
    # weights of another width under this config: every misfit is named with both shapes
    other = save_checkpoint(LoopGPT(small(n_embd=64)), tmp_path / "wide")
    (other / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="wide/model.safetensors is damaged or another"):  # another's digest
        load_checkpoint(other)
    forget_digests(other)
    with pytest.raises(CheckpointError, match=r"shape mismatch: transformer.core.0.attn.c_attn.weight: "
                                              r"checkpoint \(192, 64\) vs model \(96, 32\)"):
        load_checkpoint(other)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        read_config(path)
    (path / "config.json").write_text('{"looplm_config": {"n_loops": 0}}')
    with pytest.raises(CheckpointError, match="does not hold a valid LoopConfig"):
        read_config(path)
    with pytest.raises(CheckpointError, match="'.*nowhere' does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")


def forget_digests(path):
    """config.json as checkpoints saved before the digests were recorded have it."""
    doc = json.loads((path / "config.json").read_text())
    del doc["sha256"]
    (path / "config.json").write_text(json.dumps(doc))


def test_corrupt_files_are_named(tmp_path):
    path = save_checkpoint(LoopGPT(small()), tmp_path / "ckpt", train_state={"step": torch.ones(2)})
    assert torch.equal(load_train_state(path)["step"], torch.ones(2))
    weights, state_file = path / "model.safetensors", path / "train_state.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    state_file.write_bytes(state_file.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors is damaged or another checkpoint.s: its sha256"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="train_state.pt is damaged or another checkpoint.s: its sha256"):
        load_train_state(path)
    forget_digests(path)  # without digests, the readers find the damage themselves
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="train_state.pt is corrupt"):
        load_train_state(path)
    torch.save({"config": small()}, state_file)  # an object, not tensors and plain values
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_train_state(path)


def test_bit_rot_in_the_weights_is_caught_by_the_recorded_digest(tmp_path):
    """One flipped bit in a tensor's data still parses as safetensors; the sha256 in config.json
    catches it. A checkpoint saved before digests were recorded loads unchecked."""
    model = LoopGPT(small())
    path = save_checkpoint(model, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt/model.safetensors is damaged .*'sha256.model.safetensors'"):
        load_checkpoint(path)
    forget_digests(path)
    rotten = load_checkpoint(path)  # what loading did before: the flipped bit goes unnoticed
    assert any(not torch.equal(a, b) for a, b in zip(rotten.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("doc, field", [
    ({"metadata": "x"}, "'metadata' must be an object"),
    ({"metadata": {"task": 3}}, "'metadata.task' must be an object"),
    ({"sha256": ["abc"]}, "'sha256' must be an object"),
    ({"sha256": {"model.safetensors": 1}}, "'sha256.model.safetensors' must be a hex digest"),
    ({"looplm_config": 7}, "'looplm_config' must be an object"),
])
def test_ill_typed_fields_of_config_json_are_named(tmp_path, doc, field):
    path = save_checkpoint(LoopGPT(small()), tmp_path / "ckpt")
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **doc}))
    with pytest.raises(CheckpointError, match=f"ckpt/config.json: field {field}"):
        read_checkpoint_doc(path)


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    old = LoopGPT(small())
    path = save_checkpoint(old, tmp_path / "ckpt", metadata={"iter": 1})
    real_rename = os.rename

    def crash_on_swap_in(src, dst):
        if Path(dst) == path:  # the old one has been moved aside; the new one is not in yet
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)
    monkeypatch.setattr(ckpt_module.os, "rename", crash_on_swap_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(LoopGPT(small(n_loops=5)), path, metadata={"iter": 2})
    monkeypatch.undo()
    assert not path.exists() and backup_path(path).is_dir()
    loaded = load_checkpoint(path)  # from the backup
    assert loaded.config == old.config and read_checkpoint_doc(path)["metadata"] == {"iter": 1}
    for a, b in zip(loaded.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)
    # the next save completes the swap and leaves nothing else behind
    save_checkpoint(LoopGPT(small(n_loops=6)), path, metadata={"iter": 3})
    assert load_checkpoint(path).config.n_loops == 6
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_crash_before_the_backup_is_removed_leaves_the_new_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(LoopGPT(small()), tmp_path / "ckpt")
    real_rmtree = shutil.rmtree

    def crash_on_cleanup(target, *args, **kwargs):
        if Path(target) == backup_path(path):
            raise KeyboardInterrupt("killed")
        real_rmtree(target, *args, **kwargs)
    monkeypatch.setattr(ckpt_module.shutil, "rmtree", crash_on_cleanup)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(LoopGPT(small(n_loops=5)), path)
    monkeypatch.undo()
    assert load_checkpoint(path).config.n_loops == 5 and backup_path(path).is_dir()
    save_checkpoint(LoopGPT(small(n_loops=6)), path)  # a stale backup is cleared first
    assert load_checkpoint(path).config.n_loops == 6 and not backup_path(path).exists()


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = save_checkpoint(LoopGPT(small(n_coda=1)), tmp_path / "ckpt")
    doc = json.loads((path / "config.json").read_text())
    doc["looplm_config"]["n_coda"] = 0
    doc["looplm_config"]["n_prelude"] = 1
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "missing: ['transformer.prelude.0" in str(err.value)
    assert "unexpected: ['transformer.coda.0" in str(err.value)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "mask-buffer"])
@pytest.mark.parametrize("compiled_prefix", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_import_gives_nanogpts_logits(tmp_path, compiled_prefix, bias, flash):
    config = GPTConfig(block_size=16, vocab_size=29, n_layer=3, n_head=2, n_embd=24, bias=bias)
    gpt = GPT(config, flash=flash).eval()
    for name, p in gpt.named_parameters():  # large random weights: a wrong mapping must show in the logits
        if not name.startswith("transformer.ln"):
            torch.nn.init.normal_(p, std=0.2)
    state = gpt.state_dict()
    if compiled_prefix:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "model_args": dict(vars(config)), "iter_num": 10, "best_val_loss": 2.0}, path)
    model = import_nanogpt(path).eval()
    assert model.config.n_layer == 3 and model.config.n_loops == 1 and model.config.bias is bias
    idx = torch.randint(0, 29, (2, 16))
    with torch.no_grad():
        logits, loss = model(idx, idx)
        expected_logits, expected_loss = gpt(idx, idx)
        assert_close(logits, expected_logits)  # fp32's one-op tolerance
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)


def test_nanogpt_import_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a nanoGPT checkpoint: expected a dict with 'model_args'"):
        import_nanogpt(path)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    state = GPT(config).state_dict()
    del state["transformer.h.0.mlp.c_fc.weight"]
    torch.save({"model": state, "model_args": dict(vars(config))}, path)
    with pytest.raises(CheckpointError, match=r"missing: \['transformer.core.0.mlp.c_fc.weight'\]"):
        import_nanogpt(path)


def test_transplant_a_trained_layer_into_the_loop():
    gpt = LoopGPT(LoopConfig(vocab_size=23, block_size=16, n_embd=32, n_head=4, n_layer=3, n_loops=1))
    loop = LoopGPT(LoopConfig(vocab_size=23, block_size=16, n_embd=32, n_head=4, n_layer=1, n_loops=4))
    transplant_layer(gpt, loop, source_layer=2)
    src, dst = gpt.transformer.core[2].state_dict(), loop.transformer.core[0].state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src)
    assert torch.equal(loop.transformer.wte.weight, gpt.transformer.wte.weight)
    assert loop.lm_head.weight.data_ptr() == loop.transformer.wte.weight.data_ptr()
    # one loop of the transplanted layer is that layer of the GPT applied to the embeddings
    idx = torch.randint(0, 23, (1, 8))
    with torch.no_grad():
        x0 = gpt.embed(idx)
        expected = gpt.head(gpt.transformer.core[2](x0))
        torch.testing.assert_close(loop(idx, idx, n_loops=1)[0], expected)
    with pytest.raises(IndexError, match="source_layer 3 is out of range: the source core has 3 layers"):
        transplant_layer(gpt, loop, source_layer=3)
    wide = LoopGPT(LoopConfig(vocab_size=23, block_size=16, n_embd=64, n_head=4, n_layer=1, n_loops=2))
    with pytest.raises(CheckpointError, match="cannot transplant"):
        transplant_layer(gpt, wide, source_layer=0)
