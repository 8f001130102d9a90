"""Audit storage: database, schema migrations, audit writer, queries, spool, the sink's
journal and the image store. It imports only `core` of inspectd (no daemon, no torch)."""
