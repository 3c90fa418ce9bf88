"""Repo-wide pytest setup.

nbval starts each notebook's kernel with this process's environment, so the
variables set here reach the notebooks: they run with the smoke profile (every
notebook in well under a minute), a non-interactive matplotlib backend, and
FASTSLOW_BATCH (no interactive widgets).
An explicit ``FASTSLOW_PROFILE=...`` in the environment still wins.
"""
import os

os.environ.setdefault("FASTSLOW_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("FASTSLOW_BATCH", "1")


def pytest_collection_modifyitems(items):
    """nbval compares each ``# NBVAL_CHECK_OUTPUT`` cell with the reference output recorded in
    notebooks/checked_outputs.json (the sources store none): fastslow.checked_outputs."""
    from fastslow.checked_outputs import give_nbval_references

    give_nbval_references(items)
