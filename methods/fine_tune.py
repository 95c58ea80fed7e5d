"""Fine-tuning modes: the one registry of what trains in each mode, and the adapter settings.

A mode is a name, a one-line help, the learning rate a task uses when ``--lr`` is not given,
whether it needs a task head (``last-linear-layer`` trains only the head, so the cloze
scorer and the sonnet LM, which have none, do not offer it), and ``prepare``, which makes
the right parameters of a task model train. Adapter modes also name the frozen dataclass of
their settings (``LoraConfig``, in the shape of PEFT's) and the flag each field is read from
(``cli.common.fine_tune_config`` builds it from any mode's ``flags``). Every task script takes its
``--fine-tune-mode`` choices and default lr from here, and the KD teacher is rebuilt through
the same ``set_fine_tune_mode``. Adding a mode (e.g. prefix tuning) is its own module plus
its settings and one ``register(...)`` below.

The registry holds the modes' settings, not their machinery: the adapter implementations
(``methods.lora``, ``methods.prefix``, ``methods.reft``, and the layer swapping they use) load when a mode that
needs them is applied, so a full fine-tuning run never reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from torch import nn

# The Linear layers LoRA adapts by default: attention's fused q/k/v and output projection, and both
# MLP layers (``methods.lora.apply_lora`` has the same default; a test keeps them equal).
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
QUANTIZE_BASE = ("none", "int8", "int4")  # --quantize_base (``methods.qlora`` has the same; a test keeps them equal)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (DoRA's with ``use_dora``): rank, alpha (scaling = alpha / r),
    dropout on the adapter input, and the Linear name suffixes wrapped."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_dora: bool = False
    quantize_base: str = "none"  # none | int8 | int4: the frozen base stored quantised (QLoRA, methods.qlora)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if self.quantize_base not in QUANTIZE_BASE:
            raise ValueError(f"quantize_base must be one of {QUANTIZE_BASE}, got {self.quantize_base!r}")
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets  # "a,b" from a flag
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix-tuning settings: prefix positions per layer, and the width of the
    reparameterisation MLP's hidden layer (Li and Liang: 10 positions for table-to-text, 512)."""

    length: int = 10
    hidden: int = 512

    def __post_init__(self) -> None:
        if self.length < 1 or self.hidden < 1:
            raise ValueError(f"prefix length and hidden size must be >= 1, got {self.length} and {self.hidden}")


def reft_positions(spec: str) -> str:
    """``--reft_positions``: ``fN`` (the first N real tokens), ``lN`` (the last N) or ``fN+lN``, pyreft's
    notation; returned as ``fN+lN`` with a zero part left out."""
    counts = {"f": 0, "l": 0}
    for part in spec.replace(" ", "").split("+"):
        if part[:1] not in counts or not part[1:].isdigit() or counts[part[0]]:
            raise ValueError(f"ReFT positions are fN, lN or fN+lN (first/last N real tokens), got {spec!r}")
        counts[part[0]] = int(part[1:])
    if not any(counts.values()):
        raise ValueError(f"ReFT positions must name at least one position, got {spec!r}")
    return "+".join(f"{k}{n}" for k, n in counts.items() if n)


def reft_layers(spec: str) -> str:
    """``--reft_layers``: ``all``, or comma-separated block indices (returned sorted, without repeats)."""
    if spec.strip() == "all":
        return "all"
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"ReFT layers are 'all' or comma-separated block indices, got {spec!r}")
    return ",".join(str(i) for i in sorted({int(p) for p in parts}))


@dataclass(frozen=True)
class ReftConfig:
    """LoReFT settings (Wu et al. 2024): the rank r of each intervention, the blocks whose outputs
    it edits (``all`` or indices ``0,2``) and the positions, the first and last real tokens (``f1+l1``)."""

    rank: int = 4
    layers: str = "all"
    positions: str = "f1+l1"

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"ReFT rank must be positive, got {self.rank}")
        object.__setattr__(self, "layers", reft_layers(self.layers))
        object.__setattr__(self, "positions", reft_positions(self.positions))

    @property
    def layer_indices(self) -> tuple[int, ...] | None:
        """The edited blocks (None: every block)."""
        return None if self.layers == "all" else tuple(int(i) for i in self.layers.split(","))

    def count(self, side: str) -> int:
        """How many of the first (``"f"``) or last (``"l"``) real tokens are edited."""
        return sum(int(p[1:]) for p in self.positions.split("+") if p[0] == side)


Prepare = Callable[[nn.Module, tuple[str, ...], Any], bool]


@dataclass(frozen=True)
class FineTuneMode:
    """One fine-tuning mode. ``prepare(model, head, adapter)`` sets what trains (adding
    adapters if the mode has them) and returns True when checkpoints should hold only the
    trainable parameters (the frozen body is rebuilt from the same weights or seed)."""

    name: str
    help: str
    default_lr: float
    prepare: Prepare
    needs_head: bool = False
    adapter: type | None = None  # the settings dataclass of an adapter mode
    flags: Mapping[str, str] = field(default_factory=dict)  # adapter field -> command-line flag (dest)


MODES: dict[str, FineTuneMode] = {}


def register(mode: FineTuneMode) -> FineTuneMode:
    MODES[mode.name] = mode
    return mode


def _is_head(name: str, head: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def _head_only(model: nn.Module, head: tuple[str, ...], adapter: None) -> bool:
    for name, p in model.named_parameters():
        p.requires_grad = _is_head(name, head)
    return True


def _full_model(model: nn.Module, head: tuple[str, ...], adapter: None) -> bool:
    for p in model.parameters():
        p.requires_grad = True
    return False


class _AdapterModules(NamedTuple):
    lora: ModuleType
    prefix: ModuleType
    reft: ModuleType
    peft: ModuleType  # methods.peft_adapters


def _adapters() -> _AdapterModules:
    """``methods.lora``, ``methods.prefix``, ``methods.reft`` and ``methods.peft_adapters``, imported when an
    adapter mode is applied or a PEFT adapter is read."""
    # A function-level import: runs without adapters never load the adapter machinery.
    from methods import lora, peft_adapters, prefix, reft

    return _AdapterModules(lora, prefix, reft, peft_adapters)


def _lora(model: nn.Module, head: tuple[str, ...], cfg: LoraConfig) -> bool:
    lora = _adapters().lora
    lora.apply_lora(model, cfg.targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_dora=cfg.use_dora,
                    quantize_base=cfg.quantize_base)
    lora.mark_only_lora_trainable(model, extra_trainable=head)
    return True


def _prefix(model: nn.Module, head: tuple[str, ...], cfg: PrefixConfig) -> bool:
    """A prefix on every attention layer (a loaded prefix model keeps its own); only it and ``head`` train."""
    prefix = _adapters().prefix
    prefix.ensure_prefix(model, cfg.length, cfg.hidden)
    prefix.mark_only_prefix_trainable(model, head)
    return True


def _reft(model: nn.Module, head: tuple[str, ...], cfg: ReftConfig) -> bool:
    """LoReFT interventions on the chosen blocks' outputs (a loaded ReFT model's own, if it has them);
    only they and ``head`` train."""
    reft = _adapters().reft
    reft.ensure_reft(model, cfg.rank, cfg.layer_indices, cfg.count("f"), cfg.count("l"))
    reft.mark_only_reft_trainable(model, head)
    return True


register(FineTuneMode("last-linear-layer", "GPT-2 frozen, only the head trains", 1e-3, _head_only,
                      needs_head=True))
register(FineTuneMode("full-model", "every parameter trains", 1e-5, _full_model))
register(FineTuneMode("lora", "low-rank adapters (DoRA with --use_dora) and the head train", 3e-4, _lora,
                      adapter=LoraConfig, flags={"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                                 "targets": "lora_targets", "use_dora": "use_dora",
                                                 "quantize_base": "quantize_base"}))
register(FineTuneMode("prefix", "learned key/value prefixes per layer (Li and Liang 2021) and the head train", 5e-4,
                      _prefix, adapter=PrefixConfig,
                      flags={"length": "prefix_length", "hidden": "prefix_hidden"}))
register(FineTuneMode("reft", "LoReFT interventions on hidden states at a few positions (Wu et al. 2024) and the "
                      "head train", 1e-3, _reft, adapter=ReftConfig,
                      flags={"rank": "reft_rank", "layers": "reft_layers", "positions": "reft_positions"}))


@dataclass(frozen=True)
class FineTuneConfig:
    """A mode and its adapter settings (None: the adapter's defaults, or no adapter). ``load_adapter``:
    a PEFT adapter folder whose weights the lora mode's adapters start from (``--load_adapter``); it is
    not saved (``to_dict``): a checkpoint holds the adapters as trained."""

    mode: str = "full-model"
    adapter: Any = None
    load_adapter: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fine-tune mode must be one of {tuple(MODES)}, got {self.mode!r}")
        want = MODES[self.mode].adapter
        if self.adapter is not None and (want is None or not isinstance(self.adapter, want)):
            raise ValueError(f"fine-tune mode {self.mode!r} takes {want.__name__ if want else 'no adapter'} "
                             f"settings, got {type(self.adapter).__name__}")
        if self.load_adapter is not None and self.mode != "lora":
            raise ValueError(f"a PEFT adapter loads in the lora mode, not {self.mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint's ``extra`` (loadable with ``weights_only``)."""
        return {"mode": self.mode, "adapter": None if self.adapter is None else asdict(self.adapter)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FineTuneConfig:
        adapter_cls = MODES[d["mode"]].adapter
        adapter = d.get("adapter")
        return cls(d["mode"], adapter_cls(**adapter) if adapter is not None and adapter_cls is not None else None)


def mode_names(has_head: bool = True) -> tuple[str, ...]:
    """The modes a task model offers: those needing a head only if it has one."""
    return tuple(n for n, m in MODES.items() if has_head or not m.needs_head)


def modes_help(names: Sequence[str]) -> str:
    """``--fine-tune-mode`` help: each mode and what trains in it."""
    return "; ".join(f"{n}: {MODES[n].help}" for n in names)


def default_lr(mode: str) -> float:
    return MODES[mode].default_lr


def set_fine_tune_mode(model: nn.Module, config: FineTuneConfig, head: Sequence[str]) -> bool:
    """Make the parameters of ``config.mode`` train (``head`` names the task head's modules);
    returns True when checkpoints should hold only trainable parameters."""
    mode = MODES[config.mode]
    if mode.needs_head and not tuple(head):
        raise ValueError(f"fine-tune mode {mode.name!r} trains only the head, and this model has none")
    adapter = config.adapter if config.adapter is not None or mode.adapter is None else mode.adapter()
    trainable_only = mode.prepare(model, tuple(head), adapter)
    if config.load_adapter is not None:
        _adapters().peft.load_peft_adapter(model, config.load_adapter)
    return trainable_only


def peft_adapter_settings(folder: str | Path, quantize_base: str = "none") -> FineTuneConfig:
    """The lora mode's settings that rebuild the PEFT LoRA/DoRA adapter in ``folder`` (``--load_adapter``):
    its configuration and tensor names are checked now, its tensors read once, when they load."""
    fields = _adapters().peft.read_peft_adapter(folder, tensors=False)[0]
    return FineTuneConfig("lora", LoraConfig(**fields, quantize_base=quantize_base), load_adapter=str(folder))


__all__ = ["DEFAULT_TARGETS", "MODES", "FineTuneConfig", "FineTuneMode", "LoraConfig", "PrefixConfig", "ReftConfig",
           "default_lr", "mode_names", "modes_help", "peft_adapter_settings", "reft_layers", "reft_positions",
           "register", "set_fine_tune_mode"]
