"""`inspectd data check|synth`: MVTec-layout data sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from inspectd.cli.common import JsonOpt, out

data_app = typer.Typer(no_args_is_help=True, help="Inspect and generate MVTec-layout data sets.")


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
