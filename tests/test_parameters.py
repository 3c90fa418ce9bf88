"""Parameters are checked before a run starts: a bad key, type or choice stops ``run_all.sh`` with
exit status 2 within a second, naming what is valid, and nothing is written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastslow.config import make_config
from fastslow.parameters import ParameterError, check_parameters

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def installed_env(tmp_path_factory) -> Path:
    """A virtualenv that runs this interpreter and whose install stamp is current, so that
    ``run_all.sh`` goes straight past its set-up to the check."""
    env = tmp_path_factory.mktemp("env")
    (env / "bin").mkdir()
    python = env / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    pyproject = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    stamp = hashlib.sha256(f"{pyproject}  pyproject.toml\n{REPO}\n".encode()).hexdigest()
    (env / ".fastslow-install-stamp").write_text(stamp + "\n")
    return env


def files_under(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


BAD_RUNS = {
    "unknown key": (["-p", "sede", "1"], "unknown parameter 'sede'", "seed"),
    "bad type": (["-p", "seed", "abc"], "'seed' is an integer", "abc"),
    "unknown dataset": (["--profile", "smoke", "-p", "dataset", "bogus"], "dataset 'bogus' is unknown", "flickr8k"),
    "unknown backbone": (["-p", "backbone", "huge"], "backbone 'huge' is unknown", "pretrained"),
    "unavailable device": (["-p", "device", "cuda:99"], "device 'cuda:99' is not available", "cpu"),
}


@pytest.mark.parametrize("run", BAD_RUNS)
def test_run_all_rejects_bad_parameters_fast_and_writes_nothing(run, installed_env):
    args, problem, valid = BAD_RUNS[run]
    results = REPO / "results"
    before = files_under(results)
    env = {k: v for k, v in os.environ.items() if k != "CONDA_PREFIX"} | {"VIRTUAL_ENV": str(installed_env)}
    started = time.perf_counter()
    done = subprocess.run([str(REPO / "run_all.sh"), *args], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    assert problem in done.stderr and valid in done.stderr
    assert seconds < 1.0, f"took {seconds:.2f} s"
    assert files_under(results) == before
    assert not (results / "smoke-bogus").exists()


def test_values_reach_the_notebooks_typed():
    typed = check_parameters(NOTEBOOKS, {"seed": "1", "data_dir": "8", "device": "None", "profile": "smoke"})
    assert typed == {"seed": 1, "data_dir": "8", "device": None, "profile": "smoke"}


def test_every_problem_is_named_at_once():
    with pytest.raises(ParameterError) as error:
        check_parameters(NOTEBOOKS, {"seed": "1.5", "colour": "red"})
    assert "'seed' is an integer" in str(error.value) and "unknown parameter 'colour'" in str(error.value)


def test_a_notebook_run_without_run_all_also_refuses_an_unavailable_device():
    with pytest.raises(ValueError, match="not available on this machine; choose one of cpu"):
        make_config("smoke", device="cuda:99")
