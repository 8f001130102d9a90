"""Audit storage: database, schema migrations, audit writer, image store and spool."""
