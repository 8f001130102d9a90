"""The inspection daemon: acquisition, transport, worker, sink, PLC and systemd roles.

It imports only the inference side of `inspectd.models` (detector, artifact).
"""
