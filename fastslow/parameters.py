"""The notebooks' parameters, and the check of the values a run gives them, made before any work.

``run_all.sh -p KEY VALUE`` hands its parameters to every notebook through papermill, which would
warn about an unknown key and run on, and turn ``-p data_dir 8`` into an int. So ``run_all.sh``
first runs ``python -m fastslow.parameters NOTEBOOK_DIR KEY VALUE ...``: every key must be a
parameter of one of the notebooks (an assignment in its cell tagged ``parameters``), every value
must have the type of that parameter's default (an int; a string; a string or ``None`` where the
default is ``None``), and ``profile``, ``dataset``, ``backbone`` and ``device`` must be among their
choices (:data:`fastslow.config.PARAMETER_CHOICES`; the typing is
:func:`fastslow.config.typed_parameter`, which ``python -m fastslow.stages`` uses too). A bad run
stops with exit status 2 and a message that lists what is valid; a good one gets its values back,
typed, as JSON for papermill's ``-y``.

Nothing here imports torch unless ``device`` asks for a GPU, so the check takes well under a second.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastslow.config import ParameterError, typed_parameter


def notebook_parameters(notebook: Path) -> dict[str, Any]:
    """The defaults of ``notebook``'s parameters: the names assigned in its cell tagged
    ``parameters``. A default read from the environment (``os.environ.get(NAME, "quick")``) counts
    as its fallback, the last argument."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    source = "".join(
        "".join(cell["source"]) for cell in cells if "parameters" in cell.get("metadata", {}).get("tags", [])
    )
    defaults = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.args[-1] if isinstance(node.value, ast.Call) and node.value.args else node.value
            defaults[node.targets[0].id] = ast.literal_eval(value)
    return defaults


def check_parameters(notebooks: Iterable[Path], given: dict[str, str]) -> dict[str, Any]:
    """The ``given`` values (as typed on the command line) converted to their parameters' types,
    or :class:`ParameterError` naming every problem with the valid choices."""
    defaults: dict[str, Any] = {}
    for notebook in notebooks:
        defaults.update(notebook_parameters(notebook))
    typed, problems = {}, []
    for key, text in given.items():
        if key not in defaults:
            problems.append(f"unknown parameter {key!r} (the notebooks' parameters: {', '.join(defaults)})")
            continue
        try:
            typed[key] = typed_parameter(key, text, defaults[key])
        except ParameterError as error:
            problems.append(str(error))
    if problems:
        raise ParameterError("\n".join(problems))
    return typed


def main(argv: list[str]) -> int:
    """``NOTEBOOK_DIR KEY VALUE ...``: print the values as JSON, or say what is wrong (exit 2)."""
    if len(argv) % 2 == 0:
        print("usage: python -m fastslow.parameters NOTEBOOK_DIR [KEY VALUE ...]", file=sys.stderr)
        return 2
    notebooks = sorted(Path(argv[0]).glob("[0-9][0-9]_*.ipynb"))
    given = dict(zip(argv[1::2], argv[2::2]))
    try:
        typed = check_parameters(notebooks, given)
    except ParameterError as error:
        for problem in str(error).splitlines():
            print(f"run_all.sh: error: {problem}", file=sys.stderr)
        return 2
    print(json.dumps(typed, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
