"""Sample from a trained LoopGPT, as nanoGPT's sample.py:

    python -m looplm.sample CKPT --start "ROMEO:" --num_samples 3 --max_new_tokens 300 --temperature 0.8 --top_k 200

`--start FILE:prompt.txt` reads the prompt from a file. Halting follows the checkpoint's config;
`--halt CRITERION --threshold X --max_loops N` change it for this run (`--halt none` runs every
token for n_loops loops). After the samples, the loops each new token ran: the mean over all
samples and per sample. They come from one traced forward pass over each finished sample: the
model is causal, so that pass halts each position exactly as generation did, for every new token
generated while the whole sample still fitted in one context window (block_size); later tokens
saw a cropped context, and the count says how many tokens the figure covers.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from looplm.checkpoint import load_checkpoint, read_checkpoint_doc
from looplm.cli import ArgumentParser, CLIError, run_cli
from looplm import halting
from looplm.config import HALT_CRITERIA, LoopConfig
from looplm.data import addition
from looplm.data.shakespeare import CharTokenizer, corpus_text
from looplm.model import LoopGPT
from looplm.train_config import resolve_device


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m looplm.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. out/shakespeare_demo/best)")
    p.add_argument("--start", default="\n", help='the prompt, or FILE:path to read it from a file (default "\\n")')
    p.add_argument("--num_samples", type=int, default=10, help="samples to draw (default 10)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; < 1 surer, > 1 more random "
                                                                  "(default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="torch", help="backend to run on (default torch)")
    p.add_argument("--halt", choices=tuple(HALT_CRITERIA), help="halting criterion (default: the checkpoint's)")
    p.add_argument("--threshold", type=float, help="halting threshold, in the criterion's units")
    p.add_argument("--max_loops", type=int, help="loop budget per token with halting (default: the checkpoint's)")
    return p.parse_args(argv)


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise CLIError(f"--start {start!r}: no such file {str(path)!r}")
        start = path.read_text(encoding="utf-8")
    if not start:
        raise CLIError("--start is empty; give at least one character (nanoGPT's default is a newline)")
    return start


def halting_config(config: LoopConfig, halt: Optional[str], threshold: Optional[float],
                   max_loops: Optional[int]) -> LoopConfig:
    """The checkpoint's config with the halting options given on the command line."""
    changes: dict = {}
    if halt is not None and halt != config.halt:
        changes.update(halt=halt, halt_threshold=None, halt_thresholds_after={})  # thresholds of another criterion
    if threshold is not None:
        changes["halt_threshold"] = threshold
    if max_loops is not None:
        changes["max_loops"] = max_loops
    if changes.get("halt") == "none" and threshold is not None:
        raise CLIError("--threshold is given with --halt none; choose a criterion or drop the threshold")
    new = replace(config, **changes)  # LoopConfig validates: a threshold out of range is refused here
    if new.halt == "gate" and config.halt != "gate":
        raise CLIError("--halt gate needs a checkpoint trained with a halting gate (halt='gate'); this one has none")
    return new


def tokenizer_for(path: Path, vocab_size: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) of the task the checkpoint was trained on."""
    task = read_checkpoint_doc(path).get("metadata", {}).get("task", {}).get("task", "shakespeare")
    if task == "addition":
        return addition.encode, addition.decode
    chars = CharTokenizer.from_text(corpus_text())
    if chars.vocab_size != vocab_size:
        raise CLIError(f"{path} has a vocabulary of {vocab_size} tokens, not tiny-shakespeare's {chars.vocab_size} "
                       "characters; looplm.sample knows the shakespeare and addition tasks")
    return chars.encode, chars.decode


@torch.no_grad()
def loops_per_new_token(model: LoopGPT, sample: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The loops run for each new token of `sample` (1, prompt + new) that was generated with the
    whole sample in one context window; position p ran the loops that chose token p + 1."""
    last = min(sample.size(1) - 1, model.config.block_size)  # positions prompt_len-1 .. last-1 made new tokens
    if last < prompt_len:
        return torch.zeros(0, dtype=torch.int32)
    _, _, trace = model(sample[:, :last], return_trace=True)
    return trace.steps[0, prompt_len - 1:].cpu()


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    args = parse_args(argv)
    if args.num_samples < 1:
        raise CLIError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_loops is not None and args.max_loops < 1:
        raise CLIError(f"--max_loops must be >= 1, got {args.max_loops}")
    device = resolve_device(args.device)
    prompt = read_prompt(args.start)
    model = load_checkpoint(args.checkpoint, backend=args.backend, device=device).eval()
    model.config = halting_config(model.config, args.halt, args.threshold, args.max_loops)
    cfg = model.config
    encode, decode = tokenizer_for(args.checkpoint, cfg.vocab_size)
    idx = torch.tensor([encode(prompt)], dtype=torch.long, device=device)

    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(args.seed)
    samples, steps = [], []
    for _ in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        samples.append(decode(out[0].tolist()))
        steps.append(loops_per_new_token(model, out, idx.size(1)))
        print(samples[-1])
        print("---------------", flush=True)

    counted = torch.cat(steps).float()
    if cfg.halt == "none":
        print(f"loops per token: {cfg.n_loops} for every token (no halting)")
    elif counted.numel():
        covered = steps[0].numel()
        scope = "" if covered == args.max_new_tokens else (
            f" (the first {covered} of {args.max_new_tokens} new tokens per sample: those generated within one "
            f"context window of {cfg.block_size})")
        per_sample = ", ".join(f"{s.float().mean().item():.2f}" for s in steps)
        print(f"loops per token, halting on {halting.describe(cfg)} within {cfg.max_loops}: "
              f"mean {counted.mean().item():.2f}{scope}; per sample: {per_sample}")
    else:
        print(f"loops per token: not measured (the prompt fills the context window of {cfg.block_size})",
              file=sys.stderr)
    return samples


if __name__ == "__main__":
    run_cli(main, prog="looplm.sample")
