"""Figures the notebooks show; each returns its matplotlib figure so a notebook can save it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fastslow.data.types import CaptionedImages


def image_grid(split: CaptionedImages, indices: Sequence[int], columns: int = 4, captions: int = 2, width: int = 34):
    """Images with their first captions underneath."""
    rows = int(np.ceil(len(indices) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices):
        ax.imshow(split.images[index], interpolation="nearest")
        text = "\n".join(textwrap.fill(c, width) for c in split.captions_of(index)[:captions])
        ax.set_title(text, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def caption_statistics(split: CaptionedImages, top_words: int = 25):
    """Caption length by kind, and the most frequent words."""
    from fastslow.data.text import split_words

    words = [split_words(c) for c in split.captions]
    frame = pd.DataFrame({"length (words)": [len(w) for w in words], "kind": split.caption_kind})
    counts = pd.Series([w for ws in words for w in ws]).value_counts().head(top_words)
    fig, (length_ax, words_ax) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1, 2]})
    sns.histplot(frame, x="length (words)", hue="kind", discrete=True, multiple="stack", ax=length_ax)
    length_ax.set_title("caption length")
    words_ax.bar(counts.index, counts.to_numpy())
    words_ax.tick_params(axis="x", rotation=70)
    words_ax.set_title(f"{top_words} most frequent words (train)")
    fig.tight_layout()
    return fig


def training_curves(histories: dict[str, dict], title: str = "training"):
    """Per-step loss (smoothed) and per-epoch validation score of one or more training runs."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.5))
    for name, history in histories.items():
        steps = pd.DataFrame(history["steps"])
        smooth = steps["loss"].rolling(max(1, len(steps) // 50), min_periods=1).mean()
        loss_ax.plot(steps["step"], smooth, label=name)
        epochs = pd.DataFrame(history["epochs"])
        val_ax.plot(epochs["epoch"], epochs["val_score"], marker="o", label=name)
    loss_ax.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    val_ax.set(xlabel="epoch", ylabel="validation RSUM", title=f"{title}: validation")
    loss_ax.legend()
    val_ax.legend()
    fig.tight_layout()
    return fig


def retrieved_images(
    split: CaptionedImages,
    queries: Sequence[int],
    ranked_images: dict[str, np.ndarray],
    k: int = 5,
):
    """For each query caption, the top-``k`` images of each method; the right image framed green.

    ``ranked_images[method]`` is ``(len(queries), >= k)`` image indices, best first.
    """
    methods = list(ranked_images)
    rows = len(queries) * len(methods)
    fig, axes = plt.subplots(rows, k, figsize=(1.7 * k + 2.5, 1.8 * rows), squeeze=False)
    for q, caption in enumerate(queries):
        target = split.caption_image[caption]
        for m, method in enumerate(methods):
            row = q * len(methods) + m
            for j in range(k):
                ax = axes[row, j]
                image = ranked_images[method][q, j]
                ax.imshow(split.images[image], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                color = "tab:green" if image == target else "lightgray"
                for spine in ax.spines.values():
                    spine.set(color=color, linewidth=3 if image == target else 1)
            label = f"{method}\n" + textwrap.fill(split.captions[caption], 28) if m == 0 else method
            axes[row, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def recall_bars(table: pd.DataFrame, title: str):
    """Grouped bars of R@1/5/10 per method (``table`` has columns method, direction, R@1, R@5, R@10)."""
    long = table.melt(id_vars=["method", "direction"], value_vars=["R@1", "R@5", "R@10"], var_name="metric")
    grid = sns.catplot(
        data=long, x="metric", y="value", hue="method", col="direction", kind="bar", height=3.2, aspect=1.2
    )
    grid.set_axis_labels("", "recall (%)")
    grid.figure.suptitle(title, y=1.04)
    return grid.figure


def clip_strip(split: CaptionedImages, indices: Sequence[int], width: int = 90):
    """Each clip's frames in a row, left to right in time, under its first caption (and its twin
    kind, when it has a twin). Images (one frame) work too."""
    frames = split.frames
    clips = split.images if split.images.ndim == 5 else split.images[:, None]
    figsize = (max(1.3 * frames, 6.0), 1.75 * len(indices))
    fig, axes = plt.subplots(len(indices), frames, figsize=figsize, squeeze=False)
    for row, index in zip(axes, indices):
        for t, ax in enumerate(row):
            ax.imshow(clips[index, t], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        twin = f" [{split.twin_kind[index]} of {split.twin[index]}]" if split.twin[index] >= 0 else ""
        title = textwrap.fill(f"{index}: {split.captions_of(index)[0]}{twin}", width)
        row[0].set_title(title, fontsize=8, loc="left")
    for t, ax in enumerate(axes[-1]):
        ax.set_xlabel(f"t={t}", fontsize=7)
    fig.tight_layout()
    return fig
