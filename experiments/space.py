"""Search spaces of a sweep, written as ``name=kind:args`` on the command line or in a YAML/JSON file.

Each name is a flag of the task (``lr`` -> ``--lr``); the kinds are Optuna's distributions::

    lr=loguniform:1e-5:1e-3        a float, sampled on a log scale
    warmup_ratio=uniform:0:0.2     a float
    lora_r=int:4:32:4              an integer from 4 to 32 in steps of 4 (step optional)
    epochs=logint:1:16             an integer on a log scale
    batch_size=choice:8,16,32      one of the values (numbers stay numbers)

A file holds a mapping of the same: ``{"lr": "loguniform:1e-5:1e-3", "batch_size": [8, 16]}``
(a list is a choice). A bad spec is an ``argparse.ArgumentTypeError`` (``--space``) or a
``SpaceError`` naming the file, so the sweep stops with exit status 2 before any trial.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("loguniform", "uniform", "int", "logint", "choice")


class SpaceError(ValueError):
    """A search-space spec or file that cannot be used."""


@dataclass(frozen=True)
class Param:
    """One dimension: the flag it sets, its kind and bounds (or choices)."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws (the same call on a resumed trial returns its saved value)."""
        if self.kind in ("loguniform", "uniform"):
            return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1,
                                     log=self.kind == "logint")
        return trial.suggest_categorical(self.name, list(self.choices))

    def spec(self) -> str:
        if self.kind == "choice":
            return f"{self.name}=choice:{','.join(map(str, self.choices))}"
        tail = f":{self.step}" if self.step else ""
        return f"{self.name}={self.kind}:{self.low:g}:{self.high:g}{tail}"


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpaceError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SpaceError(f"{what} must be finite, got {text}")
    return value


def parse_param(name: str, spec: str | Sequence[Any]) -> Param:
    """One ``kind:args`` spec (or a list: a choice) for ``name``; ``SpaceError`` if it is malformed."""
    if not name.isidentifier():
        raise SpaceError(f"{name!r} is not a flag name (e.g. lr, batch_size)")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SpaceError(f"{name}: an empty list of choices")
        return Param(name, "choice", choices=tuple(spec))
    kind, _, rest = str(spec).partition(":")
    if kind not in KINDS:
        raise SpaceError(f"{name}: unknown kind {kind!r}; use one of {', '.join(KINDS)} (e.g. {name}=uniform:0:1)")
    if kind == "choice":
        values = [_value(v.strip()) for v in rest.split(",") if v.strip()]
        if not values:
            raise SpaceError(f"{name}: choice needs values, e.g. {name}=choice:8,16")
        return Param(name, kind, choices=tuple(values))
    parts = rest.split(":")
    if len(parts) not in ((2, 3) if kind == "int" else (2,)):
        raise SpaceError(f"{name}: {kind} needs low:high{'[:step]' if kind == 'int' else ''}, got {spec!r}")
    low, high = _number(parts[0], f"{name}: low"), _number(parts[1], f"{name}: high")
    step = int(_number(parts[2], f"{name}: step")) if len(parts) == 3 else None
    if not low < high:
        raise SpaceError(f"{name}: low must be below high, got {low:g} and {high:g}")
    if kind in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{name}: a log scale needs low > 0, got {low:g}")
    if kind in ("int", "logint") and (low != int(low) or high != int(high) or (step is not None and step < 1)):
        raise SpaceError(f"{name}: {kind} needs integer bounds and a step >= 1, got {spec!r}")
    return Param(name, kind, low, high, step)


def space_arg(text: str) -> Param:
    """``--space``'s argparse type: ``name=kind:args``."""
    name, sep, spec = text.partition("=")
    try:
        if not sep:
            raise SpaceError(f"expected name=kind:args (e.g. lr=loguniform:1e-5:1e-3), got {text!r}")
        return parse_param(name.strip(), spec.strip())
    except SpaceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_space_file(path: str | Path) -> list[Param]:
    """The params of a YAML or JSON mapping (``name: spec`` or ``name: [choices]``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpaceError(f"{path}: cannot read the search space ({e.strerror or e})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise SpaceError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if not isinstance(data, Mapping) or not data:
        raise SpaceError(f"{path}: expected a mapping of flag name to spec, e.g. lr: loguniform:1e-5:1e-3")
    try:
        return [parse_param(str(k), v) for k, v in data.items()]
    except SpaceError as e:
        raise SpaceError(f"{path}: {e}") from None


def combine(params: Sequence[Param]) -> list[Param]:
    """The space's params, each name once."""
    seen: dict[str, Param] = {}
    for p in params:
        if p.name in seen:
            raise SpaceError(f"{p.name} is given twice in the search space")
        seen[p.name] = p
    if not seen:
        raise SpaceError("an empty search space: give --space name=kind:args or --space_file")
    return list(seen.values())


__all__ = ["KINDS", "Param", "SpaceError", "combine", "parse_param", "read_space_file", "space_arg"]
