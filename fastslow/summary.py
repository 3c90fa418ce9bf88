"""Every run's summary table read together: the reporting layer's input, with no torch or FAISS.

:func:`load_summaries` reads ``results/<profile>-<dataset>/summary.csv`` of the chosen profiles into
one table (a ``run`` column says where each row came from; ``ranks`` files are read from there by
:mod:`fastslow.claims`). The rest turns rows into the tables and points the notebooks show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fastslow.results import KEY_COLUMNS, REPLICATE_COLUMNS, SUMMARY_COLUMNS, read_summary, replicate_count, results_root


def run_profile(run_name: str) -> str:
    """The profile of a run folder named ``<profile>-<dataset>`` (profiles have no hyphen)."""
    return run_name.partition("-")[0]

def load_summaries(profiles: Sequence[str] | None = None, root: Path | None = None) -> pd.DataFrame:
    """Every ``<root>/<profile>-<dataset>/summary.csv`` of the given profiles (all when None), as one
    table with a ``run`` column.

    Runs of other profiles are ignored, so a smoke run summarises smoke runs and the quick run quick
    ones. A row whose key appears in two runs (the video notebook may write into the image run and
    its own) is kept once, from the run named after the row's dataset, else the last run by name.
    """
    root = Path(root or results_root())
    frames = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        if profiles is not None and run_profile(run.name) not in profiles:
            continue
        rows = read_summary(run)
        if len(rows):
            frames.append(rows.assign(run=run.name, run_dir=str(run)))
    if not frames:
        return pd.DataFrame(columns=[*SUMMARY_COLUMNS, "run", "run_dir"])
    table = pd.concat(frames, ignore_index=True)
    table["notebook"] = table["notebook"].astype(str).str.zfill(2)
    table["K"] = table["K"].astype("Int64")
    own_run = table["run"] == table["run"].map(run_profile) + "-" + table["dataset"]
    table = table.assign(_own=own_run).sort_values(["_own", "run"], kind="stable")
    table = table.drop_duplicates(subset=KEY_COLUMNS, keep="last").drop(columns="_own")
    return table.sort_values(["dataset", *(c for c in KEY_COLUMNS if c != "dataset")]).reset_index(drop=True)


def runs_overview(summary: pd.DataFrame) -> pd.DataFrame:
    """Which runs were read: rows, datasets and notebooks per run."""
    if summary.empty:
        return pd.DataFrame(columns=["datasets", "notebooks", "rows"]).rename_axis("run")
    grouped = summary.groupby("run")
    return pd.DataFrame(
        {
            "datasets": grouped["dataset"].agg(lambda d: ", ".join(sorted(set(d)))),
            "notebooks": grouped["notebook"].agg(lambda n: ", ".join(sorted(set(n)))),
            "rows": grouped.size(),
        }
    )

def mean_std(table: pd.DataFrame, by: list[str], values: tuple[str, ...] = ("R@1", "R@5", "R@10")) -> pd.DataFrame:
    """``mean ± std`` over seeds of summary rows, as text, with the number of seeds."""
    grouped = table.groupby(by)
    frame = pd.DataFrame(
        {v: grouped[v].mean().round(1).astype(str) + " ± " + grouped[v].std(ddof=1).fillna(0).round(1).astype(str) for v in values}
    )
    frame["seeds"] = grouped[REPLICATE_COLUMNS].apply(replicate_count)
    return frame

def recall_table(rows: pd.DataFrame, picks: dict[str, tuple[str, str]], directions: Sequence[str] = ("t2i", "i2t")) -> pd.DataFrame:
    """R@1/5/10 (mean ± std over seeds), text-to-image ms per query and seeds, one row per label
    of ``picks`` (label -> (experiment, method)) that has rows."""
    parts = [
        rows[(rows["experiment"] == experiment) & (rows["method"] == method) & rows["direction"].isin(directions)].assign(row=label)
        for label, (experiment, method) in picks.items()
    ]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame()
    picked = pd.concat(parts)
    stats = mean_std(picked, by=["row", "direction"])
    table = stats.drop(columns="seeds").unstack("direction")
    table.columns = [f"{direction} {metric}" for metric, direction in table.columns]
    table = table[[f"{d} R@{k}" for d in directions for k in (1, 5, 10) if f"{d} R@{k}" in table.columns]]
    timed = picked[picked["direction"] == "t2i"].groupby("row")["ms_per_query"].mean()
    table["ms/query"] = timed.reindex(table.index).round(2)
    table["seeds"] = stats["seeds"].groupby(level="row").max()
    return table.reindex([label for label in picks if label in table.index]).rename_axis(None)

def speed_accuracy_points(summary: pd.DataFrame) -> pd.DataFrame:
    """Every method and K with a text-to-image R@1 and a latency, for :func:`fastslow.plots.speed_accuracy`.

    Headline and ``k_sweep`` rows, means over seeds. Distilled students were not timed: they are the
    dual encoder's network behind the same index, so they take its latency. A headline point that
    the K sweep of the same gallery already has (the chosen Fast+Slow K, the Slow model) is drawn
    once, from the sweep. ``group`` names the dataset and, where a dataset was searched in several
    galleries, the gallery size (blank when there is one group); ``dataset`` and ``gallery`` say
    the same apart, for :func:`fastslow.plots.speed_accuracy_panels`.
    """
    t2i = summary[(summary["direction"] == "t2i") & summary["experiment"].isin(["headline", "k_sweep"])]
    columns = ["method", "K", "ms_per_query", "R@1", "group", "dataset", "gallery"]
    if t2i.empty:
        return pd.DataFrame(columns=columns)
    by = ["dataset", "gallery", "experiment", "method", "K"]
    points = t2i.groupby(by, dropna=False, as_index=False)[["R@1", "ms_per_query"]].mean()
    headline = (points["experiment"] == "headline") & (points["method"] == "dual_encoder")
    fast_ms = points[headline].set_index(["dataset", "gallery"])["ms_per_query"]
    untimed = points["ms_per_query"].isna() & points["method"].str.startswith("distilled_")
    if untimed.any():
        keys = list(zip(points.loc[untimed, "dataset"], points.loc[untimed, "gallery"]))
        points.loc[untimed, "ms_per_query"] = [fast_ms.get(k, np.nan) for k in keys]
    swept = points[points["experiment"] == "k_sweep"].groupby(["dataset", "gallery"])["method"].agg(set)
    in_sweep = [e == "headline" and m in swept.get((d, g), set())
                for d, g, e, m in zip(points["dataset"], points["gallery"], points["experiment"], points["method"])]
    points = points[~np.array(in_sweep, dtype=bool) & points["ms_per_query"].notna()].copy()
    several = points.groupby("dataset")["gallery"].transform("nunique") > 1
    points["group"] = [f"{d}, {int(g)}-item gallery" if many else d
                       for d, g, many in zip(points["dataset"], points["gallery"], several)]
    if points["group"].nunique() == 1:
        points["group"] = ""
    return points[columns].reset_index(drop=True)
