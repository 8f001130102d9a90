"""Shared fixtures: one tiny synthetic MVTec-layout set for the whole session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.models.synthetic import generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return generate(root, ("object",), n_train=14, n_test_good=4, n_test_defect=6, size=128,
                    seed=3)


def _run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m inspectd ARGS` as a user would, capturing output."""
    proc = subprocess.run([sys.executable, "-m", "inspectd", *args], capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"inspectd {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*args, check=True)`: the command line as a user runs it."""
    return _run_cli
