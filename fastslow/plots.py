"""Figures the notebooks show; each returns its matplotlib figure so a notebook can save it."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fastslow.data.types import CaptionedImages


def image_grid(split: CaptionedImages, indices: Sequence[int], columns: int = 4, captions: int = 2, width: int = 34):
    """Images with their first captions underneath (a note instead when ``indices`` is empty)."""
    if len(indices) == 0:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no images to show ({split.dataset} {split.split})", ha="center", va="center")
        return fig
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


def twin_accuracy_bars(table: pd.DataFrame, title: str = "does the model prefer the right item over its twin?"):
    """Bars of :func:`fastslow.analysis.twin_accuracy` (methods x twin kinds, in %), with chance
    (50%: a model that cannot tell the twins apart picks either) as a dashed line."""
    long = table.reset_index().melt(id_vars="method", var_name="twin kind", value_name="prefers the right one (%)")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(table) + 2.5), 3.6))
    sns.barplot(data=long, x="twin kind", y="prefers the right one (%)", hue="method", ax=ax)
    ax.axhline(50, color="gray", linestyle="--", linewidth=0.8)
    ax.set(ylim=(0, 100), title=title, xlabel="")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def chance_intervals(table: pd.DataFrame, chance: float = 50.0, title: str = "right item above its twin (%), 95% interval"):
    """:func:`fastslow.analysis.twin_chance_table` as one panel per kind of twin: each model's share
    with its 95% interval, against ``chance`` (dashed); a model whose interval crosses the line
    cannot be told from a coin flip."""
    kinds = list(dict.fromkeys(table.index.get_level_values("kind")))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds) + 1.6, 0.4 * table.index.levshape[0] + 1.4),
                             sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = table.xs(kind, level="kind").iloc[::-1]
        y = np.arange(len(rows))
        errors = np.vstack([rows["right (%)"] - rows["low"], rows["high"] - rows["right (%)"]])
        colours = [method_colour(m) for m in rows.index]
        ax.errorbar(rows["right (%)"], y, xerr=errors, fmt="none", ecolor="gray", capsize=3)
        ax.scatter(rows["right (%)"], y, c=colours, zorder=3)
        ax.axvline(chance, color="gray", linestyle="--", linewidth=0.8)
        ax.set(xlim=(0, 100), title=f"{kind} ({int(rows['captions'].max())} captions)", xlabel="%")
        ax.set_yticks(y, list(rows.index))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# An object that moves less than this between two frames gets no arrow: one that short is all head.
MOTION_MIN_PIXELS = 0.5


def clip_strip(split: CaptionedImages, indices: Sequence[int], width: int | None = None):
    """Each clip's frames in a row, left to right in time, under its first caption (and its twin
    kind, when it has a twin). Where the split knows its objects' centres (generated clips), each
    frame shows an arrow from every moving object to where it is in the next frame. Images (one
    frame) work too."""
    frames = split.frames
    clips = split.images if split.images.ndim == 5 else split.images[:, None]
    width = width or max(28, int(15 * frames))  # caption characters per line: about the row's width
    fig = plt.figure(figsize=(max(1.3 * frames, 2.6), 1.8 * len(indices)), layout="constrained")
    # One subfigure per clip, so its caption spans the row without squeezing the first frame.
    for row, index in zip(np.atleast_1d(fig.subfigures(len(indices), 1)), indices):
        axes = np.atleast_1d(row.subplots(1, frames))
        for t, ax in enumerate(axes):
            ax.imshow(clips[index, t], interpolation="nearest")
            if split.centres is not None and t + 1 < frames:
                for here, there in zip(split.centres[index, t], split.centres[index, t + 1]):
                    if np.abs(there - here).max() >= MOTION_MIN_PIXELS:
                        ax.annotate("", xy=tuple(there), xytext=tuple(here),
                                    arrowprops={"arrowstyle": "->", "color": "white", "lw": 1.2})
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"t={t}", fontsize=7)
        twin = f" [{split.twin_kind[index]} of {split.twin[index]}]" if split.twin[index] >= 0 else ""
        title = textwrap.fill(f"{index}: {split.captions_of(index)[0]}{twin}", width)
        row.suptitle(title, x=0.01, ha="left", fontsize=8)
    return fig


def speed_accuracy(points: pd.DataFrame, title: str = "speed and accuracy"):
    """Text-to-image R@1 against per-query latency (log scale); one marker per method and K.

    ``points`` has columns method, K (may be empty), ms_per_query, R@1, and optionally ``group``
    (e.g. the dataset or gallery): then the colour says the method and the marker and line the
    group. With many series the legend goes beside the axes, so it hides no point; with no points
    the figure says so.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if points.empty:
        ax.text(0.5, 0.5, "no timed rows yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="milliseconds per query (log)", ylabel="text-to-image R@1 (%)", title=title)
        return fig
    points = points if "group" in points else points.assign(group="")
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(points["method"]))}
    styles = {g: (marker, line) for g, marker, line in zip(dict.fromkeys(points["group"]), "osD^v<>", ["-", "--", ":", "-."] * 2)}
    for (group_name, method), group in points.groupby(["group", "method"], sort=False):
        group = group.sort_values("ms_per_query")
        marker, line = styles[group_name]
        label = f"{method} · {group_name}" if group_name else method
        ax.plot(group["ms_per_query"], group["R@1"], marker=marker, color=colours[method], label=label, linestyle=line if len(group) > 1 else "")
        for _, row in group.iterrows():
            if pd.notna(row.get("K")):
                ax.annotate(f"K={int(row['K'])}", (row["ms_per_query"], row["R@1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="milliseconds per query (log)", ylabel="text-to-image R@1 (%)", title=title)
    beside = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if len(ax.get_lines()) > 5 else {}
    ax.legend(fontsize=8, **beside)
    fig.tight_layout()
    return fig


def scaling(latency: pd.DataFrame, title: str = "per-query latency against gallery size"):
    """Log-log latency per method against gallery size; dashed where extrapolated.

    ``latency`` has columns method, gallery_size, ms_per_query, measured (bool).
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, group in latency.groupby("method", sort=False):
        group = group.sort_values("gallery_size")
        line = ax.plot(group["gallery_size"], group["ms_per_query"], marker="o", label=method)[0]
        estimated = group[~group["measured"]]
        if len(estimated):
            ax.plot(estimated["gallery_size"], estimated["ms_per_query"], marker="x", linestyle="", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="gallery size (items)", ylabel="milliseconds per query", title=f"{title}\n(x: extrapolated from the measured cost per pair)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def latency_breakdown(breakdown: pd.DataFrame, speed_up: pd.DataFrame, stages: Sequence[str]):
    """Where a query's milliseconds go (stacked bars: Fast and Fast+Slow at each K, then Slow-only
    on its own axis, its bar dwarfs the others) and the speed-up of Fast+Slow over Slow-only by K:
    measured, ideal (the Slow call costing only its pairs) and the N / K limit.

    ``breakdown``: :func:`fastslow.bench.query_latency_breakdown`; ``speed_up``:
    :func:`fastslow.bench.speed_up_by_k`; ``stages``: the stage order to stack."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1, 2.2]})
    table = breakdown.pivot_table(index=["method", "K"], columns="stage", values="ms_per_query", sort=False)
    table = table[[*stages, "other"]]
    colours = dict(zip([*stages, "other"], sns.color_palette("tab10", len(stages) + 1)))
    for ax, methods in ((axes[0], ["fast", "fast_slow"]), (axes[1], ["slow_only"])):
        part = table.loc[[m for m in methods if m in table.index.get_level_values("method")]]
        labels = [{"fast": "Fast", "fast_slow": f"Fast+Slow\nK={k}", "slow_only": f"Slow-only\n{k} items"}[m]
                  for m, k in part.index]
        bottom = np.zeros(len(part))
        for stage in part.columns:
            ax.bar(labels, part[stage], bottom=bottom, color=colours[stage], label=stage)
            bottom += part[stage].to_numpy()
        ax.set_ylabel("milliseconds per query")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].legend(fontsize=8)
    axes[0].set_title("where a query's time goes")
    ax = axes[2]
    ax.plot(speed_up["K"], speed_up["measured"], marker="o", label="measured")
    ax.plot(speed_up["K"], speed_up["ideal"], linestyle="--", label="ideal: Slow pays only its K pairs")
    ax.plot(speed_up["K"], speed_up["limit"], linestyle=":", color="grey", label="limit N / K")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="K (candidates re-ranked)", ylabel="speed-up over Slow-only", title="speed-up by K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def search_results(gallery: CaptionedImages, query: str, results: pd.DataFrame):
    """The top images for one query before (Fast) and after (Fast+Slow) re-ranking."""
    k = len(results)
    fig, axes = plt.subplots(2, k, figsize=(1.8 * k, 4.2), squeeze=False)
    for row, (column, label) in enumerate((("fast_image", "Fast"), ("fast_slow_image", "Fast+Slow"))):
        for j, image in enumerate(results[column]):
            axes[row, j].imshow(gallery.images[image], interpolation="nearest")
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
        axes[row, 0].set_ylabel(label)
    fig.suptitle(f"query: {query!r}")
    fig.tight_layout()
    return fig


def search_widget(searcher, gallery: CaptionedImages, query: str, k: int = 5):
    """A text box that shows the top images before and after re-ranking as you search.

    In batch runs (``FASTSLOW_BATCH`` set: run_all.sh, the tests) no one can type, and a search run
    inside an Output widget once hung papermill (the kernel went idle, the client kept waiting), so
    the box comes back without searching; the notebook shows the static search before it.
    """
    import ipywidgets as widgets
    from IPython.display import display

    box = widgets.Text(value=query, description="query", layout=widgets.Layout(width="70%"))
    if os.environ.get("FASTSLOW_BATCH"):
        return box
    output = widgets.Output()

    def show(change=None) -> None:
        output.clear_output(wait=True)
        with output:
            try:
                results = searcher.search(box.value, k=k)
            except ValueError as error:
                print(error)
                return
            display(search_results(gallery, box.value, results))
            plt.close("all")

    box.on_submit(show)
    show()
    return widgets.VBox([box, output])


def attention_maps(examples: Sequence[dict], max_words: int = 9):
    """Cross-attention over the image, word by word: one row per caption.

    Each example has ``image`` (uint8 ``(H, W, 3)``), ``caption``, ``words`` (the predicted tokens)
    and ``maps`` (``(len(words), h, w)`` attention weights, each summing to 1); each map is drawn
    over the image, stretched to its size, under the word it helped predict.
    """
    columns = 1 + min(max_words, max(len(e["words"]) for e in examples))
    fig, axes = plt.subplots(len(examples), columns, figsize=(1.5 * columns, 1.75 * len(examples)), squeeze=False)
    for row, example in zip(axes, examples):
        image = example["image"]
        height, width = image.shape[:2]
        for ax in row:
            ax.axis("off")
        row[0].imshow(image, interpolation="nearest")
        row[0].set_title(textwrap.fill(example["caption"], 22), fontsize=7, loc="left")
        for ax, word, weights in zip(row[1:], example["words"], example["maps"]):
            ax.imshow(image, interpolation="nearest")
            ax.imshow(np.asarray(weights), cmap="inferno", alpha=0.6, extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            ax.set_title(word, fontsize=8)
    fig.tight_layout()
    return fig


# One colour per method, the same in every figure that uses it: a Fast model and its variants in
# blues and greens, the Slow model in red, Fast+Slow in purple (its distilled variants in its hue).
METHOD_COLOURS: dict[str, str] = {
    "bag_of_words": "#7f7f7f",
    "dual_encoder": "#1f77b4",
    "dual_encoder_transformer": "#17becf",
    "control": "#9ecae1",
    "distilled_tfs": "#2ca02c",
    "distilled_dcd": "#bcbd22",
    "cross_attention": "#d62728",
    "fast_slow": "#9467bd",
    "fast_slow_distilled_tfs": "#e377c2",
    "fast_slow_distilled_dcd": "#8c564b",
}


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure (:data:`METHOD_COLOURS`); a method not listed gets
    a grey, so a new one never borrows another's colour."""
    return METHOD_COLOURS.get(method, "#4d4d4d")


def confused_pair_images(split: CaptionedImages, pairs: pd.DataFrame, n: int = 4, width: int = 52):
    """For each confused query (rows of :func:`fastslow.analysis.confused_pairs`): the query
    caption, the right image and the twin the model ranked above it, each with its score; one
    query per image pair, so ``n`` rows show ``n`` different pairs."""
    pairs = pairs.drop_duplicates(subset=["image", "twin"]).head(n)
    if pairs.empty:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no confused twin pairs in this run", ha="center", va="center")
        return fig
    fig = plt.figure(figsize=(4.8, 2.7 * len(pairs)), layout="constrained")
    for row, pair in zip(np.atleast_1d(fig.subfigures(len(pairs), 1)), pairs.itertuples()):
        axes = row.subplots(1, 2)
        shown = ((pair.image, "right image", pair.own_score, "tab:green"),
                 (pair.twin, "twin, ranked above it", pair.twin_score, "tab:red"))
        for ax, (image, label, score, colour) in zip(axes, shown):
            ax.imshow(split.images[image], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color=colour, linewidth=3)
            ax.set_title(f"{label}\nscore {score:.3f}", fontsize=8, color=colour)
        row.suptitle(textwrap.fill(f"query ({pair.kind}): {pair.caption}", width), fontsize=8, ha="left", x=0.02)
    return fig


def speed_accuracy_panels(points: pd.DataFrame, k_labels: Sequence[int] = (1, 10, 100, 1000)):
    """Text-to-image R@1 against per-query latency (log scale), one panel per dataset.

    ``points``: :func:`fastslow.summary.speed_accuracy_points` (columns method, K, ms_per_query,
    R@1, dataset, gallery). Colour says the method (:func:`method_colour`), line style the gallery
    within a dataset; the Fast+Slow line of each dataset's smallest gallery carries K labels at
    ``k_labels`` only, so they do not overlap.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    datasets = list(dict.fromkeys(points["dataset"])) if "dataset" in points and len(points) else []
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(4.6 * max(1, len(datasets)), 4.2), squeeze=False)
    axes = axes[0]
    if not datasets:
        axes[0].text(0.5, 0.5, "no timed rows yet", ha="center", va="center", transform=axes[0].transAxes)
        return fig
    for ax, dataset in zip(axes, datasets):
        part = points[points["dataset"] == dataset]
        galleries = sorted(part["gallery"].dropna().unique())
        styles = dict(zip(galleries, ["-", "--", ":", "-."] * 2))
        for (gallery, method), group in part.groupby(["gallery", "method"], sort=False):
            labelled = method == "fast_slow" and gallery == galleries[0]
            group = group.sort_values("ms_per_query")
            ax.plot(group["ms_per_query"], group["R@1"], marker="o", markersize=4, color=method_colour(method),
                    linestyle=styles[gallery] if len(group) > 1 else "", label=method)
            if labelled:
                for k, x, y in zip(group["K"], group["ms_per_query"], group["R@1"]):
                    if pd.notna(k) and int(k) in k_labels:
                        ax.annotate(f"K={int(k)}", (x, y), fontsize=6, xytext=(2, -9), textcoords="offset points")
        ax.set_xscale("log")
        decades = np.log10(part["ms_per_query"].max() / part["ms_per_query"].min())
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="milliseconds per query (log)", title=dataset)
        if len(galleries) > 1:
            handles = [plt.Line2D([], [], color="black", linestyle=styles[g]) for g in galleries]
            ax.legend(handles, [f"{int(g)}-item gallery" for g in galleries], fontsize=7, loc="best")
    axes[0].set_ylabel("text-to-image R@1 (%)")
    order = list(METHOD_COLOURS)
    methods = sorted(dict.fromkeys(points["method"]), key=lambda m: order.index(m) if m in order else len(order))
    handles = [plt.Line2D([], [], color=method_colour(m), marker="o", linestyle="-") for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=min(5, len(methods)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
