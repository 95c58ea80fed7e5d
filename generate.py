"""Complete arbitrary prompts with a saved model and any decoding strategy.

    python generate.py --model runs/sonnet/full-model-gpt2/latest/sonnet-model.pt --prompt "Shall I compare thee"
    python generate.py --model gpt2 --prompt "Hello" --prompt "Once upon" --num_beams 4 --no_repeat_ngram_size 3
    python generate.py --model MODEL --prompts_file prompts.txt --penalty_alpha 0.6 --top_k 4 --contrastive_mean_sim
    python generate.py --model MODEL --prompt "..." --mbr_pool beam:4,sample:8,contrastive:1 --output out.jsonl
    python generate.py --model gpt2 --prompt "Hello" --quantize int8      # weight-only int8 decoding
    python generate.py --model gpt2 --prompt "Hello" --compile_decode     # static cache, compiled step
    python generate.py --model gpt2-medium --prompt "Hello" --draft_model gpt2 --draft_k 4   # speculative decoding

``--model`` is a model saved by a task script (``save_model``: ``sonnet-model.pt``...; a
prefix-tuned body keeps its prefix), a Trainer checkpoint holding every weight (``best.pt`` of
a full-model run), or a Hugging Face GPT-2 folder or hub id. Every ``GenerationConfig``
setting is a flag of the same name (``cli.generate``), checked by ``GenerationConfig`` itself
while the command line is parsed (a bad value or combination is one error line, exit status 2,
before the model loads); ``--mbr_pool`` fills a candidate pool per prompt and keeps the chrF consensus
(``decoding.mbr``). Decoding runs on the model prepared inference-only by
``decoding.inference.prepare_for_inference`` (each weight held once, in its decoding layout);
``--quantize bf16|int8|int4`` decodes with bf16 or weight-only int8 / int4 weights
(``int8-gptq|int4-gptq``: rounded by GPTQ on the ``--calibration`` text). ``--draft_model`` decodes
speculatively (``decoding.speculative``, one prompt at a time): the same tokens (greedy) or the same
distribution (sampling), and one line on stderr with the draft's acceptance rate.

Output: each completion (prompt included), followed by a blank line, on stdout or in
``--output`` (JSON lines ``{"prompt", "completion"}`` when the name ends in ``.jsonl``); an
existing ``--output`` is refused unless ``--overwrite``. ``--prompts_file`` holds one prompt
per line, a newline inside a prompt written as ``\\n``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cli.common import pick_device, run_main, seed_everything
from cli.generate import GenerateSettings, parse_settings
from decoding.compiled import compile_decoding
from decoding.gptq import Calibration
from decoding.inference import decoding_rows, prepare_for_decoding
from decoding.mbr import mbr_pool_generate
from decoding.speculative import SpeculativeStats, check_draft, speculative_generate
from engine.data import PadCollator, encode
from models.generation import LineStop, generate, trim
from models.loading import load_tokenizer
from tasks.common import check_context
from tasks.restore import restore_task_model


@torch.no_grad()
def step_rows(settings: GenerateSettings, num_prompts: int, speculative: bool = False) -> int:
    """The rows of each decoding step ``settings`` make for ``num_prompts`` prompts (what the model's
    layouts are chosen for): a batch's prompts times beams or return sequences, or with a speculative
    draft, one prompt whose target scores ``draft_k + 1`` positions per forward."""
    if speculative:
        return settings.draft_k + 1
    g = settings.generation
    return decoding_rows(min(num_prompts, settings.batch_size), g.num_beams, g.num_return_sequences,
                         pooled=settings.pool is not None)


def prepare(model, tokenizer, settings: GenerateSettings, num_prompts: int, draft=None):
    """``model`` (and the speculative ``draft``) consumed: prepared for decoding inference-only as
    ``settings`` ask (``--quantize``, GPTQ on ``--calibration``, ``--compile_decode``), laid out for the
    steps ``num_prompts`` prompts make. Returns (model, draft), the draft ``None`` without one."""
    calibration = Calibration(settings.calibration, tokenizer)  # GPTQ's text, tokenised once for model and draft
    fast = prepare_for_decoding(model, settings.quantize, inference_only=True,
                                decode_rows=step_rows(settings, num_prompts, draft is not None),
                                calibration=calibration)
    if settings.compile_decode:  # a static cache and a step compiled once per (rows, length)
        fast = compile_decoding(fast)
    if draft is not None:
        draft = prepare_for_decoding(draft, settings.quantize, inference_only=True, calibration=calibration)
    return fast, draft


def complete(fast, tokenizer, prompts: list[str], settings: GenerateSettings, draft=None) -> list[list[str]]:
    """Per prompt, its completions (``num_return_sequences`` of them; one with ``--mbr_pool``), decoded
    with ``fast`` (and the speculative ``draft``, one prompt at a time) as ``prepare`` made them."""
    eos = tokenizer.eos_token_id if settings.stop_at_eos else None
    stop = LineStop(tokenizer, settings.num_lines) if settings.num_lines else None
    config = dataclasses.replace(settings.generation, eos_token_id=eos, pad_token_id=tokenizer.eos_token_id, stop=stop)
    device = fast.device
    gen = torch.Generator(device).manual_seed(settings.seed)
    batch_size, pool = (1 if draft is not None else settings.batch_size), settings.pool
    if draft is not None:
        stats = SpeculativeStats()
    context = min(m.config.max_position_embeddings for m in (fast, draft) if m is not None)
    ids = encode(tokenizer, prompts, max(1, context - config.max_new_tokens), "prompts")
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")

    def complete_batch(x: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
        if pool is not None:
            rows = mbr_pool_generate(fast, x, mask, pool=pool, config=config, decode=tokenizer.decode, generator=gen)
            return [[tokenizer.decode(r)] for r in rows]
        n = config.num_return_sequences
        if draft is not None:
            rows = speculative_generate(fast, draft, x, mask, config=config, k=settings.draft_k, generator=gen,
                                        stats=stats)
        else:
            rows = generate(fast, x, mask, config=config, generator=gen)
        n_pad = (mask == 0).sum(-1).tolist()
        texts = [tokenizer.decode(trim(rows[i], x.size(1), n_pad[i // n], eos)) for i in range(rows.size(0))]
        return [texts[i : i + n] for i in range(0, len(texts), n)]

    out: list[list[str]] = []
    with tqdm(total=len(ids), unit="prompt", desc="generating", file=sys.stderr,
              disable=not settings.progress or len(ids) <= batch_size) as bar:
        for start in range(0, len(ids), batch_size):
            batch = collate([{"input_ids": x} for x in ids[start : start + batch_size]])
            out += complete_batch(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            bar.update(len(batch["input_ids"]))
    if draft is not None:
        print(stats.summary(), file=sys.stderr)
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
    settings = parse_settings(argv, description=__doc__.split("\n\n")[0])
    seed_everything(settings.seed)
    device = pick_device(device=settings.device)
    model = restore_task_model(settings.model, "body").model.to(device).eval()
    check_context(model.config.max_position_embeddings, max_new_tokens=settings.generation.max_new_tokens)
    tokenizer = load_tokenizer(settings.tokenizer, verbose=False)
    prompts = list(settings.prompts)
    draft = None
    if settings.draft_model is not None:
        draft = restore_task_model(settings.draft_model, "body").model.to(device).eval()
        check_draft(model, draft)
        check_context(draft.config.max_position_embeddings, max_new_tokens=settings.generation.max_new_tokens)
    fast, draft = prepare(model, tokenizer, settings, len(prompts), draft)
    completions = complete(fast, tokenizer, prompts, settings, draft)
    write(prompts, completions, settings.output)
    return completions


if __name__ == "__main__":
    run_main(main)
