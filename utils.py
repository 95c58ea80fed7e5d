"""What the course's grader scripts import from the project root.

The starter's ``sanity_check.py`` does ``from utils import model_size_to_params`` and
passes the result to ``GPT2Model.from_pretrained(model=..., **params)``. The sizes come
from ``config.SIZES``, the one table of GPT-2 sizes, so they cannot drift from it.
"""

from __future__ import annotations

from config import SIZES
from models.loading import HUB_IDS


def model_size_to_params(model_size: str) -> dict[str, int]:
    """``{'d': width, 'l': layers, 'num_heads': heads}`` of a GPT-2 hub size, as the starter's."""
    if model_size not in HUB_IDS:
        raise ValueError(f"unknown model size {model_size!r}; choose one of {list(HUB_IDS)}")
    d, n_layer, n_head = SIZES[model_size]
    return {"d": d, "l": n_layer, "num_heads": n_head}
