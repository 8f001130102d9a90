"""The example line config, and `inspectd validate-config` as a user runs it."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.core import config_check
from inspectd.core.config import LineSettings
from inspectd.core.config_check import Problem, line_problems
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
    # The example's folders are a plant's (/var/lib/inspectd/...): here they live in tmp_path.
    state, runtime, inbox = tmp_path / "state", tmp_path / "run", tmp_path / "inbox"
    inbox.mkdir()
    proc = _validate(EXAMPLE, "-o", "sink.database.url=postgresql+psycopg://inspectd:s3cret@127.0.0.1/x",
                     "-o", f"cameras.inbox.path={inbox}",
                     STATE_DIRECTORY=str(state), RUNTIME_DIRECTORY=str(runtime))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not even a warning
    assert f"data_dir  {state} (run_dir {runtime})" in proc.stdout
    assert "inbox: folder" in proc.stdout
    assert "inspectd:***@127.0.0.1/x" in proc.stdout and "s3cret" not in proc.stdout


CAMERA = "line: l1\ncameras:\n  cam1:\n    type: folder\n    path: /srv/in\n"


@pytest.mark.parametrize(("config", "message"), [
    (CAMERA + "    sku: widget\n    bogus: 1\n", "unknown key 'cameras.cam1.bogus' (line 7)"),
    ("cameras:\n  cam1:\n    type: usb\n    sku: widget\n",
     "'cameras.cam1.type': Input tag 'usb' found using 'type' does not match"),
    ("cameras:\n  cam1:\n    sku: widget\n",
     "'cameras.cam1.type': Unable to extract tag using discriminator 'type' (line 2)"),
    (CAMERA + "    sku: ../etc\n",
     "'cameras.cam1.sku': invalid sku '../etc': expected [A-Za-z0-9_.-]{1,64} (got '../etc') "
     "(line 6)"),
    (CAMERA, "'cameras.cam1': set sku or sku_pattern (line 3)"),
    ("cameras:\n  cam1:\n    type: folder\n    sku: widget\n",
     "'cameras.cam1.path': Field required (line 2)"),
    ("line: l1\nworker: 2\n", "'worker': Input should be a valid dictionary or instance of "
     "WorkerSettings (got 2) (line 2)"),
    ("line: l1\nworker:\n  count: 1\nsink: {}\nworker:\n  max_batch: 4\n",
     "duplicate key 'worker' at lines 2 and 5 (YAML would silently keep only the last)"),
    (CAMERA + "    sku: widget\n    path: /srv/other\n",
     "duplicate key 'cameras.cam1.path' at lines 5 and 7"),
    ("line: l1\nworker:\n  count: 1\n max_batch: 4\n",
     "not valid YAML at line 4, column 2: expected <block end>, but found '<block mapping "
     "start>' (check the indentation), while parsing a block mapping started at line 1"),
], ids=["unknown-key", "camera-type", "no-camera-type", "sku-name", "no-sku", "missing-path",
        "section-not-a-mapping", "duplicate-section", "duplicate-key", "yaml-syntax"])
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
    assert "'worker.count': Input should be greater than or equal to 1 (got 0) " \
        "(from -o worker.count)" in proc.stderr


def test_validate_config_names_the_environment_variable_of_a_bad_value(tmp_path):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CAMERA + "    sku: widget\nworker:\n  max_batch: 8\n")
    proc = _validate(cfg, INSPECTD_WORKER__MAX_BATCH="0")
    assert proc.returncode == 2
    assert "'worker.max_batch': Input should be greater than or equal to 1 (got '0') " \
        "(from environment INSPECTD_WORKER__MAX_BATCH)" in proc.stderr


def test_the_replaced_worker_queue_says_what_replaced_it(tmp_path):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(CAMERA + "    sku: widget\nworker:\n  queue: 8\n")
    proc = _validate(cfg)
    assert proc.returncode == 2
    assert "'queue' was replaced by cameras.<name>.queue_bytes" in proc.stderr


# --- what the schema cannot see: this host's folders, drivers, endpoints -----------------


def test_validate_config_reports_every_problem_of_the_host_with_its_line(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    model = tmp_path / "patchcore.yaml"
    model.write_text("kind: patchcore\npatchcore:\n  topk: 3\npatchcore:\n  topk: 5\n")
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"""\
line: l1
data_dir: {tmp_path}/missing/state
cameras:
  cam1:
    type: folder
    path: {tmp_path}/no-such-inbox
    sku: widget
    endpoint: tcp://127.0.0.1:5555
  cam2:
    type: folder
    path: {inbox}
    done_dir: {tmp_path}/missing/done
    sku: widget
    endpoint: tcp://127.0.0.1:5555
  cam3:
    type: folder
    path: {inbox}
    sku: widget
    endpoint: udp://127.0.0.1:5556
sink_endpoint: tcp://*:5560
sink:
  database:
    url: mysql+pymysql://inspectd:s3cret@db/audit
refit:
  model: {model}
""")
    # (an ipc socket's folder that does not exist yet is fine: the role makes it)
    proc = _validate(cfg, "-o", f"events.endpoint=ipc://{tmp_path}/x/events.sock")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    expected = [
        f"'data_dir': {tmp_path}/missing/state does not exist, nor does its parent "
        f"{tmp_path}/missing (line 2)",
        f"'cameras.cam1.path': folder {tmp_path}/no-such-inbox does not exist (line 6)",
        f"'cameras.cam2.done_dir': {tmp_path}/missing/done cannot be created: its parent "
        f"{tmp_path}/missing does not exist (line 12)",
        "'cameras.cam2.endpoint': tcp://127.0.0.1:5555 is already bound by "
        "cameras.cam1.endpoint (tcp://127.0.0.1:5555): each endpoint can be bound once (line 14)",
        "'cameras.cam3.endpoint': 'udp://127.0.0.1:5556' is not a ZeroMQ endpoint inspectd can "
        "bind: expected ipc:///path/x.sock or tcp://HOST:PORT (line 19)",
        "'sink_endpoint': tcp://*:5560: the roles connect to this same string, so it needs an "
        "address and a port 1-65535 (127.0.0.1 on one host, this host's address across hosts) "
        "(line 20)",
        "'sink.database.url': mysql+pymysql://inspectd:***@db/audit: driver mysql+pymysql is not "
        "supported; inspectd supports SQLite (sqlite:///FILE) or PostgreSQL with psycopg "
        "(postgresql+psycopg://…) (line 23)",
        f"'refit.model': {model}: duplicate key 'patchcore' at lines 2 and 4 (YAML would "
        "silently keep only the last) (line 25)",
    ]
    assert proc.stderr.splitlines() == [f"error: {cfg}: {e}" for e in expected]
    assert "s3cret" not in proc.stderr


@pytest.mark.parametrize(("override", "message"), [
    ("cameras.cam1.endpoint=inproc://frames", "'cameras.cam1.endpoint': inproc://frames: "
     "inproc:// reaches only the same process, and each role of the line is a process of its "
     "own; use ipc:// (this host) or tcp:// (from -o cameras.cam1.endpoint)"),
    ("sink.database.url=postgres://db/audit", "'sink.database.url': postgres://db/audit: unknown "
     "database driver 'postgres'; inspectd supports SQLite (sqlite:///FILE) or PostgreSQL with "
     "psycopg (postgresql+psycopg://…) (from -o sink.database.url)"),
    ("refit.model=/nonexistent/patchcore.yaml", "'refit.model': model settings file "
     "/nonexistent/patchcore.yaml does not exist (from -o refit.model)"),
    ("events.endpoint=ipc://{tmp}/run/frames-cam1.sock", "'events.endpoint': "
     "ipc://{tmp}/run/frames-cam1.sock is already bound by cameras.cam1.endpoint "
     "(ipc://{tmp}/run/frames-cam1.sock): each endpoint can be bound once "
     "(from -o events.endpoint)"),
    ("run_dir=/" + "r" * 100, "'run_dir': ipc:///" + "r" * 100 + "/frames-cam1.sock: the "
     "socket path is 118 bytes, ZeroMQ takes at most 107 (from -o run_dir)"),
], ids=["inproc", "unknown-driver", "refit-model", "same-ipc", "ipc-too-long"])
def test_validate_config_checks_overridden_keys_and_says_so(tmp_path, override, message):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"line: l1\ndata_dir: {tmp_path}\nrun_dir: {tmp_path}/run\ncameras:\n"
                   f"  cam1:\n    type: folder\n    path: {tmp_path}/in\n    sku: widget\n")
    proc = _validate(cfg, "-o", override.format(tmp=tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert f"error: {cfg}: {message.format(tmp=tmp_path)}\n" in proc.stderr


def test_validate_config_warns_of_suspicious_settings_and_passes(tmp_path):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"line: l1\ndata_dir: {tmp_path}\ncameras:\n  cam1:\n    type: folder\n"
                   f"    path: {tmp_path}/in\n    sku: widget\n    deadline_ms: 4\n"
                   "worker:\n  max_wait_ms: 5\n")
    proc = _validate(cfg, INSPECTD_SINK__DATABASE__URL="sqlite://")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {cfg}: {w}" for w in [
        "'cameras.cam1.deadline_ms': 4 ms is not above worker.max_wait_ms (5 ms): a frame can "
        "spend its whole deadline waiting for its batch to fill (line 8)",
        "'sink.database.url': sqlite://: an in-memory audit log loses every verdict when the "
        "sink stops (from environment INSPECTD_SINK__DATABASE__URL)",
    ]]
    assert proc.stdout.startswith(f"{cfg}: ok\n")


def test_a_network_endpoint_needs_the_line_keys(tmp_path, run_cli):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"line: l1\ndata_dir: {tmp_path}\ncameras:\n  cam1:\n    type: folder\n"
                   f"    path: {tmp_path}/in\n    sku: widget\n"
                   "    endpoint: tcp://0.0.0.0:5555\n")
    proc = _validate(cfg)
    assert proc.returncode == 2
    assert (f"error: {cfg}: 'cameras.cam1.endpoint': tcp://0.0.0.0:5555 is reachable from the "
            "network: the line needs its CURVE keys there (inspectd keys generate -c CONFIG, "
            "copied to every host), or bind 127.0.0.1 (line 8)") in proc.stderr
    run_cli("keys", "generate", "-c", str(cfg))
    proc = _validate(cfg)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def _host(tmp_path: Path, **sections) -> LineSettings:
    (tmp_path / "in").mkdir(exist_ok=True)
    cams = {"cam1": {"type": "folder", "path": str(tmp_path / "in"), "sku": "widget"}}
    return LineSettings(line="l1", data_dir=tmp_path, cameras=cams, **sections)


def test_line_problems_is_empty_for_a_good_host_and_keys_each_problem(tmp_path):
    assert line_problems(_host(tmp_path)) == []
    assert line_problems(_host(tmp_path, sink={"database": {"url": "bad url"}})) == [Problem(
        ("sink", "database", "url"), "not a SQLAlchemy URL; expected SQLite (sqlite:///FILE) or "
        "PostgreSQL with psycopg (postgresql+psycopg://…)")]
    [p] = line_problems(_host(tmp_path, sink={"database": {"url": "sqlite:////nonexistent/x/a.db"}}))
    assert p.key == "sink.database.url" and not p.warning
    assert p.message.endswith("the database's folder: /nonexistent/x does not exist, nor does "
                              "its parent /nonexistent")


def test_line_problems_names_a_database_driver_that_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    s = _host(tmp_path, sink={"database": {"url": "postgresql+psycopg://u:pw@db/audit"}})
    assert line_problems(s) == [Problem(("sink", "database", "url"), (
        "postgresql+psycopg://u:***@db/audit: the driver's Python module 'psycopg' is not "
        "installed (pip install 'psycopg[binary]')"))]


def test_line_problems_names_a_data_dir_that_cannot_be_created(tmp_path, monkeypatch):
    s = _host(tmp_path)
    s.data_dir = tmp_path / "state"
    assert line_problems(s) == []  # missing, but its parent is writable: the daemon makes it
    monkeypatch.setattr(config_check.os, "access", lambda *_: False)  # as a user without rights
    [p] = line_problems(s)
    assert p.loc == ("data_dir",) and p.message == (
        f"{tmp_path}/state does not exist and cannot be created: {tmp_path} is not writable by "
        f"user {getpass.getuser()}")
    (tmp_path / "file").write_text("")
    s.data_dir = tmp_path / "file"
    assert line_problems(s) == [Problem(("data_dir",), f"{tmp_path}/file is not a folder")]


def test_fit_refuses_a_model_config_with_a_repeated_key(tmp_path, run_cli):
    cfg = tmp_path / "patchcore.yaml"
    cfg.write_text("kind: patchcore\npatchcore:\n  topk: 3\n  coreset_ratio: 0.1\n  topk: 5\n")
    proc = run_cli("fit", "--data", str(tmp_path), "--category", "x", "--out",
                   str(tmp_path / "out"), "-c", str(cfg), check=False)
    assert proc.returncode == 1
    assert f"{cfg}: duplicate key 'patchcore.topk' at lines 3 and 5" in proc.stderr
    assert not (tmp_path / "out").exists()
