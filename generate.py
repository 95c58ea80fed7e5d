"""Complete arbitrary prompts with a saved model and any decoding strategy.

    python generate.py --model runs/sonnet/full-model-gpt2/sonnet-model.pt --prompt "Shall I compare thee"
    python generate.py --model gpt2 --prompt "Hello" --prompt "Once upon" --num_beams 4 --no_repeat_ngram_size 3
    python generate.py --model MODEL --prompts_file prompts.txt --penalty_alpha 0.6 --top_k 4 --contrastive_mean_sim
    python generate.py --model MODEL --prompt "..." --mbr_pool beam:4,sample:8,contrastive:1 --output out.jsonl
    python generate.py --model gpt2 --prompt "Hello" --quantize int8      # weight-only int8 decoding

``--model`` is a model saved by a task script (``save_model``: ``sonnet-model.pt``...; a
prefix-tuned body keeps its prefix), a Trainer checkpoint holding every weight (``best.pt`` of
a full-model run), or a Hugging Face GPT-2 folder or hub id. Every ``GenerationConfig``
setting is a flag of the same name, checked by ``GenerationConfig`` itself while the command
line is parsed (a bad value or combination is one error line, exit status 2, before the model
loads); ``--mbr_pool`` fills a candidate pool per prompt and keeps the chrF consensus
(``decoding.mbr``). Decoding runs on the model prepared inference-only by
``decoding.inference.prepare_for_inference`` (each weight held once, in its decoding layout);
``--quantize bf16|int8|int4`` decodes with bf16 or weight-only int8 / int4 weights.

Output: each completion (prompt included), followed by a blank line, on stdout or in
``--output`` (JSON lines ``{"prompt", "completion"}`` when the name ends in ``.jsonl``); an
existing ``--output`` is refused unless ``--overwrite``. ``--prompts_file`` holds one prompt
per line, a newline inside a prompt written as ``\\n``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from cli.common import pick_device, run_main, seed_everything
from decoding.inference import add_inference_args, decoding_rows, inference_from_args
from decoding.mbr import CandidatePool, mbr_pool_generate
from engine.checkpoints import load_any_model
from engine.data import PadCollator, encode
from models.generation import LineStop, generate, trim
from models.generation_config import GenerationConfig
from models.loading import load_tokenizer

# GenerationConfig fields that are flags of the same name: (field, argparse type or "flag")
SETTINGS: tuple[tuple[str, Any], ...] = (
    ("max_new_tokens", int), ("do_sample", "flag"), ("temperature", float), ("top_k", int), ("top_p", float),
    ("num_beams", int), ("num_return_sequences", int), ("length_penalty", float), ("no_repeat_ngram_size", int),
    ("penalty_alpha", float), ("contrastive_mean_sim", "flag"), ("contrastive_dynamic_alpha", "flag"),
    ("contrastive_alpha_sensitivity", float), ("repetition_penalty", float),
)
EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="saved model (.pt), Trainer checkpoint, or Hugging Face folder/id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts_file", type=str, default=None, help="one prompt per line (\\n for a newline)")
    p.add_argument("--output", type=str, default=None, help="write here instead of stdout (.jsonl: JSON lines)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--tokenizer", type=str, default=None, help="GPT-2 tokenizer folder (vocab.json + merges.txt)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=11711, help="seeds sampling")
    p.add_argument("--device", type=str, default="auto")
    add_inference_args(p)  # --quantize
    g = p.add_argument_group("decoding (GenerationConfig's settings and meanings)")
    defaults = GenerationConfig(max_new_tokens=64)
    for name, kind in SETTINGS:
        if kind == "flag":
            g.add_argument(f"--{name}", action="store_true")
        else:
            g.add_argument(f"--{name}", type=kind, default=getattr(defaults, name))
    g.add_argument("--early_stopping", choices=sorted(EARLY_STOPPING), default="false", help="beam search")
    g.add_argument("--no_eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--num_lines", type=int, default=0, help="stop a row after this many lines (0: off; sonnets: 14)")
    g.add_argument("--no_cache", action="store_true", help="recompute every position (slow; for checks)")
    g.add_argument("--mbr_pool", type=str, default=None,
                   help="MBR over a candidate pool, e.g. beam:4,sample:8,contrastive:1 (chrF consensus)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything that needs no model: the decoding settings (through
    ``GenerationConfig``), the pool, the prompts and the output file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name, _ in SETTINGS}
    try:
        args.generation = GenerationConfig(**settings, early_stopping=EARLY_STOPPING[args.early_stopping],
                                           use_cache=not args.no_cache)
        args.pool = CandidatePool.parse(args.mbr_pool) if args.mbr_pool is not None else None
    except ValueError as e:
        parser.error(f"--{e}" if str(e).split()[0] in settings else str(e))
    if args.batch_size < 1 or args.num_lines < 0:
        parser.error("--batch_size must be >= 1 and --num_lines >= 0")
    if args.pool is not None and args.num_return_sequences != 1:
        parser.error("--mbr_pool returns one completion per prompt; drop --num_return_sequences")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts_file {path} does not exist")
        args.prompt += [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not args.prompt:
        parser.error("give at least one --prompt or a --prompts_file")
    if not Path(args.model).exists() and (args.model.endswith((".pt", ".bin")) or args.model.count("/") > 1):
        parser.error(f"--model {args.model} does not exist (a saved model, checkpoint, Hugging Face folder or hub id)")
    if args.output is not None and Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    return args


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> list[list[str]]:
    """Per prompt, its completions (``num_return_sequences`` of them; one with ``--mbr_pool``).
    ``model`` is consumed (prepared inference-only)."""
    eos = None if args.no_eos else tokenizer.eos_token_id
    stop = LineStop(tokenizer, args.num_lines) if args.num_lines else None
    config = dataclasses.replace(args.generation, eos_token_id=eos, pad_token_id=tokenizer.eos_token_id, stop=stop)
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(args.seed)
    # the model is consumed: its weights held once, in the layout for steps of this many rows
    rows = decoding_rows(min(len(prompts), args.batch_size), config.num_beams, config.num_return_sequences,
                         pooled=args.pool is not None)
    fast = inference_from_args(model, args, inference_only=True, decode_rows=rows)
    ids = encode(tokenizer, prompts, max(1, model.config.max_position_embeddings - config.max_new_tokens), "prompts")
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    out: list[list[str]] = []
    for start in range(0, len(ids), args.batch_size):
        batch = collate([{"input_ids": x} for x in ids[start : start + args.batch_size]])
        x, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if args.pool is not None:
            rows = mbr_pool_generate(fast, x, mask, pool=args.pool, config=config, decode=tokenizer.decode,
                                     generator=gen)
            out += [[tokenizer.decode(r)] for r in rows]
            continue
        n = config.num_return_sequences
        rows = generate(fast, x, mask, config=config, generator=gen)
        n_pad = (mask == 0).sum(-1).tolist()
        texts = [tokenizer.decode(trim(rows[i], x.size(1), n_pad[i // n], eos)) for i in range(rows.size(0))]
        out += [texts[i : i + n] for i in range(0, len(texts), n)]
    return out


def write(prompts: list[str], completions: list[list[str]], output: str | None) -> None:
    if output is not None and output.endswith(".jsonl"):
        lines = [json.dumps({"prompt": p, "completion": c}) for p, cs in zip(prompts, completions) for c in cs]
        text = "\n".join(lines) + "\n"
    else:
        text = "".join(c + "\n\n" for cs in completions for c in cs)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
        print(f"wrote {sum(map(len, completions))} completions to {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> list[list[str]]:
    args = parse_args(argv)
    seed_everything(args.seed)
    device = pick_device(device=args.device)
    model = load_any_model(args.model).to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer, verbose=False)
    completions = complete(model, tokenizer, args.prompt, args)
    write(args.prompt, completions, args.output)
    return completions


if __name__ == "__main__":
    run_main(main)
