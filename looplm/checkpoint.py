"""Checkpoints: a directory holding model.safetensors and config.json (and, for the trainer's
exact resume, train_state.pt), replaced atomically and crash-safe.

Replacing a checkpoint never leaves a moment without one: the new directory is written beside the
old (`.NAME.tmp-XXXXXXXX`, each file flushed to disk), the old is renamed to a backup name
(`.NAME.backup`), the new is renamed in, the folder is flushed, and the backup is removed. A crash
between the two renames leaves only the backup; loading finds it there. A save removes the temporary
directories an interrupted save left. A save that cannot write (a full disk) is one
`CheckpointWriteError` naming the checkpoint and file, and the checkpoint already there is unchanged.

config.json records the sha256 of every file beside it ("sha256": {file: hex digest}); loading
checks them, so bit rot or a truncated copy is an error naming the file rather than wrong weights.
Checkpoints saved before the digests were recorded load without the check. A file that is missing,
corrupt or not a checkpoint is a `CheckpointError` that names it and, where it is a field, the field.

Also: importing a nanoGPT `ckpt.pt`, and transplanting a trained GPT layer into a LoopGPT core.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save as save_safetensors

from looplm.backends import Backend
from looplm.config import LoopConfig
from looplm.fileio import atomic_write_bytes, fsync_dir, remove_paths, remove_stale_temps
from looplm.model import LoopGPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"  # optimizer, RNG and progress: tensors and plain values only
TIED = "transformer.wte.weight"  # the same tensor as lm_head.weight; stored once
DIGESTS = "sha256"  # config.json's field: {file name: sha256 hex digest} of the files beside it


class CheckpointError(ValueError):
    pass


class CheckpointWriteError(OSError):
    """A save that could not write (e.g. a full disk); the checkpoint already there is unchanged."""

    def __init__(self, code: Optional[int], message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def backup_path(path: Union[str, Path]) -> Path:
    """Where the old checkpoint waits while a new one is renamed in."""
    path = Path(path)
    return path.with_name(f".{path.name}.backup")


def temp_dir_prefix(path: Union[str, Path]) -> str:
    """How the directories that saves to `path` build the new checkpoint in begin."""
    return f".{Path(path).name}.tmp-"


def remove_stale_saves(path: Union[str, Path]) -> list[Path]:
    """Remove the temporary directories (and files) that interrupted saves to `path` left beside it;
    returns them. A checkpoint path has one writer: the trainer that owns its out_dir."""
    path = Path(path)
    stale = sorted(Path(p) for p in glob.glob(glob.escape(str(path.parent / temp_dir_prefix(path))) + "*"))
    return remove_paths(stale) + remove_stale_temps(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(model: LoopGPT, path: Union[str, Path], metadata: Optional[dict] = None,
                    train_state: Optional[dict[str, Any]] = None) -> Path:
    """Write model and config (and `train_state`, as train_state.pt) to directory `path`. The new
    directory is built beside it and swapped in by rename, so `path` holds the old checkpoint or the
    new one, never a mix; in the moment between the renames the old one is at backup_path(path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(path)
    backup = backup_path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED}
    files = {WEIGHTS_FILE: save_safetensors(state, metadata={"format": "pt"})}
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        files[TRAIN_STATE_FILE] = buffer.getvalue()
    doc = {"looplm_config": model.config.to_dict(), **({"metadata": metadata} if metadata else {}),
           DIGESTS: {name: sha256(data) for name, data in files.items()}}
    files[CONFIG_FILE] = (json.dumps(doc, indent=2) + "\n").encode()  # last: it vouches for the others
    tmp, writing = None, path.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(path), dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
        for name, data in files.items():
            writing = tmp / name
            atomic_write_bytes(writing, data)
        writing = path
        if path.exists():
            if backup.exists():  # left by a crash after an earlier swap; `path` is complete, so it goes
                shutil.rmtree(backup)
            os.rename(path, backup)
        os.rename(tmp, path)  # a crash just before this leaves the old checkpoint at `backup`
        fsync_dir(path.parent)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = f"writing {writing.name}" if writing != path else "renaming it into place"
        kept = "the checkpoint there is unchanged" if (path.exists() or backup.exists()) else "nothing was saved"
        raise CheckpointWriteError(e.errno, f"cannot save checkpoint {path}: {where}: {reason} ({kept})") from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return path


def checkpoint_dir(path: Union[str, Path]) -> Path:
    """The directory to load `path` from: `path` itself, or its backup when a crash in the middle of
    a save left only that."""
    path = Path(path)
    if not path.exists() and (backup_path(path) / CONFIG_FILE).is_file():
        return backup_path(path)
    return path


def read_checkpoint_doc(path: Union[str, Path]) -> dict[str, Any]:
    """The checkpoint's config.json: {"looplm_config": ..., "metadata": ..., "sha256": ...}, each
    field checked for its type (an object where one is expected), naming the file and field."""
    path = checkpoint_dir(path)
    config_file = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a LoopLM checkpoint: {CONFIG_FILE} is missing")
    try:
        doc = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is corrupt: {e}") from e
    if not isinstance(doc, dict) or "looplm_config" not in doc:
        raise CheckpointError(f"{config_file} does not hold a valid LoopConfig: no 'looplm_config'")
    objects = [("looplm_config", doc["looplm_config"]), ("metadata", doc.get("metadata", {})),
               (DIGESTS, doc.get(DIGESTS, {}))]
    if isinstance(doc.get("metadata"), dict):
        objects.append(("metadata.task", doc["metadata"].get("task", {})))
    for field, value in objects:
        if not isinstance(value, dict):
            raise CheckpointError(f"{config_file}: field {field!r} must be an object, got {value!r:.60}")
    for name, digest in doc.get(DIGESTS, {}).items():
        if not isinstance(digest, str):
            raise CheckpointError(f"{config_file}: field '{DIGESTS}.{name}' must be a hex digest, got {digest!r:.60}")
    return doc


def read_config(path: Union[str, Path]) -> LoopConfig:
    doc = read_checkpoint_doc(path)
    try:
        return LoopConfig.from_dict(doc["looplm_config"])
    except (KeyError, TypeError, ValueError) as e:  # ValueError: ConfigError, or a token id that is no integer
        raise CheckpointError(f"{checkpoint_dir(path) / CONFIG_FILE} does not hold a valid LoopConfig: {e}") from e


def read_checked(path: Union[str, Path], name: str) -> bytes:
    """The bytes of file `name` of checkpoint `path`, checked against the digest config.json records
    for it (none recorded: unchecked, as in checkpoints saved before digests were)."""
    path = checkpoint_dir(path)
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path} is not a LoopLM checkpoint: {name} is missing")
    data = file.read_bytes()
    expected = read_checkpoint_doc(path).get(DIGESTS, {}).get(name)
    if expected is not None and sha256(data) != expected:
        raise CheckpointError(f"{file} is damaged or another checkpoint's: its sha256 differs from the one "
                              f"{CONFIG_FILE} records ('{DIGESTS}.{name}'); bit rot, an incomplete copy or a mix")
    return data


def load_checkpoint(path: Union[str, Path], backend: Union[str, Backend] = "torch",
                    device: Optional[Union[str, torch.device]] = None,
                    expected_config: Optional[LoopConfig] = None) -> LoopGPT:
    """Build the LoopGPT that `path` describes and load its weights, checking every name and shape
    (and the file's recorded sha256). With `expected_config`, a checkpoint made with another config
    is refused, naming the fields."""
    path = checkpoint_dir(path)
    config = read_config(path)
    if expected_config is not None and expected_config != config:
        diff = {k: (v, getattr(config, k)) for k, v in expected_config.to_dict().items()
                if config.to_dict()[k] != v}
        raise CheckpointError(f"{path} was saved with another config; (expected, found): {diff}")
    weights_file = path / WEIGHTS_FILE
    data = read_checked(path, WEIGHTS_FILE)
    try:
        weights = load_safetensors(data)
    except SafetensorError as e:
        raise CheckpointError(f"{weights_file} is corrupt or not a safetensors file: {e}") from e
    model = LoopGPT(config, backend="torch")
    load_state(model, weights, source=str(weights_file))
    if device is not None:
        model.to(device)
    return model.set_backend(backend)


def load_torch_file(path: Union[str, Path], data: Optional[bytes] = None) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only), a corrupt or foreign
    file named as such. `data`: the file's bytes, already read."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist")
        data = path.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is corrupt, or holds objects other than tensors and plain values "
                              f"(loaded with weights_only=True)") from e
    except (EOFError, RuntimeError) as e:  # RuntimeError: torch's reader found a damaged archive
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "the file ends early"
        raise CheckpointError(f"{path} is corrupt: {reason}") from e


def load_train_state(path: Union[str, Path]) -> dict[str, Any]:
    """The trainer's resume state saved with checkpoint `path` (save_checkpoint's train_state),
    checked against its recorded sha256."""
    state_file = checkpoint_dir(path) / TRAIN_STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint to resume from")
    state = load_torch_file(state_file, read_checked(path, TRAIN_STATE_FILE))
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is not a train state: it holds a {type(state).__name__}, not a dict")
    return state


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
    ckpt = load_torch_file(ckpt_path)
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
