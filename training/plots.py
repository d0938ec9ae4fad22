"""Report figures: learning curves, confusion matrix, misclassified crops, shots curve.

matplotlib's Agg backend is chosen per figure (``Figure`` + ``FigureCanvasAgg``)
rather than with ``matplotlib.use``, so importing this changes no global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def learning_curves(history: Sequence[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, head phase shaded."""
    fig = _figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        values = [row.get(key) for row in history]
        if any(v is not None and v == v for v in values):
            loss_ax.plot(epochs, values, style, label=key.replace("_", " "))
    for key, style in (("train_acc", "-"), ("val_acc", "--")):
        values = [row.get(key) for row in history]
        if any(v is not None and v == v for v in values):
            acc_ax.plot(epochs, values, style, label=key.replace("_", " "))
    head = [row["epoch"] for row in history if row.get("phase") == "head"]
    for ax in (loss_ax, acc_ax):
        if head:
            ax.axvspan(min(head) - 0.5, max(head) + 0.5, color="0.9", label="head only")
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path)


def confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix with counts in the cells."""
    size = max(5.0, 0.45 * len(labels) + 2)
    fig = _figure(size, size)
    ax = fig.subplots()
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=6,
            color="white" if norm[i, j] > 0.5 else "black",
        )
    fig.tight_layout()
    fig.savefig(path)


def misclassified_grid(
    images: np.ndarray,
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    path: Path,
    limit: int = 36,
) -> int:
    """A grid of the most confident mistakes (BGR crops shown as RGB); returns how many."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:limit]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig = _figure(cols * 1.7, rows * 1.9)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    if len(wrong) == 0:
        axes[0].text(0, 0.5, "no misclassified crops", fontsize=10)
    for ax, i in zip(axes, wrong, strict=False):
        ax.imshow(images[i][:, :, ::-1])
        ax.set_title(
            f"{labels[targets[i]]}\n-> {labels[predicted[i]]} {probs[i, predicted[i]]:.2f}",
            fontsize=7,
        )
    fig.tight_layout()
    fig.savefig(path)
    return len(wrong)


def shots_curve(rows: Sequence[dict], path: Path) -> None:
    """Accuracy against shots per class, one line per method."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted((row["shots"], row["accuracy"]) for row in rows if row["method"] == method)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "o-", label=method)
    ax.set_xscale("log")
    ax.minorticks_off()  # the log axis would label 6, 7, 8... as 6x10^0
    shots = sorted({row["shots"] for row in rows})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("training crops per class")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
