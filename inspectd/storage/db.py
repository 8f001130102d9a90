"""Engines for the audit database (SQLite with WAL by default, PostgreSQL by URL) and migrations."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc, inspect, make_url
from sqlalchemy.engine import URL

from inspectd.core.errors import InspectdError

MIGRATIONS = Path(__file__).parent / "migrations"
# Give up quickly and spool instead: the audit writer must not hang on the database, on a
# held lock, a black-holed host or a TCP link that died under an open connection.
SQLITE_BUSY_TIMEOUT_MS = 1000
# Alembic's `context` and `op` are module-global proxies: one migration run at a time.
_ALEMBIC_LOCK = threading.Lock()
PG_CONNECT_ARGS = {"connect_timeout": 3, "tcp_user_timeout": 10_000, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 3}


class StorageError(InspectdError):
    """The audit database cannot be used (bad URL, unreachable, not migrated)."""


def safe_url(url: str | URL) -> str:
    """The URL for messages and logs, without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<unparsable database URL>"


def make_engine(url: str) -> Engine:
    """An engine for `url`; StorageError when the URL or its driver is not usable."""
    try:
        u = make_url(url)
        backend = u.get_backend_name()
        connect_args = PG_CONNECT_ARGS if backend == "postgresql" else {}
        if backend == "sqlite" and u.database and u.database != ":memory:":
            try:
                Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass  # SQLite names the problem when it opens the file
        engine = create_engine(u, pool_pre_ping=True, connect_args=connect_args)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
        raise StorageError(f"bad database URL {safe_url(url)}: {e}") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets `inspectd audit` read while the sink writes; NORMAL is durable in WAL mode
    # except for the last transactions on power loss, which is the usual trade.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def alembic_config(url: str | URL) -> Config:
    """Alembic config for the migrations shipped in this package (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    # configparser interpolates '%', which URL-encoded passwords contain.
    url_str = make_url(url).render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url_str.replace("%", "%%"))
    return cfg


def upgrade(target: str | Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`. Re-running at head is a no-op.

    Raises SQLAlchemy's errors when the database is unreachable (callers decide what an
    outage means); StorageError for a bad URL.
    """
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with _ALEMBIC_LOCK, engine.begin() as conn:
            cfg = alembic_config(engine.url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        if isinstance(target, str):
            engine.dispose()


def first_line(e: BaseException) -> str:
    """The first line of a (DBAPI) error's message, for one-line errors and logs."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def db_errors(url: str | URL) -> Iterator[None]:
    """SQLAlchemy failures as one-line StorageErrors naming the (password-less) URL."""
    try:
        yield
    except exc.SQLAlchemyError as e:
        raise StorageError(f"audit database {safe_url(url)}: {first_line(e)}") from None


@contextmanager
def existing_database(target: str | Engine,
                      tables: tuple[str, ...] = ("verdicts", "labels")) -> Iterator[Engine]:
    """An engine on an existing audit database that has `tables`; never creates one.

    An Engine passed in stays open; one made from a URL is disposed of on exit. Database
    failures inside the block become one-line StorageErrors.
    """
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        u = engine.url
        if u.get_backend_name() == "sqlite" and not Path(u.database or "").expanduser().is_file():
            raise StorageError(f"no audit database at {u.database} "
                               f"(start the sink or run `inspectd db upgrade`)")
        with db_errors(u):
            have = inspect(engine)
            for table in tables:
                if not have.has_table(table):
                    raise StorageError(f"{safe_url(u)} has no {table} table: "
                                       f"run `inspectd db upgrade`")
            yield engine
    finally:
        if isinstance(target, str):
            engine.dispose()
