"""nbval's reference outputs kept beside clean source notebooks (fastslow.checked_outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from fastslow.checked_outputs import MARKER, give_nbval_references, record

SOURCE = f"{MARKER}\nprint(1 + 1)"
PRINTED = {"output_type": "stream", "name": "stdout", "text": "2\n"}


def notebook(path: Path, sources: list[str], outputs: list[list[dict]] | None = None) -> Path:
    cells = [{"cell_type": "code", "source": source, "metadata": {}, "execution_count": None,
              "outputs": outputs[i] if outputs else []} for i, source in enumerate(sources)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def nbval_cell(source: str, notebook_name: str) -> SimpleNamespace:
    return SimpleNamespace(cell=nbformat.v4.new_code_cell(source), fspath=f"/somewhere/{notebook_name}")


def test_recorded_outputs_reach_the_marked_cells_only(tmp_path):
    notebook(tmp_path / "sources" / "01_toy.ipynb", [SOURCE, "print(3)"])
    run = {**PRINTED, "execution_count": 7}
    notebook(tmp_path / "run" / "01_toy.ipynb", ["x = 1", SOURCE, "print(3)"], [[], [run], [PRINTED]])
    references = tmp_path / "checked.json"
    assert record(tmp_path / "run", tmp_path / "sources", references) == {"01_toy.ipynb": 1}

    marked, unmarked = nbval_cell(SOURCE, "01_toy.ipynb"), nbval_cell("print(3)", "01_toy.ipynb")
    give_nbval_references([marked, unmarked], references)
    assert [dict(o) for o in marked.cell.outputs] == [PRINTED] and marked.cell.execution_count == 1
    assert unmarked.cell.outputs == [] and unmarked.cell.execution_count is None


def test_an_edited_marked_cell_gets_an_output_that_cannot_match(tmp_path):
    notebook(tmp_path / "sources" / "01_toy.ipynb", [SOURCE])
    notebook(tmp_path / "run" / "01_toy.ipynb", [SOURCE], [[PRINTED]])
    references = tmp_path / "checked.json"
    record(tmp_path / "run", tmp_path / "sources", references)
    edited = nbval_cell(SOURCE + "\nprint(2)", "01_toy.ipynb")
    give_nbval_references([edited], references)
    assert "no reference output recorded" in edited.cell.outputs[0]["text"]


def test_recording_needs_an_executed_copy_of_every_marked_cell(tmp_path):
    notebook(tmp_path / "sources" / "01_toy.ipynb", [SOURCE])
    notebook(tmp_path / "run" / "01_toy.ipynb", [SOURCE + "\n# edited after the run"], [[PRINTED]])
    with pytest.raises(ValueError, match="differ from the source notebook"):
        record(tmp_path / "run", tmp_path / "sources", tmp_path / "checked.json")
    (tmp_path / "run" / "01_toy.ipynb").unlink()
    with pytest.raises(ValueError, match="no executed copy"):
        record(tmp_path / "run", tmp_path / "sources", tmp_path / "checked.json")
