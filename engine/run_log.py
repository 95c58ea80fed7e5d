"""What a run leaves to be read while and after it trains: ``metrics.jsonl`` and ``curves.png``.

The Trainer appends one JSON record per logging step and per epoch, and redraws the
curves after each epoch; kept here so that the loop does not carry plotting code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (``metrics.jsonl``)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(history: Sequence[Mapping[str, Any]], metric: str, path: str | Path) -> None:
    """Losses and a dev metric per epoch, side by side, saved as a PNG at ``path``. ``history``
    holds the Trainer's epoch records (``epoch``, ``train_loss``, ``dev``). A dev ``loss`` (held-out
    cross-entropy) is drawn beside the training loss; the right panel shows the selection
    ``metric``, or when that is the dev loss, the first other dev metric (e.g. chrF)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    dev_names = list(history[-1]["dev"]) if history else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] if h["train_loss"] is not None else float("nan") for h in history],
           marker="o", label="training")
    if "loss" in dev_names:
        a.plot(epochs, [h["dev"].get("loss", float("nan")) for h in history], marker="o", label="dev")
        a.legend()
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    shown = metric if metric != "loss" or "loss" not in dev_names else next(
        (k for k in dev_names if k not in ("loss", "perplexity")), metric)
    dev = [h["dev"].get(shown, float("nan")) for h in history]
    b.plot(epochs, dev, marker="o", color="tab:orange")
    b.set(xlabel="epoch", ylabel=shown, title=f"dev {shown}")
    for ax in (a, b):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["append_record", "plot_curves"]
