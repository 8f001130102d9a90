"""Alembic migrations of the audit schema, run by `inspectd.storage.db.upgrade`."""
