"""``plot_history``: loss and metrics per epoch, training and validation side by side.

Needs matplotlib (``pip install spark_keras_ml[plot]``); nothing else in the package imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def plot_history(history: Any, *, title: str | None = None) -> Any:
    """Draw one panel per metric (``loss`` first), with its ``val_`` twin on the same axes.

    ``history`` is ``fitted.history``, a ``KerasTransformer``, or any ``{name: [per epoch]}``
    mapping. Returns the matplotlib ``Figure``.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "Expected matplotlib for plot_history. Install it with "
            "`pip install 'spark_keras_ml[plot]'`. Received: no module named matplotlib"
        ) from exc
    values = _as_history(history)
    names = [k for k in values if not k.startswith("val_")]
    names += [k[4:] for k in values if k.startswith("val_") and k[4:] not in names]
    names.sort(key=lambda k: (k != "loss", k))
    if not names:
        raise ValueError("Expected a history with at least one metric. Received: an empty history")
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in ((name, "train"), (f"val_{name}", "validation")):
            if key in values:
                epochs = range(1, len(values[key]) + 1)
                ax.plot(epochs, values[key], marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def _as_history(history: Any) -> Mapping[str, Sequence[float]]:
    if hasattr(history, "history") and not isinstance(history, Mapping):
        history = history.history
    if not isinstance(history, Mapping):
        raise TypeError(
            "Expected fitted.history, a KerasTransformer or a {metric: [values]} mapping. "
            f"Received: {type(history).__name__}"
        )
    return history
