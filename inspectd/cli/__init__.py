"""The `inspectd` command line: one module per command group, assembled here.

    offline    fit, eval, predict                     data       data check|synth
    line       run, acquire|worker|sink, validate-config, events
    audit      db upgrade, audit query|stats|label    lifecycle  models …, refit
    keys       keys generate|list                     demo       demo

Command modules import the libraries they drive inside the command bodies, so `inspectd`
starts without torch and `refit` can lower its priority before torch starts its threads.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from inspectd.cli import audit, data, demo, keys, lifecycle, line, offline
from inspectd.cli.common import err
from inspectd.core.errors import InspectdError
from inspectd.core.log import configure as configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Production-line visual inspection with unsupervised anomaly models.")


@app.callback()
def main_options(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")] = None,
) -> None:
    configure_logging(log_level)
    if threads:
        import torch

        torch.set_num_threads(threads)


app.add_typer(data.data_app, name="data")
offline.register(app)
line.register(app)
app.add_typer(audit.db_app, name="db")
app.add_typer(audit.audit_app, name="audit")
line.register_events(app)
lifecycle.register(app)
app.add_typer(keys.keys_app, name="keys")
demo.register(app)


def main() -> None:
    """Console entry point: expected errors are one line on stderr and exit code 1."""
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        app()
    except InspectdError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
