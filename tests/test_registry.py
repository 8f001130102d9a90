"""Model registry: immutable versions and an atomically swapped `current`."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspectd.core.errors import ArtifactError
from inspectd.lifecycle.registry import current_version, publish, set_current


def test_publish_makes_a_new_current_version(object_artifact: Path, tmp_path: Path):
    models = tmp_path / "models"
    assert publish(object_artifact, models, "GM06_08", "v1") == "v1"
    assert current_version(models, "GM06_08") == ("v1", models / "GM06_08" / "v1")
    publish(object_artifact, models, "GM06_08", "v2")
    assert current_version(models, "GM06_08")[0] == "v2"
    set_current(models, "GM06_08", "v1")
    assert current_version(models, "GM06_08")[0] == "v1"
    assert (models / "GM06_08" / "current").is_symlink()


def test_versions_are_immutable_and_names_checked(object_artifact: Path, tmp_path: Path):
    models = tmp_path / "models"
    publish(object_artifact, models, "A", "v1")
    with pytest.raises(ArtifactError, match="immutable"):
        publish(object_artifact, models, "A", "v1")
    with pytest.raises(ArtifactError, match="invalid SKU"):
        publish(object_artifact, models, "../A")
    with pytest.raises(ArtifactError, match="no model for SKU 'B'"):
        current_version(models, "B")
    with pytest.raises(ArtifactError):
        set_current(models, "A", "v9")


def test_models_publish_command_installs_into_the_line(object_artifact, tmp_path, run_cli):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    proc = run_cli("models", "publish", str(object_artifact), "--sku", "GM06_08", "-c", str(cfg),
                   "--version", "v7")
    assert "v7 is current" in proc.stdout
    assert current_version(tmp_path / "data" / "models", "GM06_08")[0] == "v7"
    bad = run_cli("models", "publish", str(object_artifact), "--sku", "../x", "-c", str(cfg),
                  check=False)
    assert bad.returncode == 1 and "invalid SKU" in bad.stderr
