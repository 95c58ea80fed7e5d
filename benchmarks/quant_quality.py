"""What quantised decoding costs in quality, on a trained model: for bf16, int8 and int4
against float32, the greedy token agreement over ``--new_tokens`` new tokens, the held-out
perplexity change, and the dev chrF change of greedy sonnet completions.

    python benchmarks/quant_quality.py --model runs/sonnet/full-model-<run>/sonnet-model.pt
    python benchmarks/quant_quality.py --model path/to/hf_folder --text data/TRUE_sonnets_held_out_dev.txt

``--model`` is a model saved by a task script or ``pretrain.py`` (``{config, model, extra}``)
or a Hugging Face folder. Only a trained model's numbers mean anything: a random model's
logits are near ties everywhere, so any rounding flips its greedy tokens.

- Agreement: each dev prompt continued greedily for ``--new_tokens`` tokens (no stop), the
  fraction of positions where the quantised model's token equals float32's (after a first
  divergence the texts usually part, so this also reflects how early that comes).
- Forced agreement: along float32's greedy continuations (teacher forcing), the fraction of
  positions where the quantised model's next-token argmax equals float32's: the same question
  without the cascade, so it varies far less with where a first flip happens.
- Perplexity: ``--text`` tokenized whole (its last ``--held_out_fraction`` of tokens only:
  0.05 is the tail ``pretrain.py`` held out), cut into blocks of ``--block_size`` tokens,
  exp of the mean next-token loss (the prefill path of each representation).
- chrF: the dev prompts completed greedily into 14-line sonnets (EOS or 14 lines), corpus
  chrF against the true dev sonnets, as ``sonnet_generation.py`` scores them.

``--quantize`` also takes ``int8-gptq`` / ``int4-gptq`` (GPTQ on the ``--calibration`` text's
first 90%), and ``--compare LABEL=QUANT:MODEL`` adds a row for another model (e.g. a
quantisation-aware fine-tune of ``--model``: ``pretrain.py --qat int4``) prepared with QUANT,
measured against ``--model``'s float32 like the others.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decoding.gptq import CALIBRATION_TEXT, GPTQ_CHOICES, Calibration  # noqa: E402
from decoding.inference import prepare_for_decoding  # noqa: E402
from decoding.quant import QUANTIZE_CHOICES, QuantizationUnavailable, check_quantize  # noqa: E402
from models.generation import LineStop  # noqa: E402
from models.generation_config import GenerationConfig  # noqa: E402
from models.loading import CheckpointError, load_tokenizer  # noqa: E402
from tasks.course_data import read_sonnets  # noqa: E402
from tasks.metrics import chrf  # noqa: E402
from tasks.restore import restore_task_model  # noqa: E402
from tasks.sonnet import continue_prompts  # noqa: E402


def greedy_continuations(model, tokenizer, prompts: list[str], new_tokens: int, stop: bool) -> list[list[int]]:
    """Greedy continuations (new tokens only): exactly ``new_tokens`` each without ``stop``,
    else cut at EOS or the 14th line."""
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=eos if stop else None, pad_token_id=eos,
                              stop=LineStop(tokenizer, 14) if stop else None)
    return [new for _, new in continue_prompts(model, tokenizer, prompts, config, batch_size=8)]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, block_size: int, max_blocks: int, tail: float = 1.0) -> float:
    toks = torch.tensor(tokenizer(text)["input_ids"])
    toks = toks[toks.numel() - int(toks.numel() * tail):]  # the last ``tail`` of the tokens
    blocks = toks[: toks.numel() // block_size * block_size].view(-1, block_size)[:max_blocks]  # (N, T)
    if blocks.numel() == 0:
        raise SystemExit(f"error: the perplexity text has fewer than {block_size} tokens; pass a longer --text")
    nll, n = 0.0, 0
    for row in blocks.split(8):
        logits = model.hidden_state_to_token(model(row)["last_hidden_state"][:, :-1])  # (b, T-1, V)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), row[:, 1:].flatten(), reduction="sum").item()
        n += row[:, 1:].numel()
    return math.exp(nll / n)


@torch.no_grad()
def forced_argmax(model, tokenizer, prompts: list[str], continuations: list[list[int]]) -> list[list[int]]:
    """Each position's argmax along a fixed path (prompt + ``continuations``, teacher forcing):
    what the model would pick next given the same context, so one early flip does not decide
    the rest as it does in free-running greedy decoding."""
    out = []
    for prompt, cont in zip(prompts, continuations):
        ids = tokenizer.encode(prompt)
        seq = torch.tensor([ids + cont[:-1]])
        logits = model.hidden_state_to_token(model(seq)["last_hidden_state"][:, len(ids) - 1:])
        out.append(logits.argmax(-1)[0].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in b))


def parse_compare(spec: str) -> tuple[str, str, str]:
    """``LABEL=QUANT:MODEL`` -> (label, quant, model path)."""
    label, _, rest = spec.partition("=")
    quant, _, path = rest.partition(":")
    if not (label and quant in QUANTIZE_CHOICES and path):
        raise argparse.ArgumentTypeError(f"{spec!r}: write LABEL=QUANT:MODEL, QUANT one of {QUANTIZE_CHOICES}")
    return label, quant, path


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a save_model checkpoint (.pt) or a Hugging Face folder")
    p.add_argument("--text", default="data/TRUE_sonnets_held_out_dev.txt", help="held-out text for perplexity")
    p.add_argument("--prompts", default="data/sonnets_held_out_dev.txt", help="dev prompts (sonnet format)")
    p.add_argument("--references", default="data/TRUE_sonnets_held_out_dev.txt", help="true dev sonnets")
    p.add_argument("--quantize", nargs="+", default=["bf16", "int8", "int4"],
                   choices=QUANTIZE_CHOICES[1:] + GPTQ_CHOICES)
    p.add_argument("--calibration", default=CALIBRATION_TEXT, help="GPTQ's calibration text (its first 90%%)")
    p.add_argument("--held_out_fraction", type=float, default=1.0,
                   help="perplexity on this last fraction of --text's tokens (pretrain.py holds out 0.05)")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=QUANT:MODEL", type=parse_compare,
                   help="also MODEL prepared with QUANT (none, bf16, int8, int4), against --model's float32")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--chrf_tokens", type=int, default=160, help="token budget of each completed sonnet")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--max_blocks", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = restore_task_model(args.model, "body").model.eval()
        for q in args.quantize + [quant for _, quant, _ in args.compare]:
            check_quantize(q.removesuffix("-gptq"), "cpu", model.config.hidden_size)
        compared = {label: (quant, restore_task_model(path, "body").model.eval())
                    for label, quant, path in args.compare}
        tok = load_tokenizer(args.tokenizer, verbose=False)
        prompts = [s.text for s in read_sonnets(args.prompts, args.limit)]
        refs = [s.text for s in read_sonnets(args.references, args.limit)]
        text = Path(args.text).read_text()
    except (CheckpointError, QuantizationUnavailable, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def measure(m) -> tuple[list[list[int]], float, float]:
        greedy = greedy_continuations(m, tok, prompts, args.new_tokens, stop=False)
        done = greedy_continuations(m, tok, prompts, args.chrf_tokens, stop=True)
        texts = [tok.decode(tok.encode(pr) + d).strip() for pr, d in zip(prompts, done)]
        return greedy, perplexity(m, tok, text, args.block_size, args.max_blocks, args.held_out_fraction), \
            chrf(texts, refs)

    ref_greedy, ref_ppl, ref_chrf = measure(model)
    ref_forced = forced_argmax(model, tok, prompts, ref_greedy)
    print(f"model {args.model}: {len(prompts)} prompts, perplexity on {args.text}, greedy over {args.new_tokens} "
          f"new tokens\n{'':>8} {'agreement':>10} {'forced':>7} {'perplexity':>11} {'change':>8} {'chrF':>7} "
          f"{'change':>7}")
    print(f"{'float32':>8} {1:10.3f} {1:7.3f} {ref_ppl:11.3f} {'':>8} {ref_chrf:7.2f}")
    results = {"float32": {"agreement": 1.0, "forced_agreement": 1.0, "perplexity": ref_ppl, "chrf": ref_chrf}}
    rows = [(q, q, model) for q in args.quantize] + [(label, q, m) for label, (q, m) in compared.items()]
    calibration = Calibration(args.calibration, tok)  # tokenised once for every GPTQ row
    for q, quant, source in rows:
        fast = prepare_for_decoding(source, quant, calibration=calibration)
        greedy, ppl, ch = measure(fast)
        forced = agreement(forced_argmax(fast, tok, prompts, ref_greedy), ref_forced)
        results[q] = {"agreement": agreement(greedy, ref_greedy), "forced_agreement": forced, "perplexity": ppl,
                      "chrf": ch}
        print(f"{q:>8} {results[q]['agreement']:10.3f} {forced:7.3f} {ppl:11.3f} {100 * (ppl / ref_ppl - 1):+7.2f}% "
              f"{ch:7.2f} {ch - ref_chrf:+7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
