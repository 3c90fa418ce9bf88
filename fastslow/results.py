"""The results contract: one tidy table per run, per-experiment JSON, and figures.

``results/<run>/summary.csv`` has one row per (notebook, experiment, method, dataset, direction,
K, seed). Recording a row with an existing key replaces it, so rerunning a notebook never
duplicates rows. ``python -m fastslow.results show results/<run>`` prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fastslow.cache import REPO_ROOT, config_hash, to_jsonable

KEY_COLUMNS = ["notebook", "experiment", "method", "dataset", "direction", "K", "seed"]
VALUE_COLUMNS = ["R@1", "R@5", "R@10", "MdR", "ms_per_query"]
SUMMARY_COLUMNS = KEY_COLUMNS + VALUE_COLUMNS


def results_root() -> Path:
    return Path(os.environ.get("FASTSLOW_RESULTS", REPO_ROOT / "results"))


def run_dir(run_name: str) -> Path:
    path = results_root() / run_name
    for sub in ("metrics", "figures"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def metric_rows(
    metrics: dict[str, dict[str, float]],
    *,
    notebook: str,
    experiment: str,
    method: str,
    dataset: str,
    seed: int,
    K: int | None = None,
    ms_per_query: float | None = None,
) -> list[dict[str, Any]]:
    """Turn :func:`fastslow.metrics.retrieval_metrics` output into one summary row per direction."""
    rows = []
    for direction in ("t2i", "i2t"):
        if direction not in metrics:
            continue
        values = metrics[direction]
        rows.append(
            {
                "notebook": notebook,
                "experiment": experiment,
                "method": method,
                "dataset": dataset,
                "direction": direction,
                "K": K,
                "seed": seed,
                **{c: values.get(c) for c in ("R@1", "R@5", "R@10", "MdR")},
                # Latency is measured for the text-to-image search the papers time.
                "ms_per_query": ms_per_query if direction == "t2i" else None,
            }
        )
    return rows


def read_summary(run: Path) -> pd.DataFrame:
    path = Path(run) / "summary.csv"
    if not path.exists():
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.read_csv(path, dtype={"notebook": str, "K": "Int64"}, keep_default_na=True)


def record(run: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Add rows to ``summary.csv``, replacing rows with the same key; returns the new rows."""
    missing = [c for r in rows for c in KEY_COLUMNS if c not in r]
    if missing:
        raise ValueError(f"summary rows lack key columns: {sorted(set(missing))}")
    new = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    new["K"] = new["K"].astype("Int64")
    old = read_summary(run)
    table = pd.concat([old, new], ignore_index=True) if len(old) else new
    table = table.drop_duplicates(subset=KEY_COLUMNS, keep="last")
    table = table.sort_values(["notebook", "experiment", "method", "dataset", "direction", "K", "seed"])
    tmp = Path(run) / "summary.csv.tmp"
    table.to_csv(tmp, index=False, float_format="%.3f")
    os.replace(tmp, Path(run) / "summary.csv")
    return new


def environment_versions() -> dict[str, str]:
    import faiss
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": faiss.__version__,
        "pandas": pd.__version__,
    }


def save_metrics(run: Path, name: str, config: Any, payload: dict[str, Any]) -> Path:
    """Write ``metrics/<name>.json`` with the config, its hash, versions and the payload."""
    document = {
        "name": name,
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "versions": environment_versions(),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **to_jsonable(payload),
    }
    path = Path(run) / "metrics" / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


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
        return table.to_string(index=False, float_format=lambda v: f"{v:.1f}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "show":
        print("usage: python -m fastslow.results show results/<run>", file=sys.stderr)
        return 2
    print(show(Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
