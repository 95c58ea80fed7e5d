"""What the Trainer writes and reads back of a run: ``last.pt`` (the full state for exact
resume), the top-k best checkpoints, and the metrics log.

Kept beside the loop as a mixin of ``engine.trainer.Trainer`` (the methods use its
attributes: model, optimizer, scheduler, config, counters, history, top-k list), so the
loop reads on its own and every file the engine writes is listed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine import distributed
from engine.checkpoints import (
    atomic_save,
    keep_top_k,
    load_checkpoint,
    load_checkpoint_weights,
    model_config_of,
    trainable_state_dict,
)
from engine.rng import get_rng_state, sampler_rng_state, set_rng_state, set_sampler_rng_state
from engine.run_log import append_record
from models.loading import CheckpointError


class CheckpointMixin:
    """Checkpoint save/resume bookkeeping and the log of a ``Trainer``."""

    def _keep_top_k(self, score: float) -> None:
        """Offer this epoch to the top k; rank 0 writes (FSDP weights are gathered by every rank
        first) and every rank keeps the same list."""
        gathered = self._model_state() if self._sharded() else None
        self.top_k = distributed.on_main(lambda: keep_top_k(
            self.top_k, self.config.save_top_k, score, self.epoch, self.output_dir, lambda: {
                "model": gathered if gathered is not None else self._model_state(),
                "trainable_only": self.config.save_trainable_only, "epoch": self.epoch,
                "dev": self.history[-1]["dev"], "train_config": self._config_dict(),
                "model_config": model_config_of(self.model), "extra": self.extra}))

    def _sharded(self) -> bool:
        return distributed.is_fsdp(getattr(self, "wrapped", None))

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds (FSDP: gathered on rank 0, a collective call)."""
        if self._sharded():
            return distributed.full_state_dict(self.model, self.config.save_trainable_only)
        if self.config.save_trainable_only:
            return trainable_state_dict(self.model)
        return self.model.state_dict()

    def _state_keys(self) -> set[str]:
        if self.config.save_trainable_only:
            return {n for n, p in self.model.named_parameters() if p.requires_grad}
        return set(self.model.state_dict())

    def _config_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.config)
        d["betas"] = list(d["betas"])
        if distributed.world_size() > 1:  # the global batch: a resume with another number of ranks differs
            d["world_size"] = distributed.world_size()
        return d

    def _save_last(self) -> None:
        """``last.pt``, written by rank 0; under torchrun it also holds every rank's RNG state, so
        that each rank resumes its own dropout stream."""
        rng = get_rng_state()
        rng["sampler"] = sampler_rng_state(self.train_loader)
        ranks_rng = distributed.gather_objects(rng)
        model_state = self._model_state()
        optim_state = distributed.full_optimizer_state(self.model, self.optimizer) if self._sharded() \
            else self.optimizer.state_dict()
        if not distributed.is_main():
            return
        atomic_save({
            "model": model_state,
            "trainable_only": self.config.save_trainable_only,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            **({"rank_rng": ranks_rng} if len(ranks_rng) > 1 else {}),
            "epoch_rng": self.epoch_rng if self.step_in_epoch else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "partial_loss": list(self._partial_loss),
            "history": self.history,
            "best_metrics": self.best_metrics,
            "best_score": self.best_score,
            "top_k": [list(t) for t in self.top_k],
            "bad_epochs": self.bad_epochs,
            "stopped": self.stop,
            "train_config": self._config_dict(),
            "model_config": model_config_of(self.model),
            "extra": self.extra,
        }, self.output_dir / "last.pt")

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self._check_same_parameters(ckpt, path)
        self._load_model(ckpt, path)
        if self._sharded():
            distributed.load_full_optimizer_state(self.model, self.optimizer, ckpt["optimizer"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch = ckpt["epoch"]
        self.global_step = ckpt["global_step"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self._partial_loss = (float(ckpt["partial_loss"][0]), int(ckpt["partial_loss"][1]))
        self.epoch_rng = ckpt["epoch_rng"]
        self.history = list(ckpt["history"])
        self.best_metrics = dict(ckpt["best_metrics"])
        self.best_score = ckpt["best_score"]
        self.top_k = [(float(s), int(e), str(p)) for s, e, p in ckpt["top_k"]]
        self.bad_epochs = ckpt["bad_epochs"]
        self.stop = ckpt["stopped"]
        ranks_rng = ckpt.get("rank_rng") or [ckpt["rng"]]
        rng = ranks_rng[distributed.rank()] if len(ranks_rng) == distributed.world_size() else ckpt["rng"]
        set_rng_state(rng)
        set_sampler_rng_state(self.train_loader, rng)

    def _load_model(self, ckpt: Mapping[str, Any], path: str | Path) -> None:
        if self._sharded() and "model" in ckpt:
            distributed.load_full_state_dict(self.model, ckpt["model"], ckpt.get("trainable_only", False))
            return
        load_checkpoint_weights(self.model, ckpt, path)

    def _check_same_parameters(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """A run resumes only into the parameters it trained: a checkpoint of another fine-tune mode
        (a frozen body's head, LoRA adapters, the full model) is refused with what differs, before
        the optimizer state (one slot per trained parameter) is forced onto other parameters."""
        saved, ours = set(ckpt.get("model", {})), self._state_keys()
        if ckpt.get("trainable_only", False) != self.config.save_trainable_only or saved != ours:
            detail = "; ".join(f"{what} ({len(keys)}): {', '.join(sorted(keys))}" for what, keys in (
                ("only in the checkpoint", saved - ours), ("only in this run", ours - saved)) if keys)
            raise CheckpointError(f"{path} was written by a run that trains other parameters (another fine-tune "
                                  f"mode or model?){': ' + detail if detail else ''}; resume with that run's flags "
                                  "or start a new run in another --output_dir")

    # ------------------------------------------------------------ logging

    def _log(self, record: dict[str, Any]) -> None:
        if distributed.is_main():
            append_record(self.output_dir / "metrics.jsonl", record)
