"""Shared fixtures: one tiny synthetic MVTec-layout set for the whole session, and the
PostgreSQL and Mosquitto servers (tests/services.py)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from inspectd.models.datasets.synthetic import generate
from tests.services import USED, mosquitto_server, postgres_server

__all__ = ["mosquitto_server", "postgres_server"]  # session fixtures, shared by every test


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which PostgreSQL/Mosquitto the session used: the running ones or throwaways."""
    for line in USED:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """Put back the logging set-up after each test: an in-process CLI call configures a
    filtering level that would otherwise hide a later test's info lines from capture_logs."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


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


@pytest.fixture(scope="session")
def object_artifact(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore artifact fitted on the synthetic object's OK images (128×128)."""
    from inspectd.models import fit
    from inspectd.models.settings import ModelSettings

    s = ModelSettings(kind="patchcore", preprocess={"resize": 128})
    out = tmp_path_factory.mktemp("object_model") / "v1"
    fit(synth_root / "object" / "train" / "good", s).save(out)
    return out


@dataclass
class PostgresDB:
    name: str
    url: str
    admin: Any  # SQLAlchemy engine on the `postgres` database, AUTOCOMMIT


@pytest.fixture(scope="session")
def postgres_db(postgres_server: str) -> Iterator[PostgresDB]:
    """A database of its own on the session's PostgreSQL (the running one or a throwaway,
    tests/services.py), dropped after."""
    import sqlalchemy as sa

    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT",
                             connect_args={"connect_timeout": 3})
    name = f"inspectd_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.fail(f"PostgreSQL not reachable at {admin.url.host}:{admin.url.port}: {e.orig}",
                    pytrace=False)
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield PostgresDB(name, url, admin)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


FAKE_CAMERA = "arv-fake-gv-camera-0.8"


def _gvcp_bound() -> bool:
    """Whether something listens on 127.0.0.1:3956 (GVCP), from /proc/net/udp."""
    return any(line.split()[1] == "0100007F:0F74"
               for line in Path("/proc/net/udp").read_text().splitlines()[1:])


class FakeCamera:
    """The Aravis fake GigE Vision camera on 127.0.0.1 (no discovery, no broadcast)."""

    def __init__(self, serial: str) -> None:
        self.serial, self.proc = serial, None

    def start(self) -> None:
        if _gvcp_bound():
            pytest.fail("127.0.0.1:3956 is taken: another GigE Vision (fake) camera is running")
        self.proc = subprocess.Popen([FAKE_CAMERA, "-i", "127.0.0.1", "-s", self.serial],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while not _gvcp_bound():
            if self.proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"{FAKE_CAMERA} did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def fake_camera() -> Iterator[FakeCamera]:
    """A running fake GigE Vision camera, serial FAKE42, at 127.0.0.1."""
    if shutil.which(FAKE_CAMERA) is None:
        pytest.fail(f"{FAKE_CAMERA} not found: apt-get install aravis-tools gir1.2-aravis-0.8")
    cam = FakeCamera("FAKE42")
    cam.start()
    yield cam
    cam.kill()
