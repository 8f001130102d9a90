"""The architecture holds: import contracts (pyproject.toml, import-linter), checked on the
code as it is and shown to catch a forbidden import; and what static analysis cannot see
(the kinds registry names fit modules as strings, torch-free start-up) checked by running."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import get_args

import pytest

from inspectd.models.kinds import KINDS
from inspectd.models.settings import ModelKind, ModelSettings

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _contracts(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the `inspectd` package under `root`, with root's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _daemon_forbidden() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"]
                   if c.get("source_modules") == ["inspectd.daemon"]]
    return contract["forbidden_modules"]


def test_import_contracts_hold() -> None:
    proc = _contracts(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("models/detector.py", "import inspectd.storage.audit", "Packages are layered"),
    ("storage/audit.py", "import inspectd.daemon.sink", "Packages are layered"),
    ("core/wire.py", "import inspectd.models", "Packages are layered"),
    ("lifecycle/refit.py", "import inspectd.daemon.roles", "Packages are layered"),
    ("daemon/worker.py", "import inspectd.models.fitting", "inference side of models/ only"),
    ("daemon/sink.py", "import inspectd.models.padim.fit",
     "inference side of models/ only"),
    ("models/patchcore/model.py", "import inspectd.models.padim.model",
     "Each model kind is one folder"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str,
                                                contract: str) -> None:
    shutil.copytree(ROOT / "inspectd", tmp_path / "inspectd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "inspectd" / module).open("a") as f:
        f.write(f"\n{line}  # the forbidden import\n")
    proc = _contracts(tmp_path)
    assert proc.returncode != 0
    broken = [ln for ln in proc.stdout.splitlines() if " BROKEN" in ln]
    assert any(contract in ln for ln in broken), proc.stdout


def test_scoring_a_model_imports_no_fitting_code(object_artifact: Path) -> None:
    """Kinds name their fit modules as strings, which import-linter cannot follow: load and
    score as the worker does, then look at what was imported."""
    code = (
        "import sys, fnmatch, numpy as np\n"
        "import inspectd.daemon.worker\n"
        "from inspectd.models.detector import load_detector\n"
        f"load_detector({str(object_artifact)!r}).predict([np.zeros((64, 64, 3), np.uint8)])\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('inspectd.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "inspectd.models.patchcore.model" in loaded
    for pattern in _daemon_forbidden():
        hits = [m for m in loaded if m == pattern or fnmatch.fnmatch(m, pattern)
                or m.startswith(pattern + ".")]
        assert not hits, f"scoring imported {hits}"


def test_the_command_line_starts_without_torch() -> None:
    """`inspectd refit` lowers its priority and thread count before torch starts its threads;
    every other command starts fast. Both need `import inspectd.cli` to leave torch alone."""
    code = "import sys, inspectd.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_kind_is_registered_with_its_settings_and_fit() -> None:
    assert set(get_args(ModelKind)) == set(KINDS)
    for name, kind in KINDS.items():
        assert hasattr(kind.model, "from_tensors"), name
        assert ModelSettings(kind=name).kind == name
    assert all(callable(__import__(k.fit, fromlist=["fit_model"]).fit_model)
               for k in KINDS.values())
