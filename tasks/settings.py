"""The typed settings every task run shares: what a script's command line becomes, and all that a
task's ``run`` reads. Each script parses argv once (``cli/``) into these; below the entry point
nothing sees the command-line parser or its Namespace.

- ``ModelSettings``: which GPT-2 body to build and how (size or folder, weights, tokenizer,
  compile, gradient checkpointing, dropout);
- ``DataSettings``: how much of each split to read and how to batch it;
- ``RunSettings``: the device and the run folder asked for, and a model to start from;
- ``TaskSettings``: those, with the engine's ``TrainConfig`` (the optimisation and the loop,
  including the seed and resume), the ``FineTuneConfig`` of the fine-tune mode and ``flags``:
  the command line's values, flat, which checkpoints keep as ``extra["args"]`` (provenance;
  resume compares them; a KD teacher or an ensemble member rebuilds its model from them);
- ``ClassificationSettings``: a task that can add training objectives (``ObjectiveSettings``).

A task's own settings (``tasks.sentiment.SentimentSettings``...) extend one of these with its
files and options. ``from_flags`` reads any of them out of flat command-line values, as a saved
run's ``extra["args"]`` holds them; a flag a run predates keeps the field's default, and
``flag_defaults`` tells the engine's resume check the same (``engine.resume.register_defaults``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from engine.resume import field_defaults, register_defaults
from engine.train_config import TrainConfig
from methods.fine_tune import MODES, FineTuneConfig
from methods.objectives import ObjectiveSettings

S = TypeVar("S")


def from_flags(cls: type[S], flags: Mapping[str, Any]) -> S:
    """A settings dataclass from flat command-line values: each field from the flag of its name."""
    return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})  # type: ignore[arg-type]


def fine_tune_from_flags(flags: Mapping[str, Any]) -> FineTuneConfig:
    """The ``FineTuneConfig`` of ``fine_tune_mode`` and the adapter flags the mode registry names for
    it (``lora_r`` ... for lora). Flags a saved run predates (``use_dora``) keep the adapter's default."""
    mode = MODES[flags["fine_tune_mode"]]
    if mode.adapter is None:
        return FineTuneConfig(mode.name)
    adapter = mode.adapter(**{f: flags[flag] for f, flag in mode.flags.items() if flag in flags})
    return FineTuneConfig(mode.name, adapter)


@dataclass(frozen=True)
class ModelSettings:
    """The GPT-2 body: ``model_size`` is a named size, a local Hugging Face folder or a model
    file a run saved; ``hidden_dropout_prob`` is the task's (a classifier's head dropout, the
    body's own dropout elsewhere)."""

    model_size: str = "gpt2"
    random_init: bool = False
    tokenizer: str | None = None
    hidden_dropout_prob: float = 0.3
    compile: bool = False
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DataSettings:
    """``limit``: examples per split (0: all); ``max_length``: tokens per input (0: the context)."""

    limit: int = 0
    max_length: int = 0
    batch_size: int = 8
    num_workers: int = 0
    group_by_length: bool = False

    def loader_kwargs(self) -> dict[str, Any]:
        """``tasks.common.fit_task``'s loader keywords."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers, "group_by_length": self.group_by_length}


@dataclass(frozen=True)
class RunSettings:
    """Where a run executes and keeps its files: ``use_gpu`` demands CUDA, else ``device``
    (``auto``: the best there is); ``output_dir`` None means a new folder under ``runs/<task>/``;
    ``load`` is a model an earlier run saved, to start from (or only predict with)."""

    use_gpu: bool = False
    device: str = "auto"
    output_dir: str | None = None
    load: str | None = None


@dataclass(frozen=True)
class TaskSettings:
    """What every task run is told. ``train`` is the engine's ``TrainConfig`` as the flags set it
    (seed, epochs, lr, resume...); the task fills in what only it knows (device, run folder,
    metric: ``tasks.common.train_config``)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    flags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The run's seed (the model's random weights, the data sample, the training order)."""
        return self.train.seed


@dataclass(frozen=True)
class ClassificationSettings(TaskSettings):
    """A task whose loss can take training objectives (R-Drop, SimCSE, SMART; off by default)."""

    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)


FLAT = (ModelSettings, DataSettings, RunSettings, ObjectiveSettings)  # read flag by flag (from_flags)


def _task_classes(cls: type = TaskSettings) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _task_classes(sub)


def flag_defaults(current: Mapping[str, Any]) -> dict[str, Any]:
    """Each flag's value in a run saved before the flag existed: its field's default (that run
    behaved as the default does), in the shared settings, a task's own (a name two tasks default
    differently is left out) and the adapters'; an adapter flag of a mode ``current`` (the resumed
    run's flat settings) is not in is whatever it is now, as it changes nothing."""
    out: dict[str, Any] = {}
    for cls in FLAT:
        out.update(field_defaults(cls))
    tasks: dict[str, set[str]] = {}
    for cls in _task_classes():  # None may stand for settings read from several flags (SonnetSettings.dpo)
        for k, v in field_defaults(cls).items():
            if v is not None:
                tasks.setdefault(k, set()).add(repr(v))
                out[k] = v
    out = {k: v for k, v in out.items() if len(tasks.get(k, ())) <= 1}
    mode = current.get("fine_tune_mode")
    for name, m in MODES.items():
        if m.adapter is not None:
            adapter = field_defaults(m.adapter)
            out.update({flag: adapter[f] if name == mode else current.get(flag)
                        for f, flag in m.flags.items() if f in adapter})
    return out


register_defaults("tasks", flag_defaults)

__all__ = ["ClassificationSettings", "DataSettings", "ModelSettings", "RunSettings", "TaskSettings",
           "fine_tune_from_flags", "flag_defaults", "from_flags"]
