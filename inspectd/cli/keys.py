"""`inspectd keys generate|list`: the line's CURVE key pair, for tcp endpoints."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated

import typer

from inspectd.cli.common import OverrideOpt, line_settings, out

keys_app = typer.Typer(no_args_is_help=True,
                       help="The line's CURVE keys: every tcp endpoint is encrypted and "
                       "admits only holders of the line's key.")
LineOpt = Annotated[Path | None, typer.Option("-c", "--config", help="line config")]


@keys_app.command("generate")
def generate_cmd(
    config: LineOpt = None,
    override: OverrideOpt = None,
    force: Annotated[bool, typer.Option(help="replace an existing key pair")] = False,
) -> None:
    """Create the line's key pair in security.keys_dir (default data_dir/keys); copy the
    directory to every host of the line."""
    from inspectd.daemon.security import generate

    keys = generate(line_settings(config, override).keys_dir, force=force)
    out.print(f"line keys in {keys.directory} (public key {keys.fingerprint}…); copy the "
              "directory to every host of the line, keep line.key_secret private",
              highlight=False)


@keys_app.command("list")
def list_cmd(config: LineOpt = None, override: OverrideOpt = None) -> None:
    """The line's key files, their public key and permissions (exit 1 when there are none)."""
    from inspectd.daemon.security import PUBLIC, SECRET, load

    directory = line_settings(config, override).keys_dir
    keys = load(directory)  # names the file when missing or unsafe
    for name in (PUBLIC, SECRET):
        path = directory / name
        mode = stat.filemode(path.stat().st_mode)
        out.print(f"{mode}  {path}", highlight=False)
    out.print(f"public key {keys.public.decode()}", highlight=False)
