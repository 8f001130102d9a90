"""The model lifecycle from a shell: `inspectd models publish|list|show|promote|rollback|drift`
and `inspectd refit`. Commands import torch only inside their bodies, and `refit` lowers its
priority before it does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from inspectd.cli.common import (
    JsonOpt,
    OverrideOpt,
    err,
    fmt,
    line_settings,
    out,
    parse_time,
    progress_bars,
)

models_app = typer.Typer(no_args_is_help=True, help="The line's model registry.")


@models_app.command("publish")
def models_publish(
    artifact: Annotated[Path, typer.Argument(help="a fitted artifact directory")],
    sku: Annotated[str, typer.Option(help="product type the model judges")],
    config: Annotated[Path, typer.Option("-c", "--config", help="line config")],
    version: Annotated[str | None, typer.Option(help="version name (default: v<UTC time>)")] = None,
    override: OverrideOpt = None,
) -> None:
    """Copy an artifact into data_dir/models/<sku>/<version> and make it current; a running
    worker picks it up at its next batch for that SKU."""
    from inspectd.lifecycle.registry import publish

    s = line_settings(config, override)
    v = publish(artifact, s.models_dir, sku, version)
    out.print(f"{sku}: {v} is current ({s.models_dir / sku / v})")


LineOpt = Annotated[Path | None, typer.Option("-c", "--config", help="line config")]
SkuOpt = Annotated[str, typer.Option(help="product type")]
SinceOpt = Annotated[
    str | None, typer.Option(help="frames captured since: 2h, 1d, 2024-05-01T06:00 (UTC)")
]


def _since(since: str | None) -> Any:
    return parse_time(since, "--since") if since else None


@models_app.command("list")
def models_list(sku: SkuOpt, config: LineOpt = None, as_json: JsonOpt = False,
                override: OverrideOpt = None) -> None:
    """The SKU's versions, oldest first: current, kind, threshold, training set, refit gates."""
    from inspectd.lifecycle.registry import list_versions

    versions = list_versions(line_settings(config, override).models_dir, sku)
    if as_json:
        print(json.dumps({"sku": sku, "versions": [v.as_dict() for v in versions]}))
        return
    table = Table("", "version", "created", "kind", "threshold", "images", "source", "gates")
    for v in versions:
        gates = ("" if v.status is None else
                 "[green]passed[/]" if v.status == "passed" else "[red]rejected[/]")
        table.add_row("*" if v.is_current else "", v.name, v.created, v.kind,
                      f"{v.threshold:.4f}", fmt(v.training_images), v.source, gates)
    out.print(table)
    if not versions:
        out.print(f"no versions of {sku}")


@models_app.command("show")
def models_show(
    sku: SkuOpt,
    config: LineOpt = None,
    version: Annotated[str | None, typer.Option(help="version (default: the current one)")] = None,
    as_json: JsonOpt = False,
    override: OverrideOpt = None,
) -> None:
    """A version's manifest in brief: model, thresholds, bf16, training set, metrics, gates."""
    from inspectd.lifecycle.registry import current_version, refit_record, sku_dir
    from inspectd.models.artifact import read_manifest

    models_dir = line_settings(config, override).models_dir
    if version is None:
        version, path = current_version(models_dir, sku)
    else:
        path = sku_dir(models_dir, sku) / version
    m, refit = read_manifest(path), refit_record(path)
    t, g = m.get("training", {}), m.get("geometry", {})
    info = {
        "sku": sku, "version": version, "path": str(path), "created": m.get("created"),
        "kind": m["kind"], "backbone": m["backbone"]["name"], "layers": m["backbone"]["layers"],
        "image_size": g.get("resize"), "crop": g.get("crop"), "threshold": m["threshold"],
        "bf16_ok": m.get("precision", {}).get("bf16_ok"),
        "training": {k: v for k, v in t.items() if k != "fingerprint"},
        "fingerprint": t.get("fingerprint"), "metrics": m.get("metrics") or {},
        "refit": None if refit is None else {k: v for k, v in refit.items() if k != "training"},
    }
    if as_json:
        print(json.dumps(info, default=str))
        return
    thr = m["threshold"]
    rows = [("version", f"{version} ({path})"), ("created", fmt(info["created"])),
            ("model", f"{m['kind']} on {info['backbone']} {', '.join(info['layers'])}"),
            ("image", f"resize {info['image_size']}, crop {info['crop']}"),
            ("threshold", f"image {thr['image']:.4f}, pixel {thr['pixel']:.4f} "
                          f"({thr.get('method', '?')})"),
            ("bf16", "ok" if info["bf16_ok"] else "off"),
            ("training", f"{t.get('images')} images ({t.get('fit_images')} fit, "
                         f"{t.get('heldout_images')} calibration, {t.get('ng_images')} NG)"),
            ("metrics", ", ".join(f"{k} {fmt(v)}" for k, v in info["metrics"].items()) or "—")]
    for key, value in rows:
        out.print(f"{key:>10}  {value}", markup=False, highlight=False, soft_wrap=True)
    if refit:
        out.print(f"{'refit':>10}  {refit.get('status')} {refit.get('time')}, previous "
                  f"{refit.get('previous')}" + (f": {refit['reason']}" if refit.get("reason")
                                                else ""), markup=False, soft_wrap=True)
        out.print(_gate_table(refit.get("gates", [])))


@models_app.command("promote")
def models_promote(
    sku: SkuOpt,
    version: Annotated[str, typer.Option(help="version to make current")],
    config: LineOpt = None,
    force: Annotated[bool, typer.Option(help="promote a version whose refit gates failed")] = False,
    override: OverrideOpt = None,
) -> None:
    """Make VERSION current (an atomic link swap; a running worker switches between batches)."""
    from inspectd.lifecycle.registry import promote

    previous = promote(line_settings(config, override).models_dir, sku, version, force=force)
    out.print(f"{sku}: {version} is current (was {previous or 'none'})")


@models_app.command("rollback")
def models_rollback(sku: SkuOpt, config: LineOpt = None, override: OverrideOpt = None) -> None:
    """Back to the version that was current before this one (repeat to go further back)."""
    from inspectd.lifecycle.registry import rollback

    was, now = rollback(line_settings(config, override).models_dir, sku)
    out.print(f"{sku}: rolled back from {was} to {now}; {now} is current")


@models_app.command("drift")
def models_drift(
    sku: SkuOpt,
    config: LineOpt = None,
    since: SinceOpt = None,
    limit: Annotated[int, typer.Option(help="newest scored frames compared")] = 2000,
    as_json: JsonOpt = False,
    override: OverrideOpt = None,
) -> None:
    """Recent scores of the current version against its calibration scores (both ÷ threshold);
    says "refit recommended" when they moved up past refit.drift_ks."""
    from inspectd.lifecycle.drift import drift

    d = drift(line_settings(config, override), sku, _since(since), limit)
    if as_json:
        print(json.dumps(d.as_dict()))
        return
    table = Table("score ÷ threshold", "frames", "median", "p95",
                  title=f"{sku} {d.version} (threshold {d.threshold:.4f})")
    for name, r in (("calibration (held-out OK)", d.calibration), ("recent", d.recent)):
        if r:
            table.add_row(name, str(r["n"]), f"{r['median']:.3f}", f"{r['p95']:.3f}")
    out.print(table)
    if d.ks is not None:
        out.print(f"KS statistic {d.ks:.3f} (p = {d.ks_pvalue:.2g})")
    colour = "red" if d.recommended else "green" if d.recommended is False else "yellow"
    out.print(f"[{colour}]{d.reason}[/]", highlight=False)


def _gate_table(gates: list[dict[str, Any]]) -> Table:
    table = Table("gate", "result", "limit", "verdict")
    for g in gates:
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "n/a"}[g["passed"]]
        table.add_row(g["name"], g["result"], g["limit"], verdict)
    return table


def refit_cmd(
    sku: Annotated[str, typer.Option(help="product type to refit")],
    config: LineOpt = None,
    since: SinceOpt = None,
    max_images: Annotated[
        int | None, typer.Option(help="newest OK frames used at most (default refit.max_images)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="fit and gate; publish nothing")] = (
        False),
    version: Annotated[
        str | None, typer.Option(help="name of the new version (default: v<UTC time>)")] = None,
    as_json: JsonOpt = False,
    override: OverrideOpt = None,
) -> None:
    """Fit a candidate on the OK frames the line kept, gate it against the current version,
    and promote it when every gate passes (exit 1 with the reason when one fails)."""
    s = line_settings(config, override)
    since_t = _since(since)
    from inspectd.core.resources import limit_resources

    # before torch is imported
    resources = limit_resources(s.refit.threads, s.refit.nice, s.refit.idle)
    from inspectd.lifecycle.refit import refit

    with progress_bars(not as_json) as bar:
        r = refit(s, sku, since=since_t, max_images=max_images, dry_run=dry_run,
                  version=version, progress=bar)
    if as_json:
        print(json.dumps({**r.as_dict(), "resources": resources}))
    else:
        out.print(f"{sku}: candidate fitted on {r.fit_frames} OK frames ({r.heldout_frames} "
                  f"held out for the gates, {r.ng_frames} confirmed NG; settings from "
                  f"{r.settings_source}), threshold {r.threshold:.4f}, {r.seconds:.1f} s "
                  f"(threads {resources['threads']}, nice {resources['nice']}, "
                  f"{resources['policy']} scheduling)",
                  highlight=False)
        out.print(_gate_table(r.as_dict()["gates"]))
        if r.promoted:
            out.print(f"[green]{r.version} is current[/] (was {r.previous or 'none'})")
        elif r.dry_run:
            out.print("dry run: nothing published" + ("" if r.passed else "; gates failed"))
        elif r.passed:
            out.print(f"{r.version} passed its gates and is kept, not current")
        else:
            out.print(f"{r.version} kept as rejected; {r.previous or 'no version'} stays current")
    if not r.passed or r.not_promoted:
        what = "rejected" if not r.passed else "not promoted"
        err.print(f"[red]error:[/] refit of {sku} {what}: {r.reason}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("refit")(refit_cmd)
