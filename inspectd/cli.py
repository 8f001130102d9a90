"""The `inspectd` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inspectd.core.errors import ArtifactError, InspectdError
from inspectd.core.log import configure as configure_logging
from inspectd.core.settings import load_settings
from inspectd.daemon import cli as daemon_cli
from inspectd.daemon.cli_events import events_cmd
from inspectd.storage.cli import audit_app, db_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Production-line visual inspection with unsupervised anomaly models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and generate MVTec-layout data sets.")
app.add_typer(data_app, name="data")

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("-c", "--config", help="YAML settings file")]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("-o", "--override", help="section.key=value (repeatable)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
SavePicOpt = Annotated[
    Path | None, typer.Option("--save-pic", help="write heat maps, masks and overlays here")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (bf16 where the artifact allows it), fp32 or bf16")
]


@app.callback()
def main_options(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")] = None,
) -> None:
    configure_logging(log_level)
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """A `(stage, done, total)` callback drawing one rich bar per stage."""
    bars = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not enabled)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


@app.command()
def fit(
    data: Annotated[Path, typer.Option(help="MVTec-layout root")],
    category: Annotated[str, typer.Option(help="category, or all / objects / textures")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="artifact directory")] = None,
    model: Annotated[str | None, typer.Option(help="patchcore, padim or orthoad")] = None,
    ng: Annotated[Path | None, typer.Option(help="NG images for an F1-optimal threshold")] = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    sku: Annotated[str | None, typer.Option(
        help="publish into this SKU's registry of the --line config, as current")] = None,
    line: Annotated[Path | None, typer.Option(help="line config (with --sku)")] = None,
) -> None:
    """Fit a model on CATEGORY/train/good and write a calibrated artifact (--out), and/or
    publish it straight into a line's registry as the SKU's current version (--sku, --line)."""
    from inspectd.models.datasets.mvtec import resolve_categories, train_samples
    from inspectd.models.fitting import fit as fit_detector
    from inspectd.models.settings import ModelSettings

    if (sku is None) != (line is None) or (out_dir is None and sku is None):
        raise typer.BadParameter("give --out, or --sku with --line, or both")
    settings = load_settings(ModelSettings, config, override or [], kind=model)
    cats = resolve_categories(data, category)
    if sku and len(cats) > 1:
        raise typer.BadParameter("--sku takes one category", param_hint="--category")
    for cat in cats:
        with progress_bars() as bar:
            det = fit_detector([s.path for s in train_samples(data, cat)], settings,
                               ng=ng or (), progress=bar)
        det.manifest["training"]["data"] = {"root": str(data), "category": cat}
        if out_dir:
            target = det.save(out_dir if len(cats) == 1 else out_dir / cat)
        if sku and line:
            target = _fit_into_registry(det, line, sku)
        size_mb = sum(f.stat().st_size for f in target.iterdir()) / 2**20
        t = det.manifest["training"]
        bank = det.model.params.get("bank_size")
        out.print(
            f"[bold]{cat}[/]: {settings.kind} fitted on {t['fit_images']} images "
            f"(+{t['heldout_images']} held out) in {t['total_seconds']:.1f} s"
            + (f", memory bank {bank} patches" if bank else "")
            + f"; threshold {det.threshold:.4f}; bf16 "
            + ("ok" if det.manifest["precision"]["bf16_ok"] else "off")
            + f" → {target} ({size_mb:.1f} MiB)"
        )


def _fit_into_registry(det: Any, line: Path, sku: str) -> Path:
    """Save beside the SKU's versions, rename in as a new version, make it current."""
    import tempfile

    from inspectd.core.config import LineSettings
    from inspectd.lifecycle.registry import publish, sku_dir

    models_dir = load_settings(LineSettings, line).models_dir
    base = sku_dir(models_dir, sku)
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fit-", dir=base) as tmp:
        version = publish(det.save(Path(tmp) / "artifact"), models_dir, sku, move=True)
    return base / version


def _artifact_for(artifact: Path, category: str, many: bool) -> Path:
    if not many and (artifact / "manifest.json").is_file():
        return artifact
    if (artifact / category / "manifest.json").is_file():
        return artifact / category
    raise ArtifactError(f"{artifact}: no artifact for category {category!r} "
                        f"(expected {artifact / category / 'manifest.json'})")


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="MVTec-layout root")],
    category: Annotated[str, typer.Option(help="category, or all / objects / textures")],
    artifact: Annotated[Path, typer.Option(help="artifact dir (or a dir of per-category ones)")],
    as_json: JsonOpt = False,
    save_pic: SavePicOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Image AUROC, pixel AUROC, PRO (AUPRO ≤ 30% FPR) and F1-max on CATEGORY/test."""
    from inspectd.models.datasets.mvtec import resolve_categories
    from inspectd.models.detector import load_detector
    from inspectd.models.evaluate import KEYS, evaluate, mean_metrics

    cats = resolve_categories(data, category)
    results = []
    for cat in cats:
        det = load_detector(_artifact_for(artifact, cat, len(cats) > 1), device, precision)
        with progress_bars(not as_json) as bar:
            results.append(evaluate(det, data, cat, save_pic, lambda d, t, c=cat: bar(c, d, t)))
    mean = mean_metrics(results)
    if as_json:
        print(json.dumps({"categories": {r["category"]: r for r in results}, "mean": mean}))
        return
    table = Table("category", "images", *KEYS, "FRR@thr", "escape@thr", "ms/img")
    for r in results:
        table.add_row(r["category"], str(r["images"]), *(_fmt(r[k]) for k in KEYS),
                      _fmt(r["false_reject_rate"]), _fmt(r["escape_rate"]),
                      f"{r['ms_per_image']:.1f}")
    if len(results) > 1:
        table.add_row("[bold]mean", "", *(_fmt(mean[k]) for k in KEYS), "", "", "")
    out.print(table)
    if save_pic:
        out.print(f"heat maps, masks and overlays: {save_pic}")


def _picture_names(paths: list[Path]) -> dict[Path, str]:
    """File stems, prefixed with parent folders where stems collide (good/000, scratch/000)."""
    stems = [p.stem for p in paths]
    names = {}
    for p, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            parts = p.resolve().parts
            stem = "_".join((*parts[-3:-1], stem))
        names[p] = stem
    return names


@app.command()
def predict(
    artifact: Annotated[Path, typer.Option(help="artifact directory")],
    images: Annotated[list[Path], typer.Argument(help="image files or directories")],
    as_json: JsonOpt = False,
    save_pic: SavePicOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Score images: score, threshold and verdict (OK/NG) per image."""
    from inspectd.models.datasets.mvtec import expand_image_paths
    from inspectd.models.detector import batched, load_detector

    det = load_detector(artifact, device, precision)
    paths = expand_image_paths(images)
    names = _picture_names(paths)
    rows = []
    for chunk in batched(paths, det.batch_size):
        for path, pred in zip(chunk, det.predict(chunk, keep_image=save_pic is not None),
                              strict=True):
            row = pred.as_dict()
            if save_pic:
                row["files"] = pred.save(save_pic, names[path])
            rows.append(row)
    if as_json:
        print(json.dumps({"artifact": str(artifact), "predictions": rows}))
        return
    table = Table("image", "score", "threshold", "verdict", "defect px")
    for r in rows:
        colour = "red" if r["verdict"] == "NG" else "green"
        table.add_row(r["source"], f"{r['score']:.4f}", f"{r['threshold']:.4f}",
                      f"[{colour}]{r['verdict']}[/]", str(r["defect_pixels"]))
    out.print(table)
    ng = sum(r["verdict"] == "NG" for r in rows)
    out.print(f"{len(rows)} images, {ng} NG" + (f"; pictures in {save_pic}" if save_pic else ""))


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="MVTec-layout root")],
    category: Annotated[str, typer.Option(help="category, or all / objects / textures")] = "all",
    as_json: JsonOpt = False,
) -> None:
    """Counts per split and defect, image sizes, mask problems, unreadable files."""
    from inspectd.models.datasets.mvtec import check_dataset, resolve_categories

    reports = check_dataset(root, resolve_categories(root, category))
    if as_json:
        print(json.dumps({"root": str(root), "categories": [r.as_dict() for r in reports]}))
    else:
        table = Table("category", "train", "test (per defect)", "sizes", "modes", "problems")
        for r in reports:
            test = ", ".join(f"{d} {n}" for d, n in r.counts.get("test", {}).items())
            problems = [f"{len(v)} {name.replace('_', ' ')}" for name, v in (
                ("missing_masks", r.missing_masks), ("mismatched_masks", r.mismatched_masks),
                ("orphan_masks", r.orphan_masks), ("empty_masks", r.empty_masks),
                ("unreadable", r.unreadable), ("empty_dirs", r.empty_dirs)) if v]
            if not r.has_ground_truth:
                problems.append("no ground_truth (image-level only)")
            table.add_row(
                r.category, str(r.counts.get("train", {}).get("good", 0)), test,
                ", ".join(f"{s} ×{n}" for s, n in r.sizes.items()),
                ", ".join(f"{m} ×{n}" for m, n in r.modes.items()),
                ("[green]ok[/]" if r.ok else "[red]") + "; ".join(problems),
            )
        out.print(table)
        for r in reports:
            for line in r.unreadable + r.missing_masks + r.mismatched_masks:
                out.print(f"  {r.category}: {line}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@data_app.command("synth")
def data_synth(
    out_root: Annotated[Path, typer.Argument(help="output root (MVTec layout)")],
    categories: Annotated[str, typer.Option(help="comma-separated generator kinds")] = (
        "texture,object"),
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_defect: int = 18,
    size: int = 256,
    seed: int = 0,
) -> None:
    """Generate a synthetic MVTec-layout data set with exact defect masks."""
    from inspectd.models.datasets.synthetic import generate

    cats = [c.strip() for c in categories.split(",") if c.strip()]
    generate(out_root, cats, n_train=n_train, n_test_good=n_test_good,
             n_test_defect=n_test_defect, size=size, seed=seed)
    out.print(f"synthetic data set ({', '.join(cats)}) → {out_root}")


daemon_cli.register(app)


@app.command("validate-config")
def validate_config(
    config: Annotated[Path, typer.Option("-c", "--config", help="line config to check")],
    override: OverrideOpt = None,
) -> None:
    """Check a line config: a bad key is named (exit 2), a good one summarised (exit 0)."""
    from inspectd.core.config import LineSettings
    from inspectd.core.errors import ConfigError

    try:
        s = load_settings(LineSettings, config, override or [])
        rows = _line_summary(s)
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    # markup off: regexes and URLs hold brackets rich would take for markup.
    out.print(f"{config}: ok", markup=False, highlight=False)
    for key, value in rows:
        out.print(f"  {key:<9} {value}", markup=False, highlight=False, soft_wrap=True)


def _line_summary(s: Any) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    from inspectd.core.errors import ConfigError

    try:
        db = sa.engine.make_url(s.database_url()).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        raise ConfigError(f"'sink.database.url': not a SQLAlchemy URL "
                          f"(got {s.sink.database.url!r})") from None
    rows = [("line", s.line), ("data_dir", f"{s.data_dir} (run_dir {s.run_dir})"),
            ("sink", s.sink_address())]
    where = {"folder": "path", "opencv": "uri", "aravis": "device", "pylon": "serial"}
    for name, cam in s.cameras.items():
        sku = f"sku {cam.sku}" if cam.sku else f"sku_pattern {cam.sku_pattern!r}"
        source = getattr(cam, where[cam.type]) or getattr(cam, "device_class", None) or "first"
        rows.append(("camera", f"{name}: {cam.type} {source}, {sku} → {s.frames_endpoint(name)}"))
    if not s.cameras:
        rows.append(("camera", "none on this host"))
    w = s.worker
    rows.append(("worker", f"{w.count} × device {w.device}, precision {w.precision}, "
                           f"batch ≤ {w.max_batch}, {s.models_dir}"))
    rows.append(("database", db))
    m = s.plc.modbus
    rows.append(("plc", "none" if s.plc.type == "none" else
                 f"modbus {m.host}:{m.port} unit {m.unit}, reject coil {m.reject_coil}, "
                 f"verdict register {m.verdict_register}"))
    mq = s.events.mqtt
    mqtt = f"mqtt {mq.host}:{mq.port} {mq.topic_prefix}/{s.line}/…" if mq.enabled else "mqtt off"
    rows.append(("events", f"{s.events_address()}; {mqtt}"))
    rows.append(("metrics", f"http://{s.metrics.host}:{s.metrics.port}/metrics"
                 if s.metrics.enabled else "off"))
    return rows


app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.command("events")(events_cmd)

models_app = typer.Typer(no_args_is_help=True, help="The line's model registry.")
app.add_typer(models_app, name="models")


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
    from inspectd.core.config import LineSettings
    from inspectd.lifecycle.registry import publish

    s = load_settings(LineSettings, config, override or [])
    v = publish(artifact, s.models_dir, sku, version)
    out.print(f"{sku}: {v} is current ({s.models_dir / sku / v})")


LineOpt = Annotated[Path | None, typer.Option("-c", "--config", help="line config")]
SkuOpt = Annotated[str, typer.Option(help="product type")]
SinceOpt = Annotated[
    str | None, typer.Option(help="frames captured since: 2h, 1d, 2024-05-01T06:00 (UTC)")
]


def _line(config: Path | None, override: list[str] | None) -> Any:
    from inspectd.core.config import LineSettings

    return load_settings(LineSettings, config, override or [])


def _since(since: str | None) -> Any:
    from inspectd.storage.cli import parse_time

    return parse_time(since, "--since") if since else None


@models_app.command("list")
def models_list(sku: SkuOpt, config: LineOpt = None, as_json: JsonOpt = False,
                override: OverrideOpt = None) -> None:
    """The SKU's versions, oldest first: current, kind, threshold, training set, refit gates."""
    from inspectd.lifecycle.registry import list_versions

    versions = list_versions(_line(config, override).models_dir, sku)
    if as_json:
        print(json.dumps({"sku": sku, "versions": [v.as_dict() for v in versions]}))
        return
    table = Table("", "version", "created", "kind", "threshold", "images", "source", "gates")
    for v in versions:
        gates = ("" if v.status is None else
                 "[green]passed[/]" if v.status == "passed" else "[red]rejected[/]")
        table.add_row("*" if v.is_current else "", v.name, v.created, v.kind,
                      f"{v.threshold:.4f}", _fmt(v.training_images), v.source, gates)
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

    models_dir = _line(config, override).models_dir
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
    rows = [("version", f"{version} ({path})"), ("created", _fmt(info["created"])),
            ("model", f"{m['kind']} on {info['backbone']} {', '.join(info['layers'])}"),
            ("image", f"resize {info['image_size']}, crop {info['crop']}"),
            ("threshold", f"image {thr['image']:.4f}, pixel {thr['pixel']:.4f} "
                          f"({thr.get('method', '?')})"),
            ("bf16", "ok" if info["bf16_ok"] else "off"),
            ("training", f"{t.get('images')} images ({t.get('fit_images')} fit, "
                         f"{t.get('heldout_images')} calibration, {t.get('ng_images')} NG)"),
            ("metrics", ", ".join(f"{k} {_fmt(v)}" for k, v in info["metrics"].items()) or "—")]
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

    previous = promote(_line(config, override).models_dir, sku, version, force=force)
    out.print(f"{sku}: {version} is current (was {previous or 'none'})")


@models_app.command("rollback")
def models_rollback(sku: SkuOpt, config: LineOpt = None, override: OverrideOpt = None) -> None:
    """Back to the version that was current before this one (repeat to go further back)."""
    from inspectd.lifecycle.registry import rollback

    was, now = rollback(_line(config, override).models_dir, sku)
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

    d = drift(_line(config, override), sku, _since(since), limit)
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


@app.command("refit")
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
    s = _line(config, override)
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


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="data, models and the line's state go here")] = Path(
        "outputs/demo"),
    n_train: Annotated[int, typer.Option(help="OK images per SKU to fit on")] = 60,
) -> None:
    """A demo line on the embedded defaults: synthetic SKUs, fitted models, `inspectd run`
    with a watched-folder camera, every test frame judged, then the audit summary."""
    from inspectd.demo import run_demo
    from inspectd.models.evaluate import KEYS

    r = run_demo(workdir, n_train, lambda msg: err.print(msg, highlight=False))
    table = Table("SKU", *KEYS, title="offline evaluation of the fitted models")
    for sku, m in r["metrics"].items():
        table.add_row(sku, *(_fmt(m[k]) for k in KEYS))
    out.print(table)
    table = Table("SKU", "frames", "OK", "NG", "ERROR", "TIMEOUT", "defects rejected",
                  "good passed", title=f"the line's audit log ({r['url']})")
    for sku, c in r["summary"].items():
        table.add_row(sku, str(c["frames"]), *(str(c[v]) for v in ("OK", "NG", "ERROR", "TIMEOUT")),
                      f"{c['defect_rejected']}/{c['defects']}", f"{c['good_passed']}/{c['good']}")
    out.print(table)
    out.print(f"NG images, masks and overlays: {r['line'] / 'images' / 'ng'}")
    for path in r["ng_images"][:5]:
        out.print(f"  {path}")
    out.print(f"the line's config: {r['config']}; audit: inspectd audit stats -c {r['config']}")


def main() -> None:
    """Console entry point: expected errors are one line on stderr and exit code 1."""
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        app()
    except InspectdError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
