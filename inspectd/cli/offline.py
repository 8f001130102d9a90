"""Offline model commands: `inspectd fit`, `eval` and `predict` on MVTec-layout data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from inspectd.cli.common import JsonOpt, OverrideOpt, fmt, line_settings, out, progress_bars
from inspectd.core.errors import ArtifactError
from inspectd.core.settings import load_settings

ConfigOpt = Annotated[Path | None, typer.Option("-c", "--config", help="YAML settings file")]
SavePicOpt = Annotated[
    Path | None, typer.Option("--save-pic", help="write heat maps, masks and overlays here")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (bf16 where the artifact allows it), fp32 or bf16")
]


def fit(
    data: Annotated[Path, typer.Option(help="MVTec-layout root")],
    category: Annotated[str, typer.Option(help="category, or all / objects / textures")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="artifact directory")] = None,
    model: Annotated[str | None, typer.Option(
        help="patchcore, padim, orthoad, or auto (chosen on the OK images)")] = None,
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
        if "auto" in det.manifest:
            out.print(auto_table(det.manifest["auto"]))
        out.print(
            f"[bold]{cat}[/]: {settings.kind} fitted on {t['fit_images']} images "
            f"(+{t['heldout_images']} held out) in {t['total_seconds']:.1f} s"
            + (f", memory bank {bank} patches" if bank else "")
            + f"; threshold {det.threshold:.4f}; bf16 "
            + ("ok" if det.manifest["precision"]["bf16_ok"] else "off")
            + f" → {target} ({size_mb:.1f} MiB)"
        )


def auto_table(report: dict[str, Any]) -> Table:
    """Every candidate of `--model auto`, the chosen one marked."""
    ng = bool(report.get("ng_images"))
    table = Table("", "candidate", "kind", "image AUROC", "pixel AUROC",
                  *(["NG AUROC"] if ng else []), "choice", "fit s", "note",
                  title=f"model choice ({report['rule']}; {report['seconds']:.0f} s)")
    for c in report["candidates"]:
        shared = c["shared_fit"]
        note = c["skipped"] or (("fits of " if c["kind"] == "ensemble" else "fit shared with ")
                                + shared if shared else "")
        table.add_row("*" if c["name"] == report["chosen"] else "", c["name"], c["kind"],
                      fmt(c["image_auroc"]), fmt(c["pixel_auroc"]),
                      *([fmt(c.get("ng_auroc"))] if ng else []), fmt(c["choice"]),
                      fmt(c["fit_seconds"]), note)
    return table


def _fit_into_registry(det: Any, line: Path, sku: str) -> Path:
    """Save beside the SKU's versions, rename in as a new version, make it current."""
    import tempfile

    from inspectd.lifecycle.registry import publish, sku_dir

    models_dir = line_settings(line, None).models_dir
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
        table.add_row(r["category"], str(r["images"]), *(fmt(r[k]) for k in KEYS),
                      fmt(r["false_reject_rate"]), fmt(r["escape_rate"]),
                      f"{r['ms_per_image']:.1f}")
    if len(results) > 1:
        table.add_row("[bold]mean", "", *(fmt(mean[k]) for k in KEYS), "", "", "")
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


def register(app: typer.Typer) -> None:
    app.command()(fit)
    app.command("eval")(eval_cmd)
    app.command()(predict)
