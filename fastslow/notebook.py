"""What every notebook's setup cell does: config, seeds, versions, and where results go."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastslow import results
from fastslow.config import StudyConfig, make_config


@dataclass
class Session:
    """A notebook's run: its number (``"02"``), config and ``results/<run>/`` directory."""

    notebook: str
    config: StudyConfig
    run: Path

    def record(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """Add rows to the run's summary table; returns them as a table to show."""
        return results.record(self.run, [{"notebook": self.notebook, **row} for row in rows])

    def record_metrics(self, metrics_by_direction, **keys) -> pd.DataFrame:
        """Summary rows (both directions) for one method's :func:`fastslow.metrics.retrieval_metrics`:
        its recalls with the R@1 interval, the gallery it searched and its per-query ranks, under
        the study's seed (``keys`` may add a ``run_seed``: a run's own seed in a repeated experiment)."""
        rows = results.metric_rows(
            metrics_by_direction, notebook=self.notebook, dataset=self.config.data.dataset,
            seed=self.config.seed, gallery=metrics_by_direction["gallery"], **keys,
        )
        return results.record(self.run, rows)

    def table(self) -> pd.DataFrame:
        """The rows this notebook has recorded in the run's summary table."""
        summary = results.read_summary(self.run)
        return summary[summary["notebook"] == self.notebook].reset_index(drop=True)

    def save_figure(self, fig, name: str) -> Path:
        return results.save_figure(fig, self.run, f"{self.notebook}_{name}")

    def save_metrics(self, name: str, payload: dict[str, Any], config: Any = None) -> Path:
        return results.save_metrics(self.run, f"{self.notebook}_{name}", config or self.config, payload)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(notebook: str, **parameters) -> Session:
    """Build the config from the notebook's parameters, seed everything, print versions."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    config = make_config(**parameters)
    set_seed(config.seed)
    session = Session(notebook, config, results.run_dir(config.run_name))
    # A rerun replaces the notebook's rows of its seed: none of an older run survives beside the
    # new ones, and another study seed's rows stay.
    forgotten = results.forget_notebook(session.run, notebook, config.seed)
    versions = results.environment_versions()
    print(f"profile {config.profile}, dataset {config.data.dataset}, seed {config.seed}, device {config.device}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform"))
    print(f"results go to {session.run}" + (f" (replacing this notebook's {forgotten} earlier rows)" if forgotten else ""))
    return session
