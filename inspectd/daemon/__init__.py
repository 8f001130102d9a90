"""The inspection daemon: supervisor, acquisition (sources/), transport, worker, sink, PLC
outputs, events, metrics and systemd.

It imports the inference side of `inspectd.models` only (detector, artifact, kinds' model
classes), `storage` for the sink's audit log, journal and images, and the registry of
`lifecycle` to follow each SKU's `current` version (pyproject.toml's import contracts).
"""
