"""Sonnet generation with ``SonnetGPT``: the task behind ``sonnet_generation.py`` (callable with
its settings, ``run(SonnetSettings(...))``), and its decoding: ``SonnetDecoding`` is a
``GenerationConfig`` (the one decoding vocabulary, ``generate.py``'s too) with the sonnet's own
stop rule and the MBR pool, ``complete_prompts`` continues prompts into sonnets under it,
``dev_chrf`` scores them. Training is ``tasks.lm.fine_tune_lm`` (the causal-LM loss over every
real token, an EOS appended).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoding.compiled import compile_decoding
from decoding.gptq import CALIBRATION_TEXT, Calibration
from decoding.inference import decoding_rows, prepare_for_decoding, prepare_for_inference
from decoding.mbr import CandidatePool, mbr_pool_generate
from engine import ranks
from engine.checkpoints import load_checkpoint
from engine.data import DataFormatError, PadCollator, encode
from methods.lora import unwrap_lora
from methods.prefix import fold_prefix
from methods.restore import rebuild_model, save_model
from methods.sparse_attention import SparseAttention, attention_fields
from models.generation import LineStop, generate, trim
from models.generation_config import GenerationConfig
from models.loading import CheckpointError, load_tokenizer
from models.sonnet_gpt import SonnetGPT
from tasks.common import (
    build_task_model,
    check_context,
    default_output_dir,
    open_task_run,
    prepare_model,
    start,
    train_config,
)
from tasks.course_data import read_sonnets, write_sonnets
from tasks.lm import CorpusPretraining, fine_tune_lm, held_out_loss, pretrain_before_fine_tuning
from tasks.metrics import chrf
from tasks.publish import RunPredictions, Target, is_explicit, partial_reason, shown
from tasks.restore import restore_task_model, sonnet_head
from tasks.settings import TaskSettings
from tasks.sonnet_dpo import DpoSettings, dpo_fine_tune
from tasks.sonnet_eval import (
    EARLY_STOP_METRICS,
    evaluate_sonnets,
    loss_loader,
    sonnet_prompt,
    split_train,
    write_form_report,
)


def _starter_sampling() -> GenerationConfig:
    """The starter's decoding, the best reported for this task: nucleus sampling, top-p 0.9, T 1.2."""
    return GenerationConfig(max_new_tokens=192, do_sample=True, temperature=1.2, top_p=0.9)


@dataclass(frozen=True)
class SonnetDecoding:
    """How sonnets are decoded: ``config`` (``cli.sonnet`` builds it from ``--decoding`` and the
    settings that apply to it; EOS and the stop rule are added once the tokenizer is known,
    ``generation``), every sonnet stopped at ``num_lines`` lines; with ``pool`` (``--decoding mbr``)
    each prompt keeps the MBR choice among the pool's candidates. ``batch_size`` prompts decode
    together; ``label`` names the decoding in logs and ``form.json``."""

    config: GenerationConfig = field(default_factory=_starter_sampling)
    pool: CandidatePool | None = None
    num_lines: int = 14
    batch_size: int = 12
    label: str = "sample temperature=1.2 top_p=0.9"

    def generation(self, tokenizer: Any, config: GenerationConfig | None = None) -> GenerationConfig:
        """``config`` (default: this decoding's) ending each sonnet at EOS or at ``num_lines`` lines."""
        return dataclasses.replace(config or self.config, eos_token_id=tokenizer.eos_token_id,
                                   stop=LineStop(tokenizer, self.num_lines))


@dataclass(frozen=True)
class SonnetSettings(TaskSettings):
    """A ``sonnet_generation.py`` run (the flat fields are its flags of the same names): the
    course's files read and written; ``generate_only`` decodes with ``checkpoint`` (a saved model
    or a Trainer checkpoint of these settings), which otherwise is the model training starts
    from; ``early_stop_metric`` and ``train_size`` judge epochs; ``attention`` is given to the
    body before the fine-tune mode; ``pretraining`` runs first; ``dpo`` (None: plain fine-tuning)
    preference-tunes instead; ``quantize`` is the weights the final files are decoded with."""

    sonnet_path: str = "data/sonnets.txt"
    held_out_sonnet_path: str = "data/sonnets_held_out.txt"
    sonnet_out: str = "predictions/generated_sonnets.txt"
    dev_held_out_sonnet_path: str = "data/sonnets_held_out_dev.txt"
    dev_true_sonnet_path: str = "data/TRUE_sonnets_held_out_dev.txt"
    dev_sonnet_out: str = "predictions/generated_sonnets_dev.txt"
    generate_only: bool = False
    checkpoint: str | None = None
    early_stop_metric: str = "chrf"
    train_size: float = 1.0
    generate_from: str = "last"  # the epoch whose weights are saved and generate: last (the starter's) or best
    quantize: str = "none"
    calibration: str = CALIBRATION_TEXT  # the text GPTQ calibrates on (--quantize int8-gptq / int4-gptq)
    compile_decode: bool = False  # decode through decoding.compiled (static cache, compiled step)
    decoding: SonnetDecoding = field(default_factory=SonnetDecoding)
    attention: SparseAttention = field(default_factory=SparseAttention)
    pretraining: CorpusPretraining = field(default_factory=CorpusPretraining)
    dpo: DpoSettings | None = None


def prompt_batches(gpt: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int):
    """Left-padded (input_ids, attention_mask) batches of the encoded prompts on ``gpt``'s device,
    each prompt cut to leave room for ``max_new_tokens`` in the context."""
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    ids = encode(tokenizer, list(prompts), max(1, gpt.config.max_position_embeddings - max_new_tokens), "prompts")
    for begin in range(0, len(ids), batch_size):
        batch = collate([{"input_ids": x} for x in ids[begin : begin + batch_size]])
        yield batch["input_ids"].to(gpt.device), batch["attention_mask"].to(gpt.device)


@torch.no_grad()
def continue_prompts(gpt: nn.Module, tokenizer: Any, prompts: Sequence[str], config: GenerationConfig,
                     *, batch_size: int = 12, generator: torch.Generator | None = None, keep_eos: bool = False
                     ) -> list[tuple[list[int], list[int]]]:
    """Each prompt's tokens (without padding) and the tokens ``gpt`` (a ``GPT2Model`` or a
    prepared ``InferenceModel``, decoded as it is) continues it with under ``config``, cut before
    the first EOS when ``config`` names one. With ``keep_eos`` a continuation the model ended with
    EOS keeps it (DPO scores the ending); one cut by ``max_new_tokens`` or ended by the stop rule
    (after which the row is padded, with EOS by default) has none."""
    eos, stop, pairs = config.eos_token_id, config.stop, []
    for x, mask in prompt_batches(gpt, tokenizer, prompts, config.max_new_tokens, batch_size):
        out = generate(gpt, x, mask, config=config, generator=generator)
        for row, n_pad in zip(out, (mask == 0).sum(-1).tolist()):
            tokens, length = trim(row, x.size(1), n_pad, eos), x.size(1) - n_pad
            end = n_pad + len(tokens)  # where the row's first EOS (or padding) is, if it has one
            if keep_eos and end < row.numel() and row[end] == eos:
                if stop is None or not bool(stop(row[None, :end])[0]):  # else the EOS is padding
                    tokens.append(eos)
            pairs.append((tokens[:length], tokens[length:]))
    return pairs


@torch.no_grad()
def complete_prompts(
    model: SonnetGPT,
    tokenizer: Any,
    prompts: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 12,
    seed: int = 11711,
    mbr_pool: CandidatePool | None = None,
    keep_eos: bool = False,
    compile_decode: bool = False,
) -> list[str]:
    """Each prompt continued into a full sonnet (prompt included) under ``config``, decoded to text
    (with ``keep_eos``, and no pool, ending in the EOS text where the model ended it: ``continue_prompts``).

    Sampling draws from a generator seeded with ``seed``, so every call (each epoch's dev
    evaluation) sees the same random stream. With ``mbr_pool`` each prompt gets the pool's
    candidates (samples, beams, contrastive...) and keeps the one with the highest mean chrF
    against the others. ``compile_decode``: through a static cache and a compiled step
    (``decoding.compiled``), the same tokens."""
    gen = torch.Generator(model.gpt.device).manual_seed(seed)
    gpt = prepare_for_inference(model.gpt)  # faster CPU decoding layouts, built once for every batch
    gpt = compile_decoding(gpt) if compile_decode else gpt
    if mbr_pool is None:
        pairs = continue_prompts(gpt, tokenizer, prompts, config, batch_size=batch_size, generator=gen,
                                 keep_eos=keep_eos)
        return [tokenizer.decode(p + c).strip() for p, c in pairs]
    texts: list[str] = []
    for x, mask in prompt_batches(gpt, tokenizer, prompts, config.max_new_tokens, batch_size):
        rows = mbr_pool_generate(gpt, x, mask, pool=mbr_pool, config=config, decode=tokenizer.decode,
                                 generator=gen)  # utility: sentence chrF
        texts.extend(tokenizer.decode(r).strip() for r in rows)
    return texts


def dev_chrf(model: SonnetGPT, tokenizer: Any, prompts: Sequence[str], references: Sequence[str],
             config: GenerationConfig, **complete_kw: Any) -> dict[str, float]:
    """Corpus chrF (sacrebleu defaults, as the course grades) of the completed dev prompts."""
    return {"chrf": chrf(complete_prompts(model, tokenizer, prompts, config, **complete_kw), references)}


# ----------------------------------------------------------------- model building


def model_for_training(settings: SonnetSettings) -> tuple[SonnetGPT, Any, bool]:
    """(model, tokenizer, checkpoints hold only trainable parameters) to train: the ``model_size``
    model, or with ``checkpoint`` a saved model (``pretrain.py``'s ``model.pt`` or a
    ``sonnet-model.pt``; a Trainer checkpoint is continued with ``--resume`` instead) with the
    fine-tune mode applied. With ``random_init`` as well, the checkpoint gives only the
    architecture: the same model with fresh weights, the baseline that shows what its training
    was worth. ``hidden_dropout_prob`` replaces the saved model's dropout."""
    checkpoint, dropout = settings.checkpoint, settings.model.hidden_dropout_prob
    if not checkpoint:
        return build_task_model(settings, sonnet_head(settings.attention), hidden_dropout_prob=dropout)
    if settings.model.random_init:
        saved = load_checkpoint(checkpoint)
        if "config" not in saved:
            raise CheckpointError(f"{checkpoint} is not a saved model; --random_init --checkpoint takes the "
                                  "architecture of a model file (model.pt, sonnet-model.pt)")
        gpt = rebuild_model(saved["config"], None, saved.get("extra"), hidden_dropout_prob=dropout)  # read once
        print(f"random weights in the architecture of {checkpoint}")
    else:
        gpt = restore_task_model(checkpoint, hidden_dropout_prob=dropout).model
        print(f"starting from {checkpoint}")
    model = SonnetGPT(gpt)
    return model, load_tokenizer(settings.model.tokenizer), prepare_model(model, settings.fine_tune)


# ----------------------------------------------------------------- the run


def run(settings: SonnetSettings) -> dict[str, Any]:
    """``sonnet_generation.py``: train (unless ``generate_only`` or no epochs; with ``dpo`` by
    preference tuning, ``tasks.sonnet_dpo``), then write both prediction files and the form of
    each (``form.json`` in the run folder)."""
    s, data, decoding = settings, settings.data, settings.decoding
    trains = not s.generate_only and (s.train.epochs > 0 or bool(s.pretraining.corpus))
    kind = "dpo" if s.dpo is not None else s.fine_tune.mode
    parent = default_output_dir("sonnet", f"{kind}-{Path(s.model.model_size).name}")
    files = RunPredictions({"dev": Target(Path(s.dev_sonnet_out), is_explicit(s, "dev_sonnet_out")),
                            "test": Target(Path(s.sonnet_out), is_explicit(s, "sonnet_out"))},
                           partial_reason(limit=data.limit, max_steps=s.train.max_steps))
    out_dir = open_task_run(s, parent, outputs=files.published(), trains=trains, model=s.checkpoint,
                            model_flag="checkpoint")
    generate_only = not trains  # --epochs 0: decode with the --checkpoint model, save nothing
    device = start(s)
    if generate_only:
        restored = restore_task_model(s.checkpoint, "sonnet", s)
        model, tokenizer = restored.model, restored.tokenizer
        print(f"loaded {s.checkpoint}")
    else:
        model, tokenizer, trainable_only = model_for_training(s)
    # lengths the model cannot hold stop here, before any data is read or any sonnet decoded
    check_context(model.gpt.config.max_position_embeddings, max_length=data.max_length,
                  max_new_tokens=decoding.config.max_new_tokens)
    model.to(device)
    train = [x.text for x in read_sonnets(s.sonnet_path, data.limit)]
    dev_prompts = read_sonnets(s.dev_held_out_sonnet_path, data.limit)
    dev_refs = [x.text for x in read_sonnets(s.dev_true_sonnet_path, data.limit)]
    test_prompts = read_sonnets(s.held_out_sonnet_path, data.limit)
    if len(dev_prompts) != len(dev_refs):
        raise SystemExit(f"{s.dev_held_out_sonnet_path} has {len(dev_prompts)} prompts but "
                         f"{s.dev_true_sonnet_path} has {len(dev_refs)} sonnets")
    try:
        train, valid = split_train(train, s.train_size, s.seed)
    except ValueError as e:
        raise DataFormatError(s.sonnet_path, None, f"{e}; change --train_size or --limit") from None
    config = decoding.generation(tokenizer)
    complete_kw = dict(batch_size=decoding.batch_size, seed=s.seed, mbr_pool=decoding.pool,
                       compile_decode=s.compile_decode)
    dev_texts = [x.text for x in dev_prompts]
    print(f"{len(train)} training sonnets{f' ({len(valid)} more validate)' if valid else ''}, {len(dev_prompts)} "
          f"dev and {len(test_prompts)} test prompts; decoding: {decoding.label}")

    def complete(m: nn.Module, prompts: Sequence[str]) -> list[str]:
        return complete_prompts(m, tokenizer, prompts, config, **complete_kw)

    loss_batch = max(1, decoding.batch_size)
    max_length = data.max_length or model.gpt.config.max_position_embeddings
    dev_loss = loss_loader(dev_refs, tokenizer, max_length, loss_batch)
    if valid:  # --train_size: epochs are judged on the held-back training sonnets, never on dev
        val_prompts, val_refs = [sonnet_prompt(t) for t in valid], valid
        val_loss = loss_loader(valid, tokenizer, max_length, loss_batch)
    else:
        val_prompts, val_refs, val_loss = dev_texts, dev_refs, dev_loss
    eval_fn = lambda m: evaluate_sonnets(m, complete, val_prompts, val_refs, val_loss)  # noqa: E731

    best: dict[str, Any] = {}
    if s.pretraining.corpus and not generate_only:  # causal-LM pretraining on a corpus first
        pretrain_before_fine_tuning(model, tokenizer, s, s.pretraining, device, out_dir, trainable_only)
    if not generate_only and s.train.epochs > 0:
        cfg = train_config(s, device, out_dir, metric=s.early_stop_metric, mode=EARLY_STOP_METRICS[s.early_stop_metric],
                           save_trainable_only=trainable_only, final_weights=s.generate_from)
        extra = {"args": dict(s.flags), **attention_fields(model)}
        if s.dpo is not None:
            sampling = decoding.generation(tokenizer, s.dpo.sampling)
            best = dpo_fine_tune(
                model, tokenizer, train,
                lambda prompts: complete_prompts(model, tokenizer, prompts, sampling,
                                                 **{**complete_kw, "mbr_pool": None}, keep_eos=True),
                eval_fn, cfg, s.dpo, batch_size=data.batch_size, max_length=data.max_length, source=s.sonnet_path,
                extra=extra)
        else:
            best, _ = fine_tune_lm(model, tokenizer, train, eval_fn, cfg, max_length=data.max_length, extra=extra,
                                   **data.loader_kwargs())
    if not generate_only:
        unwrap_lora(model)  # a plain GPT-2: loads without adapter code and decodes faster
        fold_prefix(model)  # prefix tuning: plain prefixes, no MLP
        path = out_dir / "sonnet-model.pt"
        save_model(model.gpt, path, task="sonnet", dev=best, **attention_fields(model))
        print(f"saved the model to {path}")

    result: dict[str, Any] = {"best": best}
    model.eval()
    with torch.no_grad():  # the float model's held-out loss, before --quantize / --generate_only consume it
        held = held_out_loss(model, dev_loss)
    result["dev_loss"], result["dev_perplexity"] = held["loss"], held["perplexity"]
    # --quantize; --generate_only keeps one copy of the weights, laid out for the rows of a decoding step
    rows = decoding_rows(decoding.batch_size, config.num_beams, pooled=decoding.pool is not None)
    model.gpt = prepare_for_decoding(model.gpt, s.quantize, inference_only=generate_only, decode_rows=rows,
                                     calibration=Calibration(s.calibration, tokenizer))
    if ranks.is_main():  # under torchrun: one writer
        files.open(out_dir, s.run, parent)
    for name, prompts in (("dev", dev_prompts), ("test", test_prompts)):
        texts = complete_prompts(model, tokenizer, [x.text for x in prompts], config, **complete_kw)
        if ranks.is_main():
            write_sonnets(files.path(name), list(enumerate(texts)))  # the starter numbers sonnets by position
            print(f"wrote {shown(files.path(name))}")
        result[name] = texts
    result["dev_chrf"] = chrf(result["dev"], dev_refs)
    if ranks.is_main():
        files.publish("chrF", result["dev_chrf"])
    print(f"dev chrF {result['dev_chrf']:.2f}, dev sonnet loss {held['loss']:.4f} (perplexity "
          f"{held['perplexity']:.2f}) ({decoding.label})")
    scores = {k: result[k] for k in ("dev_chrf", "dev_loss", "dev_perplexity")}
    form_dir = out_dir if ranks.is_main() else None  # under torchrun: one writer
    result["form"] = write_form_report(form_dir, {"dev": result["dev"], "test": result["test"]},
                                       {**scores, "decoding": decoding.label})
    print(f"\n{result['test'][0]}")
    return result


__all__ = ["SonnetDecoding", "SonnetSettings", "complete_prompts", "continue_prompts", "dev_chrf",
           "model_for_training", "prompt_batches", "run"]
