"""The results contract: one tidy table per run, per-query ranks, per-experiment JSON, and figures.

``results/<run>/summary.csv`` has one row per measurement, keyed by (notebook, experiment, method,
variant, dataset, gallery, direction, K, seed, run_seed): ``variant`` names an ablation's setting
(e.g. ``upsampling=2``), ``gallery`` the number of gallery items the queries searched, ``seed`` the
study's seed (``-p seed``) and ``run_seed`` a run's own seed inside an experiment that repeats it
over seeds (the distilled students), empty elsewhere. Each row carries
R@1 with its 95% bootstrap interval over queries (``R@1_lo``, ``R@1_hi``), the number of queries,
and the file of its per-query ranks under ``ranks/``, from which the claims compute paired
intervals (:mod:`fastslow.claims`). A notebook that reruns replaces all of its rows of its study
seed (:func:`forget_notebook`), so no row of an older run survives beside a newer one, and a run
with another study seed adds to the table.
``python -m fastslow.results show results/<run>`` prints the table.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from fastslow.config import REPO_ROOT, config_hash, to_jsonable
from fastslow.files import atomic_write, atomic_write_text
from fastslow.intervals import recall_interval

KEY_COLUMNS = ["notebook", "experiment", "method", "variant", "dataset", "gallery", "direction", "K", "seed", "run_seed"]
VALUE_COLUMNS = ["R@1", "R@1_lo", "R@1_hi", "R@5", "R@10", "MdR", "queries", "ms_per_query", "ranks"]
SUMMARY_COLUMNS = KEY_COLUMNS + VALUE_COLUMNS
# What tells the repeats of one measurement apart: the study's seed and a run's own seed.
REPLICATE_COLUMNS = ["seed", "run_seed"]
RANKS_DIR = "ranks"


def results_root() -> Path:
    return Path(os.environ.get("FASTSLOW_RESULTS", REPO_ROOT / "results"))


def run_dir(run_name: str) -> Path:
    path = results_root() / run_name
    for sub in ("metrics", "figures", RANKS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def metric_rows(
    metrics: dict[str, Any],
    *,
    notebook: str,
    experiment: str,
    method: str,
    dataset: str,
    gallery: int,
    seed: int,
    variant: str = "",
    K: int | None = None,
    run_seed: int | None = None,
    ms_per_query: float | None = None,
) -> list[dict[str, Any]]:
    """Turn :func:`fastslow.metrics.retrieval_metrics` output into one summary row per direction,
    with the R@1 interval and the per-query ranks (written to a file by :func:`record`)."""
    rows = []
    for direction in ("t2i", "i2t"):
        if direction not in metrics:
            continue
        values = metrics[direction]
        ranks = np.asarray(metrics["ranks"][direction])
        low, high = recall_interval(ranks, 1)
        rows.append(
            {
                "notebook": notebook,
                "experiment": experiment,
                "method": method,
                "variant": variant,
                "dataset": dataset,
                "gallery": gallery,
                "direction": direction,
                "K": K,
                "seed": seed,
                "run_seed": run_seed,
                **{c: values.get(c) for c in ("R@1", "R@5", "R@10", "MdR")},
                "R@1_lo": low,
                "R@1_hi": high,
                "queries": len(ranks),
                # Latency is measured for the text-to-image search the papers time.
                "ms_per_query": ms_per_query if direction == "t2i" else None,
                "ranks": ranks,
            }
        )
    return rows


def read_summary(run: Path) -> pd.DataFrame:
    path = Path(run) / "summary.csv"
    if not path.exists():
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    table = pd.read_csv(
        path, dtype={"notebook": str, "K": "Int64", "run_seed": "Int64", "variant": str, "ranks": str}, keep_default_na=True
    )
    table = table.reindex(columns=SUMMARY_COLUMNS)  # a table written before a column existed lacks it
    table["variant"] = table["variant"].fillna("")
    return table


def replicate_count(rows: pd.DataFrame) -> int:
    """How many repeats (distinct study seed and run seed) ``rows`` hold."""
    return len(rows[REPLICATE_COLUMNS].drop_duplicates())


def read_ranks(run: Path, name: str) -> np.ndarray:
    """The per-query ranks a summary row names in its ``ranks`` column."""
    return np.load(Path(run) / RANKS_DIR / name)


def _write_ranks(run: Path, row: dict[str, Any]) -> str:
    """Save a row's ranks under a name derived from its key, atomically; returns the name."""
    key = "|".join(str(row.get(c)) for c in KEY_COLUMNS)
    name = f"{row['notebook']}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    ranks = np.asarray(row["ranks"], dtype=np.int32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # np.save on a path would add ".npy" to the temp name
            np.save(handle, ranks)

    atomic_write(Path(run) / RANKS_DIR / name, write)
    return name


def _write_table(run: Path, table: pd.DataFrame) -> None:
    table = table.sort_values(KEY_COLUMNS, na_position="first", kind="stable")
    atomic_write(Path(run) / "summary.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.3f"))


def _summary_lock(run: Path) -> FileLock:
    """Held around every read-modify-write of ``summary.csv``: without it, two notebooks recording
    at once each rewrite the table they read, and the rows of one are lost."""
    return FileLock(Path(run) / "summary.csv.lock")


def record(run: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Add rows to ``summary.csv``, replacing rows with the same key; returns the new rows.

    A row's ``ranks`` (per-query ranks) go to ``ranks/``; the table keeps the file name. A row
    without ``run_seed`` is no repeat of a run (the column stays empty)."""
    rows = [{"run_seed": None, **r} for r in rows]
    missing = [c for r in rows for c in KEY_COLUMNS if c not in r]
    if missing:
        raise ValueError(f"summary rows lack key columns: {sorted(set(missing))}")
    rows = [{**r, "ranks": _write_ranks(run, r)} if isinstance(r.get("ranks"), np.ndarray) else r for r in rows]
    new = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    new["K"] = new["K"].astype("Int64")
    new["run_seed"] = new["run_seed"].astype("Int64")
    new["variant"] = new["variant"].fillna("")
    with _summary_lock(run):
        old = read_summary(run)
        table = pd.concat([old, new], ignore_index=True) if len(old) else new
        table = table.drop_duplicates(subset=KEY_COLUMNS, keep="last")
        _write_table(Path(run), table)
    return new


def forget_notebook(run: Path, notebook: str, seed: int) -> int:
    """Remove every row of ``notebook`` with study seed ``seed`` (and its ranks files) before it
    records anew; returns how many rows went."""
    with _summary_lock(run):
        table = read_summary(run)
        if table.empty:
            return 0
        mine = (table["notebook"].astype(str).str.zfill(2) == notebook) & (table["seed"] == seed)
        for name in table.loc[mine, "ranks"].dropna():
            (Path(run) / RANKS_DIR / name).unlink(missing_ok=True)
        if mine.any():
            _write_table(Path(run), table[~mine])
    return int(mine.sum())


def environment_versions() -> dict[str, str]:
    """Versions of what produced a result, read from the installed packages' metadata (importing
    torch or FAISS just to ask would drag them into the reporting layer)."""
    packages = {"numpy": "numpy", "torch": "torch", "transformers": "transformers", "faiss": "faiss-cpu",
                "pandas": "pandas"}
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name, distribution in packages.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_metrics(run: Path, name: str, config: Any, payload: dict[str, Any]) -> Path:
    """Write ``metrics/<name>.json`` with the config, its hash, versions and the payload."""
    document = {
        "name": name,
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "versions": environment_versions(),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **to_jsonable(_without_ranks(payload)),
    }
    path = Path(run) / "metrics" / f"{name}.json"
    # A whole-file replacement under a unique temp name: two runs writing the same experiment at once
    # leave one complete document (the last), never a mix or an error.
    atomic_write_text(path, json.dumps(document, indent=1, default=_json_default))
    return path


def _without_ranks(value: Any) -> Any:
    """Per-query ranks live in ``ranks/``: a metrics JSON keeps the summaries only."""
    if isinstance(value, dict):
        return {k: _without_ranks(v) for k, v in value.items() if k != "ranks"}
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, pd.DataFrame):
        return value.reset_index().to_dict("records")
    if isinstance(value, pd.Series):
        return {str(k): v for k, v in value.items()}
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_figure(fig, run: Path, name: str) -> Path:
    """Save a figure as ``figures/<name>.png`` (name starts with the notebook number)."""
    path = Path(run) / "figures" / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def show(run: Path) -> str:
    table = read_summary(run)
    if table.empty:
        return f"{run}/summary.csv: no rows yet"
    with pd.option_context("display.max_rows", 500, "display.width", 200):
        return table.drop(columns="ranks").to_string(index=False, float_format=lambda v: f"{v:.1f}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "show":
        print("usage: python -m fastslow.results show results/<run>", file=sys.stderr)
        return 2
    print(show(Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
