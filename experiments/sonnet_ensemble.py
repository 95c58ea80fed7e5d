"""Ensembles of sonnet models (``python -m experiments ensemble a/sonnet-model.pt b/sonnet-model.pt
--out DIR``): every model samples ``--samples`` sonnets per prompt, and the ensemble keeps, per
prompt, the candidate of highest mean chrF against all the others (minimum Bayes risk over the
pooled candidates, ``decoding.mbr``). Sonnets have no class probabilities to average; the MBR
consensus is what several models agree on.

Each model samples as the first model's run sampled (``cli.sonnet``'s ``--decoding sample`` of its
flags: ``--temperature``, ``--top_p``, ``--top_k``, ``--repetition_penalty``,
``--no_repeat_ngram_size``, ``--max_new_tokens``, ``--num_lines``; the starter's nucleus sampling
where the run is unknown), from a generator seeded with ``--seed`` plus the model's position, so
members never share a random stream; each model is restored once for both splits. The prompt and
reference files are those of the first model's run (the flags in the ``last.pt`` beside it; the
course's files otherwise); ``--dev``/``--test`` replace the prompt files. Written to ``--out``:
``predictions/generated_sonnets{_dev,}.txt`` in the starter's format, and ``ensemble.{csv,md}`` with
each model's dev chrF (its first sample per prompt) and the ensemble's.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cli.sonnet import build_parser, generation_config
from decoding.mbr import chrf_utility, mbr_select
from experiments.launch import ExperimentError
from experiments.tables import write_tables
from tasks.course_data import read_sonnets, write_sonnets
from tasks.metrics import chrf
from tasks.restore import restore_task_model
from tasks.settings import ModelSettings, from_flags
from tasks.sonnet import SonnetDecoding, SonnetSettings, complete_prompts


def sampling(flags: Mapping[str, Any]) -> SonnetDecoding:
    """The sampling of a sonnet run with ``flags`` (the sonnet command line's defaults where a flag is
    missing): the ``GenerationConfig`` the run's own ``--decoding sample`` would have."""
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **flags})
    return SonnetDecoding(config=generation_config(args, "sample"), num_lines=args.num_lines)


def member_samples(paths: Sequence[str | Path], prompts: Mapping[str, Sequence[str]], samples: int,
                   flags: Mapping[str, Any], *, batch_size: int, seed: int, device: torch.device | str
                   ) -> dict[str, list[list[list[str]]]]:
    """{split: [model][prompt] -> ``samples`` full sonnets (prompt included)} for ``prompts`` by
    split, one model in memory at a time, each restored once."""
    settings = replace(SonnetSettings(), model=from_flags(ModelSettings, flags))
    decoding = sampling(flags)
    out: dict[str, list[list[list[str]]]] = {split: [] for split in prompts}
    for i, path in enumerate(paths):
        restored = restore_task_model(path, "sonnet", settings, device=device)
        model, tokenizer = restored.model.to(device).eval(), restored.tokenizer
        config = decoding.generation(tokenizer)
        for split, texts in prompts.items():
            sonnets = complete_prompts(model, tokenizer, [p for p in texts for _ in range(samples)], config,
                                       batch_size=batch_size, seed=seed + i)
            out[split].append([sonnets[j * samples:(j + 1) * samples] for j in range(len(texts))])
    return out


def mbr_choice(per_model: Sequence[Sequence[Sequence[str]]]) -> list[str]:
    """Per prompt, the pooled candidate of every model with the highest mean chrF against the rest."""
    chosen = []
    for j in range(len(per_model[0])):
        pool = [text for model in per_model for text in model[j]]
        chosen.append(pool[mbr_select(pool, chrf_utility)])
    return chosen


def run_sonnet_ensemble(paths: Sequence[str | Path], out: str | Path, flags: Mapping[str, Any], *, samples: int = 4,
                        dev: str | None = None, test: str | None = None, limit: int | None = None,
                        batch_size: int = 12, seed: int = 11711, device: str | torch.device = "cpu"
                        ) -> dict[str, Any]:
    """MBR over the pooled samples of the sonnet models at ``paths`` (``experiments.ensemble`` has
    checked that they are) on the dev and test prompts (files: ``dev``/``test``, else ``flags``, the
    first model's run flags); writes the prediction files and ``ensemble.{csv,md}``. Returns
    ``{"dev": texts, "test": texts, "dev_chrf": x, "members": [...]}``."""
    out, d = Path(out), SonnetSettings()
    limit = int(flags.get("limit") or 0) if limit is None else limit
    files = {"dev": dev or flags.get("dev_held_out_sonnet_path", d.dev_held_out_sonnet_path),
             "test": test or flags.get("held_out_sonnet_path", d.held_out_sonnet_path)}
    refs = [s.text for s in read_sonnets(flags.get("dev_true_sonnet_path", d.dev_true_sonnet_path), limit)]
    prompts = {split: [s.text for s in read_sonnets(path, limit)] for split, path in files.items()}
    if len(refs) != len(prompts["dev"]):
        raise ExperimentError(f"{files['dev']} has {len(prompts['dev'])} prompts but the references {len(refs)}")
    per_split = member_samples(paths, prompts, samples, flags, batch_size=batch_size, seed=seed, device=device)
    result: dict[str, Any] = {}
    for split, name in (("dev", "generated_sonnets_dev.txt"), ("test", "generated_sonnets.txt")):
        result[split] = mbr_choice(per_split[split])
        write_sonnets(out / "predictions" / name, list(enumerate(result[split])))
        print(f"wrote {out / 'predictions' / name}")
    result["members"] = [{"model": str(p), "dev chrF": chrf([c[0] for c in m], refs)}
                         for p, m in zip(paths, per_split["dev"])]
    result["dev_chrf"] = chrf(result["dev"], refs)
    rows = [*result["members"], {"model": f"MBR over {len(paths)} models x {samples} samples",
                                 "dev chrF": result["dev_chrf"]}]
    csv_path, md_path = write_tables(rows, ["model", "dev chrF"], out / "ensemble", "sonnet ensemble, dev set")
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return result


__all__ = ["mbr_choice", "member_samples", "run_sonnet_ensemble", "sampling"]
