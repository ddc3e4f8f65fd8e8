"""Checkpoints: a directory holding model.safetensors and config.json, replaced atomically.

Also: importing a nanoGPT `ckpt.pt`, and transplanting a trained GPT layer into a LoopGPT core.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from looplm.backends import Backend
from looplm.config import ConfigError, LoopConfig
from looplm.fileio import atomic_path, atomic_write_text
from looplm.model import LoopGPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED = "transformer.wte.weight"  # the same tensor as lm_head.weight; stored once


class CheckpointError(ValueError):
    pass


def save_checkpoint(model: LoopGPT, path: Union[str, Path], metadata: Optional[dict] = None) -> Path:
    """Write model and config to directory `path`. The new directory is built beside it and swapped
    in by rename, so `path` holds either the old checkpoint or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
        with atomic_path(tmp / WEIGHTS_FILE) as weights_file:
            save_file(state, weights_file, metadata={"format": "pt"})
        doc = {"looplm_config": model.config.to_dict(), **({"metadata": metadata} if metadata else {})}
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: Union[str, Path]) -> LoopConfig:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a LoopLM checkpoint: {CONFIG_FILE} is missing")
    try:
        doc = json.loads(config_file.read_text())
        return LoopConfig.from_dict(doc["looplm_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{config_file} does not hold a valid LoopConfig: {e}") from e


def load_checkpoint(path: Union[str, Path], backend: Union[str, Backend] = "torch",
                    device: Optional[Union[str, torch.device]] = None,
                    expected_config: Optional[LoopConfig] = None) -> LoopGPT:
    """Build the LoopGPT that `path` describes and load its weights, checking every name and shape.
    With `expected_config`, a checkpoint made with another config is refused, naming the fields."""
    path = Path(path)
    config = read_config(path)
    if expected_config is not None and expected_config != config:
        diff = {k: (v, getattr(config, k)) for k, v in expected_config.to_dict().items()
                if config.to_dict()[k] != v}
        raise CheckpointError(f"{path} was saved with another config; (expected, found): {diff}")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{path} is not a LoopLM checkpoint: {WEIGHTS_FILE} is missing")
    model = LoopGPT(config, backend="torch")
    load_state(model, load_file(weights_file), source=str(weights_file))
    if device is not None:
        model.to(device)
    return model.set_backend(backend)


def load_state(model: LoopGPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into model, refusing missing, unexpected or misshapen tensors with their names."""
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {TIED})
    misshapen = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshapen:
        lines = [f"{source} does not fit the model:"]
        lines += [f"  missing: {missing}"] if missing else []
        lines += [f"  unexpected: {unexpected}"] if unexpected else []
        lines += [f"  shape mismatch: {m}" for m in misshapen]
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


# ---- nanoGPT

NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def import_nanogpt(ckpt_path: Union[str, Path], backend: Union[str, Backend] = "torch") -> LoopGPT:
    """A LoopGPT (n_loops=1, the same function) from a nanoGPT `ckpt.pt`: its model_args and its
    state dict, with or without torch.compile's `_orig_mod.` prefix. Loaded with weights_only=True."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a nanoGPT checkpoint: expected a dict with 'model_args' and "
                              f"'model', found {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
    args = ckpt["model_args"]
    unknown = sorted(set(args) - set(NANOGPT_ARGS))
    if unknown:
        raise CheckpointError(f"{ckpt_path}: unknown nanoGPT model_args {unknown}; known: {list(NANOGPT_ARGS)}")
    config = LoopConfig(**{k: args[k] for k in NANOGPT_ARGS if k in args}, n_loops=1)
    state = {}
    for key, value in ckpt["model"].items():
        key = key.removeprefix("_orig_mod.")
        if key.endswith(".attn.bias"):  # nanoGPT's causal-mask buffer (no flash attention), not a weight
            continue
        state[key.replace("transformer.h.", "transformer.core.")] = value
    model = LoopGPT(config, backend="torch")
    load_state(model, state, source=str(ckpt_path))
    return model.set_backend(backend)


def transplant_layer(source: LoopGPT, target: LoopGPT, source_layer: int, target_layer: int = 0,
                     embeddings: bool = True) -> LoopGPT:
    """Copy core block `source_layer` of a trained GPT into core block `target_layer` of a LoopGPT
    (and, with `embeddings`, its token/position embeddings and final norm), so the loop starts from a
    trained layer. Widths must agree."""
    n_src, n_dst = len(source.transformer.core), len(target.transformer.core)
    if not 0 <= source_layer < n_src:
        raise IndexError(f"source_layer {source_layer} is out of range: the source core has {n_src} layers")
    if not 0 <= target_layer < n_dst:
        raise IndexError(f"target_layer {target_layer} is out of range: the target core has {n_dst} layers")
    src_block, dst_block = source.transformer.core[source_layer], target.transformer.core[target_layer]
    pairs = [(src_block.state_dict(), dst_block.state_dict())]
    if embeddings:
        for name in ("wte", "wpe", "ln_f"):
            pairs.append((source.transformer[name].state_dict(), target.transformer[name].state_dict()))
    for src, dst in pairs:
        for k, v in dst.items():
            if src[k].shape != v.shape:
                raise CheckpointError(f"cannot transplant {k}: source {tuple(src[k].shape)} vs target {tuple(v.shape)}")
    with torch.no_grad():
        for src, dst in pairs:
            for k, v in dst.items():
                v.copy_(src[k])
    return target
