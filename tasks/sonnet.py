"""Sonnet generation with ``SonnetGPT``: the task behind ``sonnet_generation.py`` (callable
with its parsed flags, ``run(args)``), and its decoding: ``decoding_kwargs`` turns
``--decoding`` and its settings into ``models.generation.generate`` keywords,
``complete_prompts`` continues prompts into sonnets, ``dev_chrf`` scores them. Training is
``tasks.lm.fine_tune_lm`` (the causal-LM loss over every real token, an EOS appended).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli.common import default_output_dir, fine_tune_config, open_run, train_config_from_args
from config import GPT2Config
from decoding.inference import decoding_rows, inference_from_args, prepare_for_inference
from decoding.mbr import CandidatePool, mbr_pool_generate
from engine import distributed
from engine.checkpoints import load_checkpoint, load_checkpoint_weights, load_model, save_model
from engine.data import DataFormatError, PadCollator, encode
from methods.lora import unwrap_lora
from methods.prefix import fold_prefix
from models.generation import LineStop, generate, trim
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model
from models.heads import SonnetGPT
from models.loading import CheckpointError, load_tokenizer
from tasks import common
from tasks.common import build_task_model, loader_settings
from tasks.course_data import read_sonnets, write_sonnets
from tasks.lm import attention_overrides, fine_tune_lm, held_out_loss, pretrain_from_args
from tasks.metrics import chrf
from tasks.sonnet_dpo import dpo_fine_tune
from tasks.sonnet_eval import (
    EARLY_STOP_METRICS,
    evaluate_sonnets,
    loss_loader,
    sonnet_prompt,
    split_train,
    write_form_report,
)

DECODINGS = ("greedy", "sample", "beam", "contrastive", "mbr")
CONTRASTIVE_K = 4  # candidates per step when --top_k is not given (Su et al. use 4-10)


def decoding_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``generate`` keyword arguments for ``--decoding`` and its settings."""
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size,
                              stop=LineStop(tokenizer, args.num_lines), use_cache=not args.no_cache)
    if args.decoding in ("sample", "mbr"):
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0)
    if args.decoding == "mbr":  # what beam and contrastive members of an --mbr_pool use
        kw.update(length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha,
                  contrastive_mean_sim=args.contrastive_mean_sim,
                  contrastive_dynamic_alpha=args.contrastive_dynamic_alpha)
    elif args.decoding == "beam":
        kw.update(num_beams=args.num_beams, length_penalty=args.length_penalty)
    elif args.decoding == "contrastive":
        kw.update(penalty_alpha=args.penalty_alpha, top_k=args.top_k if args.top_k is not None else CONTRASTIVE_K,
                  contrastive_mean_sim=args.contrastive_mean_sim,
                  contrastive_dynamic_alpha=args.contrastive_dynamic_alpha)
    return kw


def candidate_pool(args: argparse.Namespace) -> CandidatePool:
    """The MBR candidate pool: ``--mbr_pool`` (e.g. ``beam:4,sample:8,contrastive``), else
    ``--mbr_candidates`` samples."""
    if getattr(args, "mbr_pool", None):
        return CandidatePool.parse(args.mbr_pool)
    return CandidatePool((("sample", args.mbr_candidates),))


def describe(args: argparse.Namespace) -> str:
    """The decoding strategy and the settings that apply to it, for logs."""
    keys = {"sample": ("temperature", "top_p", "top_k"), "mbr": ("temperature", "top_p", "top_k"),
            "beam": ("num_beams", "length_penalty"), "contrastive": ("penalty_alpha", "top_k"), "greedy": ()}
    shown = {"mbr_pool": str(candidate_pool(args))} if args.decoding == "mbr" else {}
    shown.update({k: getattr(args, k) for k in keys[args.decoding] if getattr(args, k) is not None})
    if args.decoding == "contrastive":
        shown.setdefault("top_k", CONTRASTIVE_K)
        shown.update({k: True for k in ("contrastive_mean_sim", "contrastive_dynamic_alpha") if getattr(args, k)})
    for k, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if getattr(args, k) != neutral:
            shown[k] = getattr(args, k)
    return " ".join([args.decoding, *(f"{k}={v}" for k, v in shown.items())])


def prompt_batches(gpt: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int):
    """Left-padded (input_ids, attention_mask) batches of the encoded prompts on ``gpt``'s device,
    each prompt cut to leave room for ``max_new_tokens`` in the context."""
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    ids = encode(tokenizer, list(prompts), max(1, gpt.config.max_position_embeddings - max_new_tokens), "prompts")
    for start in range(0, len(ids), batch_size):
        batch = collate([{"input_ids": x} for x in ids[start : start + batch_size]])
        yield batch["input_ids"].to(gpt.device), batch["attention_mask"].to(gpt.device)


@torch.no_grad()
def continue_prompts(gpt: nn.Module, tokenizer: Any, prompts: Sequence[str], generate_kwargs: Mapping[str, Any],
                     *, batch_size: int = 12, generator: torch.Generator | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """Each prompt's tokens (without padding) and the tokens ``gpt`` (a ``GPT2Model`` or a
    prepared ``InferenceModel``, decoded as it is) continues it with, cut before the first EOS
    when ``generate_kwargs`` names one."""
    eos = generate_kwargs.get("eos_token_id")
    pairs = []
    for x, mask in prompt_batches(gpt, tokenizer, prompts, generate_kwargs["max_new_tokens"], batch_size):
        out = generate(gpt, x, mask, generator=generator, **generate_kwargs)
        for row, n_pad in zip(out, (mask == 0).sum(-1).tolist()):
            tokens, length = trim(row, x.size(1), n_pad, eos), x.size(1) - n_pad
            pairs.append((tokens[:length], tokens[length:]))
    return pairs


@torch.no_grad()
def complete_prompts(
    model: SonnetGPT,
    tokenizer: Any,
    prompts: Sequence[str],
    generate_kwargs: Mapping[str, Any],
    *,
    batch_size: int = 12,
    seed: int = 11711,
    mbr_pool: CandidatePool | None = None,
) -> list[str]:
    """Each prompt continued into a full sonnet (prompt included), decoded to text.

    Sampling draws from a generator seeded with ``seed``, so every call (each epoch's dev
    evaluation) sees the same random stream. With ``mbr_pool`` each prompt gets the pool's
    candidates (samples, beams, contrastive...) and keeps the one with the highest mean chrF
    against the others."""
    gen = torch.Generator(model.gpt.device).manual_seed(seed)
    gpt = prepare_for_inference(model.gpt)  # faster CPU decoding layouts, built once for every batch
    if mbr_pool is None:
        pairs = continue_prompts(gpt, tokenizer, prompts, generate_kwargs, batch_size=batch_size, generator=gen)
        return [tokenizer.decode(p + c).strip() for p, c in pairs]
    texts: list[str] = []
    for x, mask in prompt_batches(gpt, tokenizer, prompts, generate_kwargs["max_new_tokens"], batch_size):
        rows = mbr_pool_generate(gpt, x, mask, pool=mbr_pool, config=GenerationConfig(**generate_kwargs),
                                 decode=tokenizer.decode, generator=gen)  # utility: sentence chrF
        texts.extend(tokenizer.decode(r).strip() for r in rows)
    return texts


def dev_chrf(model: SonnetGPT, tokenizer: Any, prompts: Sequence[str], references: Sequence[str],
             generate_kwargs: Mapping[str, Any], **complete_kw: Any) -> dict[str, float]:
    """Corpus chrF (sacrebleu defaults, as the course grades) of the completed dev prompts."""
    return {"chrf": chrf(complete_prompts(model, tokenizer, prompts, generate_kwargs, **complete_kw), references)}


# ----------------------------------------------------------------- model building


def build_sonnet_model(args: argparse.Namespace) -> tuple[SonnetGPT, Any, bool]:
    """(model, tokenizer, checkpoints hold only trainable parameters) from the flags."""
    return build_task_model(args, SonnetGPT, hidden_dropout_prob=args.hidden_dropout_prob, **attention_overrides(args))


def load_sonnet_model(args: argparse.Namespace, path: str | Path) -> tuple[SonnetGPT, Any]:
    """A model saved by this script (plain GPT-2: ``sonnet-model.pt``) or a Trainer checkpoint of a
    run with the same ``--model_size``/``--fine-tune-mode`` flags (``best-epochN.pt``, ``last.pt``)."""
    ckpt = load_checkpoint(path)
    if "config" in ckpt:
        return SonnetGPT(load_model(path)), load_tokenizer(args.tokenizer)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: neither a saved sonnet model nor a Trainer checkpoint")
    model, tokenizer, _ = build_sonnet_model(args)
    load_checkpoint_weights(model, ckpt, path, fits=f"--model_size {args.model_size} --fine-tune-mode "
                                                    f"{args.fine_tune_mode}")
    return model, tokenizer


# ----------------------------------------------------------------- the run


def model_for_training(args: argparse.Namespace) -> tuple[SonnetGPT, Any, bool]:
    """(model, tokenizer, checkpoints hold only trainable parameters) to train: the ``--model_size``
    model, or with ``--checkpoint`` a saved model (``pretrain.py``'s ``model.pt`` or a
    ``sonnet-model.pt``; a Trainer checkpoint is continued with ``--resume`` instead) with the
    fine-tune mode applied. With ``--random_init`` as well, the checkpoint gives only the
    architecture: the same model with fresh weights, the baseline that shows what its training
    was worth. ``--hidden_dropout_prob`` replaces the saved model's dropout."""
    if not args.checkpoint:
        return build_sonnet_model(args)
    overrides = dict(hidden_dropout_prob=args.hidden_dropout_prob)
    if args.random_init:
        saved = load_checkpoint(args.checkpoint)
        if "config" not in saved:
            raise CheckpointError(f"{args.checkpoint} is not a saved model; --random_init --checkpoint takes the "
                                  "architecture of a model file (model.pt, sonnet-model.pt)")
        gpt = GPT2Model(GPT2Config.from_dict({**saved["config"], **overrides}))
        print(f"random weights in the architecture of {args.checkpoint}")
    else:
        gpt = load_model(args.checkpoint, **overrides)
        print(f"starting from {args.checkpoint}")
    model = SonnetGPT(gpt)
    return model, load_tokenizer(args.tokenizer), common.prepare_model(model, fine_tune_config(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``sonnet_generation.py``: train (unless ``--generate_only`` or ``--epochs 0``; with ``--dpo``
    by preference tuning, ``tasks.sonnet_dpo``), then write both prediction files and the form
    of each (``form.json`` in the run folder)."""
    trains = not args.generate_only and (args.epochs > 0 or bool(args.pretrain_corpus))
    out_dir = open_run(args, default_output_dir("sonnet", f"{'dpo' if args.dpo else args.fine_tune_mode}-"
                                                          f"{Path(args.model_size).name}"),
                       outputs=(args.sonnet_out, args.dev_sonnet_out), trains=trains, model_flag="checkpoint")
    args.generate_only = not trains  # --epochs 0: decode with the --checkpoint model, save nothing
    device = common.start(args)
    train = [s.text for s in read_sonnets(args.sonnet_path, args.limit)]
    dev_prompts = read_sonnets(args.dev_held_out_sonnet_path, args.limit)
    dev_refs = [s.text for s in read_sonnets(args.dev_true_sonnet_path, args.limit)]
    test_prompts = read_sonnets(args.held_out_sonnet_path, args.limit)
    if len(dev_prompts) != len(dev_refs):
        raise SystemExit(f"{args.dev_held_out_sonnet_path} has {len(dev_prompts)} prompts but "
                         f"{args.dev_true_sonnet_path} has {len(dev_refs)} sonnets")
    try:
        train, valid = split_train(train, args.train_size, args.seed)
    except ValueError as e:
        raise DataFormatError(args.sonnet_path, None, f"{e}; change --train_size or --limit") from None
    if args.generate_only:
        model, tokenizer = load_sonnet_model(args, args.checkpoint)
        print(f"loaded {args.checkpoint}")
    else:
        model, tokenizer, trainable_only = model_for_training(args)
    model.to(device)
    kw = decoding_kwargs(args, tokenizer)
    complete_kw = dict(batch_size=args.gen_batch_size, seed=args.seed,
                       mbr_pool=candidate_pool(args) if args.decoding == "mbr" else None)
    dev_texts = [s.text for s in dev_prompts]
    print(f"{len(train)} training sonnets{f' ({len(valid)} more validate)' if valid else ''}, {len(dev_prompts)} "
          f"dev and {len(test_prompts)} test prompts; decoding: {describe(args)}")

    def complete(m: nn.Module, prompts: Sequence[str]) -> list[str]:
        return complete_prompts(m, tokenizer, prompts, kw, **complete_kw)

    loss_batch = max(1, args.gen_batch_size)
    max_length = args.max_length or model.gpt.config.max_position_embeddings
    dev_loss = loss_loader(dev_refs, tokenizer, max_length, loss_batch)
    if valid:  # --train_size: epochs are judged on the held-back training sonnets, never on dev
        val_prompts, val_refs = [sonnet_prompt(t) for t in valid], valid
        val_loss = loss_loader(valid, tokenizer, max_length, loss_batch)
    else:
        val_prompts, val_refs, val_loss = dev_texts, dev_refs, dev_loss
    eval_fn = lambda m: evaluate_sonnets(m, complete, val_prompts, val_refs, val_loss)  # noqa: E731

    best: dict[str, Any] = {}
    if args.pretrain_corpus and not args.generate_only:  # causal-LM pretraining on a corpus first
        pretrain_from_args(model, tokenizer, args, device, out_dir, trainable_only)
    if not args.generate_only and args.epochs > 0:
        cfg = train_config_from_args(args, device, metric=args.early_stop_metric, output_dir=str(out_dir),
                                     mode=EARLY_STOP_METRICS[args.early_stop_metric],
                                     save_trainable_only=trainable_only)
        if args.dpo:
            sample_args = argparse.Namespace(**{**vars(args), "decoding": "sample"})
            sample_kw = decoding_kwargs(sample_args, tokenizer)
            best = dpo_fine_tune(
                model, tokenizer, train,
                lambda prompts: complete_prompts(model, tokenizer, prompts, sample_kw, **{**complete_kw,
                                                                                          "mbr_pool": None}),
                eval_fn, cfg, dpo_settings(args), source=args.sonnet_path, extra={"args": vars(args)})
        else:
            best, _ = fine_tune_lm(model, tokenizer, train, eval_fn, cfg, max_length=args.max_length,
                                   extra={"args": vars(args)}, **loader_settings(args))
    if not args.generate_only:
        unwrap_lora(model)  # a plain GPT-2: loads without adapter code and decodes faster
        fold_prefix(model)  # prefix tuning: plain prefixes, no MLP
        path = out_dir / "sonnet-model.pt"
        save_model(model.gpt, path, task="sonnet", dev=best)
        print(f"saved the model to {path}")

    result: dict[str, Any] = {"best": best}
    model.eval()
    with torch.no_grad():  # the float model's held-out loss, before --quantize / --generate_only consume it
        held = held_out_loss(model, dev_loss)
    result["dev_loss"], result["dev_perplexity"] = held["loss"], held["perplexity"]
    # --quantize; --generate_only keeps one copy of the weights, laid out for the rows of a decoding step
    rows = decoding_rows(args.gen_batch_size, kw.get("num_beams", 1), pooled=args.decoding == "mbr")
    model.gpt = inference_from_args(model.gpt, args, decode_rows=rows)
    for name, prompts, out in (("dev", dev_prompts, args.dev_sonnet_out), ("test", test_prompts, args.sonnet_out)):
        texts = complete_prompts(model, tokenizer, [s.text for s in prompts], kw, **complete_kw)
        if distributed.is_main():  # under torchrun: one writer
            write_sonnets(out, list(enumerate(texts)))  # the starter numbers sonnets by position
        print(f"wrote {out}")
        result[name] = texts
    result["dev_chrf"] = chrf(result["dev"], dev_refs)
    print(f"dev chrF {result['dev_chrf']:.2f}, dev sonnet loss {held['loss']:.4f} (perplexity "
          f"{held['perplexity']:.2f}) ({describe(args)})")
    scores = {k: result[k] for k in ("dev_chrf", "dev_loss", "dev_perplexity")}
    form_dir = out_dir if distributed.is_main() else None  # under torchrun: one writer
    result["form"] = write_form_report(form_dir, {"dev": result["dev"], "test": result["test"]},
                                       {**scores, "decoding": describe(args)})
    print(f"\n{result['test'][0]}")
    return result


def dpo_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``tasks.sonnet_dpo.dpo_fine_tune``'s settings from the ``--dpo_*`` flags."""
    return dict(samples=args.dpo_samples, rank=args.dpo_rank, pairs=args.dpo_pairs, min_margin=args.dpo_min_margin,
                beta=args.dpo_beta, batch_size=args.batch_size, max_length=args.max_length)


__all__ = ["CONTRASTIVE_K", "DECODINGS", "build_sonnet_model", "candidate_pool", "complete_prompts",
           "continue_prompts", "decoding_kwargs", "describe", "dev_chrf", "dpo_settings", "load_sonnet_model",
           "model_for_training", "prompt_batches", "run"]
