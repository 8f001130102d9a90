"""The example line config, and `inspectd validate-config` as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.core.config import LineSettings
from inspectd.core.settings import load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "inspectd.example.yaml"
INSPECTD = Path(sys.executable).parent / "inspectd"


def _validate(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(INSPECTD), "validate-config", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_example_config_loads_with_one_folder_camera():
    s = load_settings(LineSettings, EXAMPLE)
    assert [c.type for c in s.cameras.values()] == ["folder"]
    assert s.plc.modbus.verdict_register is not None and not s.events.mqtt.enabled


def test_example_config_documents_every_section():
    text = EXAMPLE.read_text()
    missing = [k for k in LineSettings.model_fields
               if not re.search(rf"^(# )?{k}:", text, flags=re.M)]
    assert not missing


def test_example_commented_cameras_are_valid_when_uncommented(tmp_path):
    # "  # usb0:" → "  usb0:", "  #   type: opencv" → "    type: opencv"
    cfg = tmp_path / "all.yaml"
    cfg.write_text(re.sub(r"^  # ", "  ", EXAMPLE.read_text(), flags=re.M))
    s = load_settings(LineSettings, cfg)
    assert sorted(c.type for c in s.cameras.values()) == ["aravis", "folder", "opencv", "pylon"]


def test_validate_config_summarises_the_example_under_systemd_dirs(tmp_path):
    state, runtime = tmp_path / "state", tmp_path / "run"
    proc = _validate(EXAMPLE, "-o", "sink.database.url=postgresql+psycopg://inspectd:s3cret@127.0.0.1/x",
                     STATE_DIRECTORY=str(state), RUNTIME_DIRECTORY=str(runtime))
    assert proc.returncode == 0, proc.stderr
    assert f"data_dir  {state} (run_dir {runtime})" in proc.stdout
    assert "inbox: folder" in proc.stdout
    assert "inspectd:***@127.0.0.1/x" in proc.stdout and "s3cret" not in proc.stdout


CAMERA = "line: l1\ncameras:\n  cam1:\n    type: folder\n    path: /srv/in\n"


@pytest.mark.parametrize(("config", "message"), [
    (CAMERA + "    sku: widget\n    bogus: 1\n", "unknown key 'cameras.cam1.bogus' (line 7)"),
    ("cameras:\n  cam1:\n    type: usb\n    sku: widget\n",
     "'cameras.cam1.type': Input tag 'usb' found using 'type' does not match"),
    (CAMERA + "    sku: ../etc\n", "'cameras.cam1.sku': invalid sku '../etc'"),
    (CAMERA, "cameras.cam1: set sku or sku_pattern"),
    ("cameras:\n  cam1:\n    type: folder\n    sku: widget\n",
     "'cameras.cam1.path': Field required (line 2)"),
], ids=["unknown-key", "camera-type", "sku-name", "no-sku", "missing-path"])
def test_validate_config_names_the_bad_key_and_exits_2(tmp_path, config, message):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(config)
    proc = _validate(cfg)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr
    assert proc.stderr.startswith(f"error: {cfg}: ") and proc.stderr.count("\n") == 1


def test_validate_config_rejects_a_bad_override(tmp_path):
    proc = _validate(EXAMPLE, "-o", "worker.count=0")
    assert proc.returncode == 2
    assert "'worker.count': Input should be greater than or equal to 1 (got 0)" in proc.stderr
