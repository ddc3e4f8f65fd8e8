"""Character-level tiny-shakespeare, prepared as nanoGPT's `shakespeare_char`.

The corpus ships with the package. `prepare` maps it to a 65-symbol character vocabulary, splits
it 90/10 into train/val and writes `train.bin`, `val.bin` (uint16 token ids) and `meta.json`
(the vocabulary) into a data directory, each file atomically. `get_batch` reads random windows
through `np.memmap`, so the corpus is never held in memory twice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from looplm.fileio import atomic_write_bytes

TRAIN_FRACTION = 0.9
SPLITS = ("train", "val")
PathLike = Union[str, os.PathLike]


def corpus_text() -> str:
    """The bundled tiny-shakespeare corpus."""
    return resources.files("looplm.data").joinpath("tinyshakespeare.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in the sorted alphabet."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the vocabulary of {self.vocab_size} characters")
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def prepare(data_dir: PathLike) -> CharTokenizer:
    """Write train.bin, val.bin and meta.json under data_dir/shakespeare_char unless already there."""
    out = Path(data_dir) / "shakespeare_char"
    meta_path = out / "meta.json"
    if meta_path.exists() and all((out / f"{split}.bin").exists() for split in SPLITS):
        return load_tokenizer(data_dir)
    text = corpus_text()
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n_train = int(len(ids) * TRAIN_FRACTION)
    atomic_write_bytes(out / "train.bin", ids[:n_train].tobytes())
    atomic_write_bytes(out / "val.bin", ids[n_train:].tobytes())
    # meta.json last: its presence means the token files are complete.
    atomic_write_bytes(meta_path, json.dumps({"vocab_size": tokenizer.vocab_size, "chars": tokenizer.chars}).encode())
    return tokenizer


def load_tokenizer(data_dir: PathLike) -> CharTokenizer:
    meta_path = Path(data_dir) / "shakespeare_char" / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing; run looplm.data.shakespeare.prepare({str(data_dir)!r})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt: {e}; remove {meta_path.parent} to prepare the data again") from None
    chars = meta.get("chars") if isinstance(meta, dict) else None
    if not isinstance(chars, str) or not chars:
        raise ValueError(f"{meta_path}: field 'chars' (the vocabulary, a string) is missing or not a string; "
                         f"remove {meta_path.parent} to prepare the data again")
    return CharTokenizer(chars)


def tokens(data_dir: PathLike, split: str) -> np.memmap:
    """The token ids of a split, memory-mapped read-only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / "shakespeare_char" / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run looplm.data.shakespeare.prepare({str(data_dir)!r})")
    size = path.stat().st_size
    if size == 0 or size % np.dtype(np.uint16).itemsize:
        raise ValueError(f"{path} is {'empty' if size == 0 else 'cut short'} ({size} bytes of uint16 token ids); "
                         f"remove {path.parent} to prepare the data again")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: Union[str, torch.device] = "cpu") -> tuple[Tensor, Tensor]:
    """Random windows x (B, T) and their next-token targets y, as nanoGPT's get_batch."""
    if len(data) <= block_size:
        raise ValueError(f"block_size {block_size} needs more than {block_size} tokens; the split has {len(data)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in starts]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in starts]))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class ShakespeareTask:
    """Next-character prediction on tiny-shakespeare: the trainer's view of the prepared data."""

    def __init__(self, data_dir: PathLike, block_size: int):
        self.tokenizer = prepare(data_dir)
        self.block_size = block_size
        self.splits = {split: tokens(data_dir, split) for split in SPLITS}
        for split, data in self.splits.items():  # ids past the vocabulary would index past the embedding
            if int(data.max()) >= self.vocab_size:
                raise ValueError(f"{Path(data_dir) / 'shakespeare_char' / f'{split}.bin'} holds token id "
                                 f"{int(data.max())}, outside meta.json's vocabulary of {self.vocab_size}; remove "
                                 f"{Path(data_dir) / 'shakespeare_char'} to prepare the data again")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator,
                  device: Union[str, torch.device] = "cpu") -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return get_batch(self.splits[split], batch_size, self.block_size, generator, device)
