"""Small helpers shared by the tests: waiting for a condition, a free loopback port, and
reading the audit log the way an engineer would (plain SQL)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import sqlalchemy as sa


def until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audit_rows(url: str) -> list[dict]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.text("SELECT * FROM verdicts"))]
    finally:
        eng.dispose()


def wait_rows(url: str, n: int, timeout: float = 60.0) -> list[dict]:
    end = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < end:
        try:
            rows = audit_rows(url)
        except sa.exc.OperationalError:  # table not created yet
            rows = []
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"{len(rows)} audit rows after {timeout} s, expected {n}")
