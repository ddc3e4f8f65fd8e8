"""looplm.sample: nanoGPT's sample.py for a LoopGPT checkpoint, with halting options and loops per token."""
from __future__ import annotations

import re

import pytest
import torch

from looplm import LoopConfig, LoopGPT
from looplm.checkpoint import load_checkpoint, save_checkpoint
from looplm.cli import CLIError
from looplm.sample import loops_per_new_token, main


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    config = LoopConfig(vocab_size=65, block_size=32, n_embd=32, n_head=4, n_loops=3, max_loops=6,
                        halt="entropy", halt_threshold=4.1665)
    return save_checkpoint(LoopGPT(config), tmp_path / "ckpt")


def run(checkpoint, *args):
    return main([str(checkpoint), "--device", "cpu", *args])


def test_samples_start_with_the_prompt_and_report_loops_per_token(checkpoint, capsys):
    samples = run(checkpoint, "--start", "ROMEO:", "--num_samples", "3", "--max_new_tokens", "12",
                  "--temperature", "0.8", "--top_k", "200")
    out = capsys.readouterr().out
    assert len(samples) == 3 and all(s.startswith("ROMEO:") and len(s) == 6 + 12 for s in samples)
    assert out.count("---------------") == 3
    line = next(line for line in out.splitlines() if line.startswith("loops per token"))
    assert "halting on entropy < 4.1665 within 6" in line
    per_sample = [float(v) for v in line.split("per sample: ")[1].split(", ")]
    mean = float(re.search(r"mean ([\d.]+)", line).group(1))
    assert len(per_sample) == 3 and all(1 <= v <= 6 for v in per_sample)
    assert mean == pytest.approx(sum(per_sample) / 3, abs=0.01)


def test_the_seed_decides_the_samples(checkpoint):
    first = run(checkpoint, "--num_samples", "2", "--max_new_tokens", "10", "--seed", "7")
    assert run(checkpoint, "--num_samples", "2", "--max_new_tokens", "10", "--seed", "7") == first
    assert run(checkpoint, "--num_samples", "2", "--max_new_tokens", "10", "--seed", "8") != first


def test_prompt_from_a_file_and_halting_options(checkpoint, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo")
    greedy = run(checkpoint, "--start", f"FILE:{tmp_path / 'prompt.txt'}", "--num_samples", "1",
                 "--max_new_tokens", "5", "--temperature", "0", "--halt", "none")
    assert greedy[0].startswith("JULIET:\nO Romeo")
    assert "loops per token: 3 for every token (no halting)" in capsys.readouterr().out
    run(checkpoint, "--num_samples", "1", "--max_new_tokens", "5", "--halt", "confidence", "--threshold", "0.01",
        "--max_loops", "4")  # every distribution is surer than 1%: every token stops after loop 1
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loops per token")][0]
    assert "halting on confidence > 0.01 within 4: mean 1.00" in line


def test_loops_are_counted_only_where_the_sample_fits_one_context(checkpoint, capsys):
    run(checkpoint, "--start", "ROMEO:", "--num_samples", "1", "--max_new_tokens", "40")
    out = capsys.readouterr().out
    # block_size 32: positions 5 .. 31 made new tokens 1 .. 27 with the whole sample in view
    assert "the first 27 of 40 new tokens per sample" in out


def test_loops_per_new_token_are_what_each_generation_step_ran(checkpoint):
    model = load_checkpoint(checkpoint).eval()
    prompt = torch.tensor([[1, 2, 3]])
    sample = model.generate(prompt, 6, temperature=0)
    steps = loops_per_new_token(model, sample, prompt.size(1))
    for i in range(6):  # the token at prompt + i was chosen by a forward over the i + 3 tokens before it
        _, _, trace = model(sample[:, :3 + i], return_trace=True)
        assert steps[i] == trace.steps[0, -1]


def test_bad_options_are_refused(checkpoint, tmp_path):
    with pytest.raises(CLIError, match="no such file"):
        run(checkpoint, "--start", f"FILE:{tmp_path / 'nope.txt'}")
    with pytest.raises(CLIError, match="--halt gate needs a checkpoint trained with a halting gate"):
        run(checkpoint, "--halt", "gate", "--threshold", "0.5")
    with pytest.raises(ValueError, match=r"halt_threshold for halt='confidence' must be in \(0.0, 1.0\]"):
        run(checkpoint, "--halt", "confidence", "--threshold", "2")
    with pytest.raises(ValueError, match="characters \\['€'\\] are not in the vocabulary"):
        run(checkpoint, "--start", "€")
