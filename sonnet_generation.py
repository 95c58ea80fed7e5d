"""Sonnet generation: fine-tune GPT-2 on Shakespeare's sonnets, then complete held-out prompts.

    python sonnet_generation.py --use_gpu                                  # full model, nucleus sampling
    python sonnet_generation.py --fine-tune-mode lora --lr 3e-4            # LoRA on attention and MLP
    python sonnet_generation.py --decoding beam --num_beams 4 --no_repeat_ngram_size 3
    python sonnet_generation.py --generate_only --checkpoint runs/sonnet/full-model-gpt2/sonnet-model.pt --decoding mbr
    python sonnet_generation.py --model_size tiny --random_init --epochs 1 --limit 8 --max_new_tokens 24  # smoke run

Training: the LM loss over every real token of each sonnet (padding ignored, an EOS
appended so the model learns where a sonnet ends), through the shared Trainer
(warm-up, clipping, early stopping, the top-3 checkpoints by dev chrF). Each epoch the
dev prompts (the first 3 lines of each held-out sonnet) are completed and scored with
sacrebleu chrF against the true sonnets. Then ``predictions/generated_sonnets.txt``
(test prompts) and ``predictions/generated_sonnets_dev.txt`` are written in the
starter's format, and the best model is saved as a plain GPT-2 checkpoint.

Decoding (``--decoding``): greedy, sample (temperature, top-k, top-p), beam, contrastive
(``--penalty_alpha``, ``--top_k``) or mbr (``--mbr_candidates`` samples, keep the one
with the highest mean chrF against the others); every sonnet stops at EOS or at
``--num_lines`` lines. The defaults are nucleus sampling with top-p 0.9 and
temperature 1.2, the starter's settings and the best reported for this task.

Public API: ``sonnet_features`` and ``fine_tune_lm`` train a ``SonnetGPT`` on any list
of texts (e.g. another corpus), ``complete_prompts`` decodes, ``dev_chrf`` scores.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from models.generation import LineStop, generate, trim
from models.heads import SonnetGPT, count_parameters, set_fine_tune_mode
from models.inference import add_inference_args, inference_from_args, prepare_for_inference
from models.loading import CheckpointError, load_checkpoint, load_model, save_model
from models.mbr import mbr_generate
from modules.lora import unwrap_lora
from pretrain import add_attention_args, add_pretrain_args, attention_overrides, pretrain_from_args
from training.checkpoints import load_model_state
from training.cli import (
    add_common_args,
    build_from_args,
    default_output_dir,
    lora_kwargs,
    open_run,
    pick_device,
    run_main,
    seed_everything,
    train_config_from_args,
)
from training.course_data import read_sonnets, write_sonnets
from training.data import PadCollator, encode, make_loader
from training.metrics import chrf
from training.trainer import Trainer, count_lm_targets
from training.validation import (
    check_decoding,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    unit_interval,
)

FINE_TUNE_MODES = ("full-model", "lora")
DECODINGS = ("greedy", "sample", "beam", "contrastive", "mbr")
DEFAULT_LR = {"full-model": 1e-5, "lora": 3e-4}
CONTRASTIVE_K = 4  # candidates per step when --top_k is not given (Su et al. use 4-10)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = parser.add_argument_group("files")
    g.add_argument("--sonnet_path", type=str, default="data/sonnets.txt")
    g.add_argument("--held_out_sonnet_path", type=str, default="data/sonnets_held_out.txt")
    g.add_argument("--sonnet_out", type=str, default="predictions/generated_sonnets.txt")
    g.add_argument("--dev_held_out_sonnet_path", type=str, default="data/sonnets_held_out_dev.txt")
    g.add_argument("--dev_true_sonnet_path", type=str, default="data/TRUE_sonnets_held_out_dev.txt")
    g.add_argument("--dev_sonnet_out", type=str, default="predictions/generated_sonnets_dev.txt")
    g.add_argument("--fine-tune-mode", dest="fine_tune_mode", choices=FINE_TUNE_MODES, default="full-model")
    g.add_argument("--generate_only", action="store_true", help="decode from --checkpoint without training")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="a saved sonnet model (sonnet-model.pt) or a Trainer checkpoint (best-epochN.pt)")

    g = parser.add_argument_group("decoding")
    g.add_argument("--decoding", choices=DECODINGS, default="sample")
    g.add_argument("--temperature", type=positive_float, default=1.2, help="softmax temperature (sample, mbr)")
    g.add_argument("--top_p", type=probability, default=0.9, help="nucleus mass (sample, mbr)")
    g.add_argument("--top_k", type=non_negative_int, default=None,
                   help=f"top-k filter (sample, mbr: 0 = off) or contrastive candidates (default {CONTRASTIVE_K})")
    g.add_argument("--num_beams", type=positive_int, default=4)
    g.add_argument("--length_penalty", type=float, default=1.0)
    g.add_argument("--penalty_alpha", type=unit_interval, default=0.6, help="contrastive search degeneration penalty")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0)
    g.add_argument("--no_repeat_ngram_size", type=non_negative_int, default=0)
    g.add_argument("--mbr_candidates", type=positive_int, default=8, help="samples per prompt for MBR selection")
    g.add_argument("--max_new_tokens", type=positive_int, default=192, help="cap on generated tokens per sonnet")
    g.add_argument("--num_lines", type=positive_int, default=14, help="stop a sonnet when it has this many lines")
    g.add_argument("--gen_batch_size", type=positive_int, default=12, help="prompts decoded together")
    g.add_argument("--no_cache", action="store_true", help="decode without the key/value cache (slow; checks)")
    add_common_args(parser, batch_size=8, lr=None, epochs=50, hidden_dropout_prob=0.1, scheduler="linear",
                    warmup_ratio=0.1, patience=3)
    add_attention_args(parser)
    add_pretrain_args(parser)
    add_inference_args(parser)  # --quantize
    parser.set_defaults(save_top_k=3)
    args = parser.parse_args(argv)
    check_decoding(parser, args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.fine_tune_mode]
    args.checkpoint = args.checkpoint or args.load  # the shared --load names the same thing here
    if args.generate_only and not args.checkpoint:
        parser.error("--generate_only needs --checkpoint PATH")
    return args


# ----------------------------------------------------------------- training


def sonnet_features(texts: Sequence[str], tokenizer: Any, max_length: int, name: str = "") -> list[dict[str, Any]]:
    """Example dicts for PadCollator: each text's tokens followed by EOS (cut to ``max_length``),
    so the model learns to end a sonnet; the EOS is a real token, not padding."""
    ids = encode(tokenizer, [t + tokenizer.eos_token for t in texts], max_length, name)
    return [{"input_ids": x} for x in ids]


def lm_loss_fn(model: SonnetGPT, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch["input_ids"], batch["attention_mask"])


def fine_tune_lm(
    model: SonnetGPT,
    tokenizer: Any,
    texts: Sequence[str],
    eval_fn: Callable[[SonnetGPT], Mapping[str, float]] | None,
    config: Any,
    *,
    batch_size: int = 8,
    max_length: int = 0,
    num_workers: int = 0,
    group_by_length: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Trainer]:
    """Train ``model`` as a causal LM on ``texts`` with the shared Trainer (``config`` is a
    ``TrainConfig``; ``eval_fn`` must return ``config.metric``); leaves the best epoch's
    weights in ``model``. Returns (best dev metrics, trainer)."""
    max_length = max_length or model.gpt.config.max_position_embeddings
    feats = sonnet_features(texts, tokenizer, max_length, "sonnets")
    loader = make_loader(feats, PadCollator(tokenizer.pad_token_id), batch_size, shuffle=True,
                         num_workers=num_workers, group_by_length=group_by_length)
    trainer = Trainer(model, lm_loss_fn, loader, eval_fn, config, extra=extra, count_fn=count_lm_targets)
    best = trainer.fit()
    if trainer.best_checkpoint is not None and not trainer.interrupted:
        trainer.load_best()
        print(f"best epoch {best.get('epoch')} from {trainer.best_checkpoint}")
    return best, trainer


# ----------------------------------------------------------------- decoding


def decoding_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``generate`` keyword arguments for ``--decoding`` and its settings."""
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size,
                              stop=LineStop(tokenizer, args.num_lines), use_cache=not args.no_cache)
    if args.decoding in ("sample", "mbr"):
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0)
    elif args.decoding == "beam":
        kw.update(num_beams=args.num_beams, length_penalty=args.length_penalty)
    elif args.decoding == "contrastive":
        kw.update(penalty_alpha=args.penalty_alpha, top_k=args.top_k if args.top_k is not None else CONTRASTIVE_K)
    return kw


def describe(args: argparse.Namespace) -> str:
    """The decoding strategy and the settings that apply to it, for logs."""
    keys = {"sample": ("temperature", "top_p", "top_k"), "mbr": ("temperature", "top_p", "top_k", "mbr_candidates"),
            "beam": ("num_beams", "length_penalty"), "contrastive": ("penalty_alpha", "top_k"), "greedy": ()}
    shown = {k: getattr(args, k) for k in keys[args.decoding] if getattr(args, k) is not None}
    if args.decoding == "contrastive":
        shown.setdefault("top_k", CONTRASTIVE_K)
    for k, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if getattr(args, k) != neutral:
            shown[k] = getattr(args, k)
    return " ".join([args.decoding, *(f"{k}={v}" for k, v in shown.items())])


@torch.no_grad()
def complete_prompts(
    model: SonnetGPT,
    tokenizer: Any,
    prompts: Sequence[str],
    generate_kwargs: Mapping[str, Any],
    *,
    batch_size: int = 12,
    seed: int = 11711,
    mbr_candidates: int = 0,
) -> list[str]:
    """Each prompt continued into a full sonnet (prompt included), decoded to text.

    Sampling draws from a generator seeded with ``seed``, so every call (each epoch's dev
    evaluation) sees the same random stream. ``mbr_candidates`` > 0 selects among that many
    samples by mean chrF against the others."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    eos = generate_kwargs.get("eos_token_id")
    max_prompt = model.gpt.config.max_position_embeddings - generate_kwargs["max_new_tokens"]
    ids = encode(tokenizer, list(prompts), max(1, max_prompt), "prompts")
    texts: list[str] = []
    gpt = prepare_for_inference(model.gpt)  # faster CPU decoding layouts, built once for every batch
    for start in range(0, len(ids), batch_size):
        batch = collate([{"input_ids": x} for x in ids[start : start + batch_size]])
        x, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if mbr_candidates:
            rows = mbr_generate(gpt, x, mask, num_candidates=mbr_candidates, decode=tokenizer.decode,
                                utility=lambda a, b: chrf([a], [b]), generator=gen, **generate_kwargs)
        else:
            out = generate(gpt, x, mask, generator=gen, **generate_kwargs)
            n_pad = (mask == 0).sum(-1).tolist()
            rows = [trim(out[i], x.size(1), n_pad[i], eos) for i in range(out.size(0))]
        texts.extend(tokenizer.decode(r).strip() for r in rows)
    return texts


def dev_chrf(model: SonnetGPT, tokenizer: Any, prompts: Sequence[str], references: Sequence[str],
             generate_kwargs: Mapping[str, Any], **complete_kw: Any) -> dict[str, float]:
    """Corpus chrF (sacrebleu defaults, as the course grades) of the completed dev prompts."""
    return {"chrf": chrf(complete_prompts(model, tokenizer, prompts, generate_kwargs, **complete_kw), references)}


# ----------------------------------------------------------------- model building


def build_sonnet_model(args: argparse.Namespace) -> tuple[SonnetGPT, Any, bool]:
    """(model, tokenizer, checkpoints hold only trainable parameters) from the flags."""
    gpt, tokenizer = build_from_args(args, hidden_dropout_prob=args.hidden_dropout_prob, **attention_overrides(args))
    model = SonnetGPT(gpt)
    trainable_only = set_fine_tune_mode(model, args.fine_tune_mode, model.head, **lora_kwargs(args))
    return model, tokenizer, trainable_only


def load_sonnet_model(args: argparse.Namespace, path: str | Path) -> tuple[SonnetGPT, Any]:
    """A model saved by this script (plain GPT-2: ``sonnet-model.pt``) or a Trainer checkpoint of a
    run with the same ``--model_size``/``--fine-tune-mode`` flags (``best-epochN.pt``, ``last.pt``)."""
    from models.loading import load_tokenizer

    ckpt = load_checkpoint(path)
    if "config" in ckpt:
        return SonnetGPT(load_model(path)), load_tokenizer(args.tokenizer)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: neither a saved sonnet model nor a Trainer checkpoint")
    model, tokenizer, _ = build_sonnet_model(args)
    try:
        load_model_state(model, ckpt["model"], ckpt.get("trainable_only", False), path, ckpt.get("model_config"))
    except RuntimeError as e:  # a CheckpointError listing every differing field and tensor on one line
        raise CheckpointError(f"{path} does not fit --model_size {args.model_size} --fine-tune-mode "
                              f"{args.fine_tune_mode}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


# ----------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless ``--generate_only`` or ``--epochs 0``), then write both prediction files."""
    trains = not args.generate_only and (args.epochs > 0 or bool(args.pretrain_corpus))
    out_dir = open_run(args, default_output_dir("sonnet", f"{args.fine_tune_mode}-{Path(args.model_size).name}"),
                       outputs=(args.sonnet_out, args.dev_sonnet_out), trains=trains, model_flag="checkpoint")
    args.generate_only = not trains  # --epochs 0: decode with the --checkpoint model, save nothing
    seed_everything(args.seed)
    device = pick_device(args.use_gpu, args.device)
    train = [s.text for s in read_sonnets(args.sonnet_path, args.limit)]
    dev_prompts = read_sonnets(args.dev_held_out_sonnet_path, args.limit)
    dev_refs = [s.text for s in read_sonnets(args.dev_true_sonnet_path, args.limit)]
    test_prompts = read_sonnets(args.held_out_sonnet_path, args.limit)
    if len(dev_prompts) != len(dev_refs):
        raise SystemExit(f"{args.dev_held_out_sonnet_path} has {len(dev_prompts)} prompts but "
                         f"{args.dev_true_sonnet_path} has {len(dev_refs)} sonnets")
    if args.generate_only:
        model, tokenizer = load_sonnet_model(args, args.checkpoint)
        print(f"loaded {args.checkpoint}")
    else:
        model, tokenizer, trainable_only = build_sonnet_model(args)
    model.to(device)
    kw = decoding_kwargs(args, tokenizer)
    mbr = args.mbr_candidates if args.decoding == "mbr" else 0
    complete_kw = dict(batch_size=args.gen_batch_size, seed=args.seed, mbr_candidates=mbr)
    dev_texts = [s.text for s in dev_prompts]
    print(f"{len(train)} training sonnets, {len(dev_prompts)} dev and {len(test_prompts)} test prompts; "
          f"decoding: {describe(args)}")

    best: dict[str, Any] = {}
    if args.pretrain_corpus and not args.generate_only:  # causal-LM pretraining on a corpus first
        pretrain_from_args(model, tokenizer, args, device, out_dir, trainable_only)
    if not args.generate_only and args.epochs > 0:
        n_train, n_total = count_parameters(model)
        print(f"{args.fine_tune_mode}: {n_train:,} of {n_total:,} parameters train")
        cfg = train_config_from_args(args, device, metric="chrf", output_dir=str(out_dir),
                                     save_trainable_only=trainable_only)
        best, _ = fine_tune_lm(model, tokenizer, train,
                               lambda m: dev_chrf(m, tokenizer, dev_texts, dev_refs, kw, **complete_kw), cfg,
                               batch_size=args.batch_size, max_length=args.max_length,
                               num_workers=args.num_workers, group_by_length=args.group_by_length,
                               extra={"args": vars(args)})
    if not args.generate_only:
        unwrap_lora(model)  # a plain GPT-2: loads without adapter code and decodes faster
        path = out_dir / "sonnet-model.pt"
        save_model(model.gpt, path, task="sonnet", dev=best)
        print(f"saved the model to {path}")

    model.gpt = inference_from_args(model.gpt, args)  # --quantize; --generate_only keeps one copy of the weights
    result: dict[str, Any] = {"best": best}
    for name, prompts, out in (("dev", dev_prompts, args.dev_sonnet_out), ("test", test_prompts, args.sonnet_out)):
        texts = complete_prompts(model, tokenizer, [s.text for s in prompts], kw, **complete_kw)
        write_sonnets(out, list(enumerate(texts)))  # the starter numbers sonnets by position
        print(f"wrote {out}")
        result[name] = texts
    result["dev_chrf"] = chrf(result["dev"], dev_refs)
    print(f"dev chrF {result['dev_chrf']:.2f} ({describe(args)})\n\n{result['test'][0]}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry; also callable as ``main(["--model_size", "tiny", ...])``."""
    return run(get_args(argv))


if __name__ == "__main__":
    run_main(main)
