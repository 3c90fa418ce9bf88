"""The notebooks read as lessons: short code lines everywhere, and in the converted ("teaching")
notebooks the maths on the page, a closing summary, exercises and references, and at least one toy
cell that checks itself with an ``assert`` (the hand computation against the package function).
Source notebooks store no outputs: the reference outputs of the cells nbval compares (one
``# NBVAL_CHECK_OUTPUT`` toy cell per notebook) are kept in notebooks/checked_outputs.json
(:mod:`fastslow.checked_outputs`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastslow.checked_outputs import cell_key, checked_cells, load_references

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL_NOTEBOOKS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
# Notebooks converted to claim -> idea -> experiment -> result -> verdict (issue 18); add each one
# as it is converted.
TEACHING_NOTEBOOKS = ("01_data.ipynb", "02_dual_encoder.ipynb", "03_cross_attention.ipynb",
                      "04_distillation.ipynb", "05_fast_slow_reranking.ipynb", "06_video.ipynb",
                      "07_summary.ipynb")
MAX_LINE = 100
CLOSING_HEADINGS = ("Summary", "Exercises", "References")
ASSERT_LINE = re.compile(r"^\s*assert\s", re.MULTILINE)


def cells(notebook: Path, kind: str) -> list[str]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_the_teaching_notebooks_exist():
    assert {p.name for p in ALL_NOTEBOOKS} >= set(TEACHING_NOTEBOOKS)


@pytest.mark.parametrize("notebook", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_are_at_most_100_characters(notebook):
    long = [(i, line) for i, source in enumerate(cells(notebook, "code"))
            for line in source.splitlines() if len(line) > MAX_LINE]
    assert not long, f"{notebook.name}: code lines over {MAX_LINE} characters (cell, line): {long}"


@pytest.mark.parametrize("name", TEACHING_NOTEBOOKS)
def test_teaching_notebook_has_a_latex_equation(name):
    markdown = "\n".join(cells(NOTEBOOKS / name, "markdown"))
    assert "$$" in markdown or re.search(r"\$[^$\n]+\$", markdown), f"{name}: no LaTeX equation"


@pytest.mark.parametrize("name", TEACHING_NOTEBOOKS)
def test_teaching_notebook_ends_with_summary_exercises_and_references(name):
    headings = [line.lstrip("#").strip() for source in cells(NOTEBOOKS / name, "markdown")
                for line in source.splitlines() if re.match(r"#{1,6} ", line)]
    missing = [h for h in CLOSING_HEADINGS if h not in headings]
    assert not missing, f"{name}: no heading {missing}"
    positions = [headings.index(h) for h in CLOSING_HEADINGS]
    assert positions == sorted(positions), f"{name}: {CLOSING_HEADINGS} out of order"


@pytest.mark.parametrize("notebook", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebooks_store_no_outputs(notebook):
    # Executed copies go to results/<run>/notebooks/; the sources stay clean.
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    stored = [c.get("id") for c in nb["cells"] if c["cell_type"] == "code" and c["outputs"]]
    assert not stored, f"{notebook.name}: outputs stored in cells {stored}"


@pytest.mark.parametrize("name", TEACHING_NOTEBOOKS)
def test_teaching_notebook_has_a_cell_whose_recorded_output_nbval_compares(name):
    marked = checked_cells(NOTEBOOKS / name)
    assert marked, f"{name}: no # NBVAL_CHECK_OUTPUT cell"
    recorded = load_references().get(name, {})
    unrecorded = [i for i, c in enumerate(marked) if cell_key("".join(c["source"])) not in recorded]
    assert not unrecorded, (f"{name}: marked cells {unrecorded} have no recorded output (edited since?): "
                            "python -m fastslow.checked_outputs EXECUTED_NOTEBOOKS_DIR")
    assert all(recorded[cell_key("".join(c["source"]))] for c in marked), f"{name}: an empty reference"


@pytest.mark.parametrize("name", TEACHING_NOTEBOOKS)
def test_teaching_notebook_has_a_toy_cell_that_checks_itself(name):
    """A toy cell compares its hand computation with the package function by an ``assert``; nbval
    runs every cell, so the notebook fails when the package drifts from what the page computes by
    hand, in the cells whose output it does not compare too."""
    checked = [source for source in cells(NOTEBOOKS / name, "code") if ASSERT_LINE.search(source)]
    assert checked, f"{name}: no code cell checks itself with an assert statement"
