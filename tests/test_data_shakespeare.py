"""tiny-shakespeare: vocabulary, 90/10 split, atomic memmapped token files, batches."""
import numpy as np
import pytest
import torch

from looplm.data import shakespeare
from looplm.data.shakespeare import CharTokenizer, ShakespeareTask, corpus_text, get_batch, prepare, tokens


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare(path)
    return path


def test_vocabulary_is_the_65_characters_of_the_corpus(data_dir):
    tokenizer = prepare(data_dir)
    assert tokenizer.vocab_size == 65
    assert tokenizer.chars == "".join(sorted(set(corpus_text())))


def test_split_is_90_10_and_decodes_back_to_the_corpus(data_dir):
    tokenizer = prepare(data_dir)
    train, val = tokens(data_dir, "train"), tokens(data_dir, "val")
    text = corpus_text()
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert tokenizer.decode(train[:1000].tolist()) == text[:1000]
    # nanoGPT's ids: a character's index in the sorted vocabulary (a shifted id map would decode back too)
    assert train[:1000].tolist() == [tokenizer.chars.index(c) for c in text[:1000]]
    assert tokenizer.chars.index("\n") == 0 and tokenizer.chars.index(" ") == 1 and tokenizer.chars[-1] == "z"
    assert tokenizer.decode(val[-1000:].tolist()) == text[-1000:]


def test_prepare_writes_once_and_leaves_no_temporary_files(data_dir):
    out = data_dir / "shakespeare_char"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare(data_dir)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert sorted(stamps) == ["meta.json", "train.bin", "val.bin"]


def test_interrupted_prepare_is_redone(tmp_path, monkeypatch):
    """meta.json is written last: without it the token files are not trusted."""
    calls = []
    real_write = shakespeare.atomic_write_bytes

    def fail_on_meta(path, data):
        calls.append(path.name)
        if path.name == "meta.json":
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(shakespeare, "atomic_write_bytes", fail_on_meta)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path)
    monkeypatch.setattr(shakespeare, "atomic_write_bytes", real_write)
    assert calls == ["train.bin", "val.bin", "meta.json"], "meta.json must come after the token files"
    assert not (tmp_path / "shakespeare_char" / "meta.json").exists()
    assert prepare(tmp_path).vocab_size == 65


def test_a_missing_token_file_is_written_again(tmp_path):
    out = tmp_path / "shakespeare_char"
    prepare(tmp_path)
    val = (out / "val.bin").read_bytes()
    (out / "val.bin").unlink()
    prepare(tmp_path)
    assert (out / "val.bin").read_bytes() == val


def test_batches_are_next_character_windows_and_follow_the_generator(data_dir):
    data = tokens(data_dir, "val")
    x, y = get_batch(data, 4, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64 and y.dtype == torch.int64
    windows = np.lib.stride_tricks.sliding_window_view(data, 33)
    for row_x, row_y in zip(x, y):  # each row is a window of the split, and y the same window one token on
        starts = np.flatnonzero((windows[:, :32] == row_x.numpy()).all(axis=1))
        assert len(starts) and any((windows[i, 1:] == row_y.numpy()).all() for i in starts)
    x2, _ = get_batch(data, 4, 32, torch.Generator().manual_seed(3))
    x3, _ = get_batch(data, 4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_task_view_and_errors(data_dir):
    task = ShakespeareTask(data_dir, block_size=16)
    x, y = task.get_batch("train", 2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 16) and task.vocab_size == 65
    with pytest.raises(ValueError, match="split must be one of"):
        task.get_batch("test", 2, torch.Generator())
    with pytest.raises(ValueError, match="block_size 10 needs more than 10 tokens"):
        get_batch(np.zeros(10, dtype=np.uint16), 1, 10, torch.Generator())
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharTokenizer("abc").encode("abd")
    with pytest.raises(FileNotFoundError, match="prepare"):
        shakespeare.load_tokenizer(data_dir / "nowhere")


def test_batches_reach_every_window_and_no_further():
    """Token ids equal to their positions: a window shows where it starts. With 2 tokens more than the
    block, there are exactly two windows whose targets fit, starting at 0 and 1."""
    data = np.arange(10, dtype=np.uint16)
    x, y = get_batch(data, 64, 8, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}
    assert torch.equal(x, x[:, :1] + torch.arange(8)) and torch.equal(y, x + 1)
