"""Reference outputs of the notebooks' ``# NBVAL_CHECK_OUTPUT`` cells, kept beside the notebooks.

Source notebooks are committed without outputs (executed copies go to ``results/<run>/notebooks/``),
so nbval, which compares a marked cell's fresh output with the output stored in the notebook, would
have nothing to compare with. The reference outputs live in ``notebooks/checked_outputs.json``
instead: per notebook, the outputs of each marked cell under the SHA-256 of the cell's source. The
repository's ``conftest.py`` hands them to nbval's cells before they run
(:func:`give_nbval_references`), so a drift in a deterministic cell's printed numbers fails the
notebook test. A marked cell whose source changed has no reference; nbval then fails on it and
says how to record the references again, from the executed copies of a run::

    ./run_all.sh --profile smoke && python -m fastslow.checked_outputs results/smoke-shapes/notebooks

Mark only cells whose output is the same under every profile and dataset (toy examples, rules
applied by hand): nbval runs the notebooks with the smoke profile.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastslow.files import atomic_write_text

MARKER = "# NBVAL_CHECK_OUTPUT"
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REFERENCES = NOTEBOOKS / "checked_outputs.json"
RECORD_COMMAND = "python -m fastslow.checked_outputs EXECUTED_NOTEBOOKS_DIR"


def is_checked(source: str) -> bool:
    """Whether a code cell's source carries the marker on a line of its own."""
    return MARKER in source.splitlines()


def cell_key(source: str) -> str:
    """What a reference is filed under: the hash of the cell's source, so an edited cell never
    meets the output of its older self."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def checked_cells(notebook: Path) -> list[dict[str, Any]]:
    """The marked code cells of a notebook file, as its JSON holds them."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    return [c for c in cells if c["cell_type"] == "code" and is_checked("".join(c["source"]))]


def load_references(path: Path = REFERENCES) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{notebook name: {cell key: outputs}}``; empty when nothing was recorded."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _joined(value: Any) -> Any:
    return "".join(value) if isinstance(value, list) else value


def _reference_output(output: dict[str, Any]) -> dict[str, Any]:
    """An output as nbval reads one from a notebook: texts as whole strings (the JSON may split
    them into lines), without its execution count (the run's, not the cell's)."""
    kept = {key: value for key, value in output.items() if key != "execution_count"}
    if "text" in kept:
        kept["text"] = _joined(kept["text"])
    if "data" in kept:
        kept["data"] = {mime: _joined(value) for mime, value in kept["data"].items()}
    return kept


def record(executed: Path, sources: Path = NOTEBOOKS, path: Path = REFERENCES) -> dict[str, int]:
    """Record the outputs of the marked cells of the source notebooks in ``sources`` from their
    executed copies in ``executed`` (same file names), replacing what was recorded; returns the
    number of cells recorded per notebook. A source notebook without an executed copy, or a
    marked cell the copy does not hold unchanged, is an error naming it."""
    references, problems = {}, []
    for source in sorted(Path(sources).glob("[0-9][0-9]_*.ipynb")):
        wanted = {cell_key("".join(c["source"])) for c in checked_cells(source)}
        if not wanted:
            continue
        copy = Path(executed) / source.name
        if not copy.exists():
            problems.append(f"{source.name}: no executed copy in {executed}")
            continue
        found = {cell_key("".join(c["source"])): c["outputs"] for c in checked_cells(copy)}
        missing = wanted - set(found)
        if missing:
            problems.append(f"{copy}: {len(missing)} marked cell(s) differ from the source notebook's")
            continue
        references[source.name] = {key: [_reference_output(o) for o in found[key]] for key in sorted(wanted)}
    if problems:
        raise ValueError("cannot record the checked outputs:\n" + "\n".join(problems))
    atomic_write_text(path, json.dumps(references, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return {name: len(cells) for name, cells in references.items()}


def give_nbval_references(items: Iterable[Any], path: Path = REFERENCES) -> None:
    """Give each collected nbval cell that carries the marker its reference outputs, as if the
    notebook stored them; a marked cell with no reference gets an output that cannot match, which
    says how to record one (so it fails rather than passing unchecked)."""
    references = load_references(path)
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or cell.get("cell_type") != "code" or not is_checked(cell.source):
            continue
        import nbformat  # here: only a notebook test run has nbval's cells, and nbformat with it

        notebook = Path(str(item.fspath)).name
        outputs = references.get(notebook, {}).get(cell_key(cell.source))
        if outputs is None:
            outputs = [{"output_type": "stream", "name": "stdout",
                        "text": f"no reference output recorded for this cell in {path.name}: {RECORD_COMMAND}\n"}]
        cell.outputs = [nbformat.from_dict(_reference_output(output)) for output in outputs]
        cell.execution_count = 1  # nbval compares only the cells of a notebook that ran


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {RECORD_COMMAND}", file=sys.stderr)
        return 2
    try:
        recorded = record(Path(argv[0]))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{REFERENCES}: " + ", ".join(f"{name} {count}" for name, count in recorded.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
