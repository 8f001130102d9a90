"""Accuracy without defect images: each kind, `--model auto`, and cross-fitted thresholds.

    .venv/bin/python benchmarks/accuracy.py [--quick] [--only SET[,SET…]] [--update FILE]

For every set and category: PatchCore, PaDiM and OrthoAD with default settings, each fitted
twice (10 % of the OK images held out for calibration, the default; and thresholds
cross-fitted over every OK image, `calibration.mode: crossfit`), `kind: ensemble`
(PatchCore + PaDiM, held-out calibration), and `kind: auto`
(configs/models/auto.yaml defaults: candidates chosen on OK images with synthetic anomalies
pasted in). Each fit is
evaluated on the category's test images: image AUROC, pixel AUROC where masks exist, and,
at the fitted threshold, the false-reject rate on the good test images and the escape rate
on the defects (each held-out fit also at the thresholds of the other `calibration.rule`
values, and the rules resampled on the cross-fitted runs' OK scores). Fit times are end
to end (decode, backbone, model, calibration; for auto also the choice), one process,
sequential.

Sets (`--only` takes these names):
  synthetic  `inspectd.models.datasets.synthetic` texture and object, 256², defects and exact
             masks of its own generator.
  elpv       the ELPV solar cells (PyPI `elpv-dataset`), mono and poly, real defects, image
             labels only; train/test split as benchmarks/run.py lays it out, capped.
  textures   scikit-image's CC0 brick, grass and gravel: 192² crops, rotated and mirrored at
             random; train from the left 320 columns, test from the right 192. Test defects
             come from generators that model choice never uses: a patch of another texture,
             a worn (blurred) area, a swirl; masks are the pasted region.

Raw results: outputs/accuracy*/results.json. `--update FILE` replaces the section headed
"## Accuracy without defect images" in FILE (adds it before "## How to reproduce" when
missing); without it the section is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
from run import ELPV, ensure_elpv, machine, num, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("patchcore", "padim", "orthoad")
TEXTURES = ("brick", "grass", "gravel")
HEADING = "## Accuracy without defect images"
CROP = 192
OTHER_RULES = ("quantile", "prediction")  # calibration.rule values beside the default


@dataclass(frozen=True)
class Plan:
    synth_train: int
    synth_good: int
    synth_defect: int
    elpv_cap: int
    tex_train: int
    tex_good: int
    tex_defect: int  # per defect type
    out: Path


FULL = Plan(synth_train=100, synth_good=20, synth_defect=30, elpv_cap=200, tex_train=60,
            tex_good=20, tex_defect=10, out=ROOT / "outputs/accuracy")
QUICK = Plan(synth_train=16, synth_good=4, synth_defect=6, elpv_cap=16, tex_train=16,
             tex_good=4, tex_defect=2, out=ROOT / "outputs/accuracy-quick")


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data

def synthetic_set(plan: Plan) -> tuple[Path, list[str]]:
    from inspectd.models.datasets.synthetic import generate

    root = ROOT / "data/accuracy" / f"synthetic-{plan.synth_train}"
    cats = ["texture", "object"]
    if not (root / "object").is_dir():
        generate(root, cats, n_train=plan.synth_train, n_test_good=plan.synth_good,
                 n_test_defect=plan.synth_defect, size=256, seed=1)
    return root, cats


def elpv_set(plan: Plan) -> tuple[Path, list[str]]:
    root = ROOT / "data/accuracy" / f"elpv-{plan.elpv_cap}"
    ensure_elpv(SimpleNamespace(elpv=root, elpv_cap=plan.elpv_cap))
    return root, list(ELPV)


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular region: a rotated ellipse with a rough edge, as a bool mask."""
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    ax = tuple(int(a) for a in rng.integers(size // 14, size // 6, 2))
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, (int(cx), int(cy)), ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 4)
    m = cv2.GaussianBlur(m.astype(np.float32) / 255, (0, 0), 3) + (noise - noise.mean()) * 4
    return m > 0.5


def _defect(kind: str, crop: np.ndarray, other: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import swirl

    size = crop.shape[0]
    if kind == "swirl":
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        r = int(rng.integers(size // 8, size // 5))
        out = swirl(crop, center=(cx, cy), strength=4, radius=r, preserve_range=True)
        yy, xx = np.mgrid[:size, :size]
        return out.astype(np.uint8), (yy - cy) ** 2 + (xx - cx) ** 2 < (0.8 * r) ** 2
    mask = _blob(rng, size)
    if kind == "foreign":
        src = other
    else:  # worn: the texture's detail gone in that area
        src = cv2.GaussianBlur(crop, (0, 0), 3)
    out = np.where(mask, src, crop)
    return out, mask


def textures_set(plan: Plan) -> tuple[Path, list[str]]:
    from skimage import data as skdata

    root = ROOT / "data/accuracy" / f"textures-{plan.tex_train}"
    stamp = root / "layout.json"
    if stamp.is_file():
        return root, list(TEXTURES)
    rng = np.random.default_rng(0)
    images = {n: getattr(skdata, n)() for n in TEXTURES}
    for name, img in images.items():
        others = [images[o] for o in TEXTURES if o != name]

        def crop(x0: int, x1: int, src: np.ndarray = img) -> np.ndarray:
            y, x = rng.integers(0, 512 - CROP + 1), rng.integers(x0, x1 - CROP + 1)
            c = np.rot90(src[y:y + CROP, x:x + CROP], int(rng.integers(4)))
            return np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c)

        def write(path: Path, a: np.ndarray) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), a)

        for i in range(plan.tex_train):
            write(root / name / "train/good" / f"{i:03d}.png", crop(0, 320))
        for i in range(plan.tex_good):
            write(root / name / "test/good" / f"{i:03d}.png", crop(320, 512))
        for kind in ("foreign", "worn", "swirl"):
            for i in range(plan.tex_defect):
                other = others[i % len(others)]
                y, x = rng.integers(0, 512 - CROP + 1, 2)
                img_d, mask = _defect(kind, crop(320, 512), other[y:y + CROP, x:x + CROP], rng)
                write(root / name / "test" / kind / f"{i:03d}.png", img_d)
                write(root / name / "ground_truth" / kind / f"{i:03d}_mask.png",
                      mask.astype(np.uint8) * 255)
    stamp.write_text(json.dumps({"train": plan.tex_train, "good": plan.tex_good,
                                 "defect": plan.tex_defect}))
    return root, list(TEXTURES)


SETS = {"synthetic": synthetic_set, "elpv": elpv_set, "textures": textures_set}


# ------------------------------------------------------------------------------- measuring

def fit_eval(root: Path, category: str, settings: Any) -> dict[str, Any]:
    from inspectd.models.calibration import image_threshold
    from inspectd.models.evaluate import evaluate
    from inspectd.models.fitting import fit

    t0 = time.perf_counter()
    det = fit(root / category / "train" / "good", settings)
    seconds = time.perf_counter() - t0
    r = evaluate(det, root, category)
    out = {k: r[k] for k in ("image_auroc", "pixel_auroc", "false_reject_rate",
                             "escape_rate")}
    out.update(fit_seconds=seconds, calibration=det.manifest["training"]["calibration"],
               images=det.manifest["training"]["images"],
               ok_scores=det.manifest["calibration"]["heldout_ok_scores"])
    if det.manifest["training"]["calibration"] == "holdout" and "auto" not in det.manifest:
        # The same fit's rates under the other threshold rules, from the same held-out scores.
        out["rules"] = {}
        for rule in OTHER_RULES:
            det.threshold = image_threshold(np.array(out["ok_scores"]), settings.calibration,
                                            rule)
            q = evaluate(det, root, category)
            out["rules"][rule] = {k: q[k] for k in ("false_reject_rate", "escape_rate")}
    if "auto" in det.manifest:
        auto = det.manifest["auto"]
        out["chosen"] = auto["chosen"]
        out["candidates"] = auto["candidates"]
    return out


def measure(root: Path, category: str) -> dict[str, Any]:
    from inspectd.models.settings import ModelSettings

    res: dict[str, Any] = {}
    for kind in KINDS:
        for mode in ("holdout", "crossfit"):
            log(f"{category}: {kind} ({mode})")
            s = ModelSettings(kind=kind, calibration={"mode": mode})
            res[f"{kind}/{mode}"] = fit_eval(root, category, s)
    log(f"{category}: ensemble")
    res["ensemble"] = fit_eval(root, category, ModelSettings(kind="ensemble"))
    log(f"{category}: auto")
    res["auto"] = fit_eval(root, category, ModelSettings(kind="auto"))
    return res


# -------------------------------------------------------------------------------- Markdown

def section(res: dict[str, Any]) -> str:
    choice_rows, cal_rows = [], []
    regrets, ratios = [], []
    for set_name, cats in res["sets"].items():
        for cat, r in cats.items():
            a = r["auto"]
            best = max(KINDS, key=lambda k: r[f"{k}/holdout"]["image_auroc"])
            best_auroc = r[f"{best}/holdout"]["image_auroc"]
            regrets.append(best_auroc - a["image_auroc"])
            ratio = a["fit_seconds"] / r["patchcore/holdout"]["fit_seconds"]
            ratios.append(ratio)
            cells = [f"{num(x['image_auroc'])}"
                     + (f" / {num(x['pixel_auroc'])}" if x["pixel_auroc"] is not None else "")
                     for x in [*(r[f"{k}/holdout"] for k in KINDS), r["ensemble"]]]
            cand = "; ".join(f"{c['name']} {num(c.get('choice'), '.3f')}"
                             for c in a["candidates"] if c.get("choice") is not None)
            choice_rows.append([
                f"{set_name}/{cat}", a["images"], *cells,
                f"**{a['chosen']}**: {num(a['image_auroc'])}"
                + (f" / {num(a['pixel_auroc'])}" if a["pixel_auroc"] is not None else ""),
                f"{best_auroc - a['image_auroc']:+.3f}".replace("+", "−", 1)
                if best_auroc > a["image_auroc"] else "0",
                f"{a['fit_seconds']:.1f} ({ratio:.1f}×)", cand,
            ])
            for k in KINDS:
                cf, ho = r[f"{k}/crossfit"], r[f"{k}/holdout"]
                cal_rows.append([
                    f"{set_name}/{cat}", k, len(ho["ok_scores"]),
                    f"{ho['fit_seconds']:.1f} / {cf['fit_seconds']:.1f}",
                    f"{num(ho['image_auroc'])} / {num(cf['image_auroc'])}",
                    *(" / ".join(f"{x[key]:.1%}" for x in (
                        ho, *(ho["rules"][r] for r in OTHER_RULES), cf))
                      for key in ("false_reject_rate", "escape_rate")),
                ])
    m = res["machine"]
    frr_ho = [row for row in res["flat"] if row["mode"] == "holdout"]
    frr_cf = [row for row in res["flat"] if row["mode"] == "crossfit"]
    mean = lambda rows, k: float(np.mean([x[k] for x in rows]))  # noqa: E731
    sizes = [len(x["ok_scores"]) for x in frr_cf]
    return "\n".join([
        HEADING,
        "",
        f"`{m['command']}` ({m['date']}, {m['cpu']}, {m['cores']} cores, torch threads "
        f"{m['threads']}; {res['minutes']:.0f} min). The line engineer's case: OK images of a "
        "product, no defect image. Each kind with default settings (EfficientNet-Lite0, 256²), "
        "and `kind: auto` (the `configs/models/auto.yaml` defaults: each candidate fitted on "
        "80 % of the OK images, judged on the rest untouched and with synthetic anomalies "
        "pasted in — Perlin texture, CutPaste, scratch, stain — by image AUROC + 0.25 × pixel "
        "AUROC, and the calibrated ensemble of the two best with different fits, which wins "
        "only by beating both by 0.01; the winner refitted on all). PaDiM and OrthoAD use "
        "three stages (Lite0 `blocks.1`–`blocks.3`, strides 4, 8 and 16: the finest at "
        "stride 4, as in the PaDiM paper) and differ only in the embedding: a random channel "
        "subset (PaDiM) or a semi-orthogonal W (OrthoAD), 100 dimensions each. Ensemble = "
        "`kind: ensemble` with its defaults, PatchCore + PaDiM, each member's image score and "
        "map normalised by its held-out OK scores and averaged. "
        "Test defects never come from those generators: "
        "the synthetic set's own, real ELPV cell defects, and on the scikit-image textures a "
        "patch of another texture, a worn (blurred) area and a swirl. Sets: synthetic "
        f"texture/object ({res['plan']['synth_train']} train, {res['plan']['synth_good']} good "
        f"+ {res['plan']['synth_defect']} defect test); ELPV mono/poly (at most "
        f"{res['plan']['elpv_cap']} images per split); brick/grass/gravel "
        f"({res['plan']['tex_train']} train, {res['plan']['tex_good']} good + "
        f"{3 * res['plan']['tex_defect']} defect test). Fit s end to end, one process; "
        "auto's ratio is against PatchCore's fit on the same images.",
        "",
        table(["set", "OK images", "PatchCore image / pixel AUROC", "PaDiM", "OrthoAD",
               "Ensemble (PatchCore + PaDiM)", "auto: chosen, image / pixel AUROC",
               "auto vs best kind", "auto fit s", "candidates' validation score"], choice_rows),
        "",
        f"Auto's image AUROC is on average {np.mean(regrets):.3f} below the best single kind "
        f"of each row (worst {max(regrets):.3f}); the best kind is only known with defect "
        f"images. Auto's fit takes {np.median(ratios):.1f}× PatchCore's (median; "
        f"{min(ratios):.1f}–{max(ratios):.1f}×).",
        "",
        "Thresholds: 10 % of the OK images held out (the default; \"held out\" is how many) vs "
        "cross-fitted over all of them (5 folds, `calibration.mode: crossfit`). Image AUROC "
        "shows what the images left out of the model cost; the rates are at the fitted "
        "threshold on the test images (false rejects among the good ones, escapes among the "
        "defects): held out, the same fit under each `calibration.rule` — lognormal (the "
        "default: the larger of the empirical quantile and a log-normal fit's quantile) / "
        "quantile (the empirical quantile alone, the rule before) / prediction (the larger of "
        "the empirical quantile and a log-normal prediction bound), each × 1.05 — and "
        "cross-fitted (default rule). The textures' good test crops come from another part of "
        "the photograph than the training crops, so their false rejects also measure that "
        "shift.",
        "",
        table(["set", "kind", "held out", "fit s", "image AUROC", "false rejects",
               "escapes"], cal_rows),
        "",
        f"Mean over all rows, holdout (lognormal / quantile / prediction) → crossfit: image "
        f"AUROC {mean(frr_ho, 'image_auroc'):.3f} → {mean(frr_cf, 'image_auroc'):.3f}, false "
        f"rejects {rule_means(frr_ho, 'false_reject_rate')} → "
        f"{mean(frr_cf, 'false_reject_rate'):.1%}, escapes {rule_means(frr_ho, 'escape_rate')}"
        f" → {mean(frr_cf, 'escape_rate'):.1%}, fit {mean(frr_ho, 'fit_seconds'):.1f} s → "
        f"{mean(frr_cf, 'fit_seconds'):.1f} s.",
        "",
        "The rules at a few held-out images, on real score distributions: each cross-fitted "
        f"run's out-of-fold OK scores above ({min(sizes)}–{max(sizes)} per run, {len(sizes)} "
        "runs) stand for the OK "
        "population; n of them drawn at random set the threshold (× 1.05), and the rate is "
        "the share of the others at or above it (2000 draws per run and n; mean over the "
        "runs, and the worst run). The target is 1 % (quantile 0.99).",
        "",
        table(["n held out", "lognormal (default)", "quantile", "prediction"],
              small_counts(res["flat"])),
        "",
    ])


def rule_means(rows: list[dict[str, Any]], key: str) -> str:
    """The default rule's mean rate, then the other rules' on the same fits."""
    return " / ".join(f"{np.mean(v):.1%}" for v in (
        [x[key] for x in rows], *([x["rules"][r][key] for x in rows] for r in OTHER_RULES)))


def small_counts(flat: list[dict[str, Any]], ns: tuple[int, ...] = (6, 10, 20),
                 draws: int = 2000) -> list[list[Any]]:
    """Per n: the mean (worst) rate at which new OK images exceed a threshold set on n OK
    scores, per rule, each cross-fitted run's out-of-fold scores standing for the population."""
    from inspectd.models.calibration import image_threshold
    from inspectd.models.settings import CalibrationSettings

    cal = CalibrationSettings()
    pools = [np.array(r["ok_scores"]) for r in flat if r["mode"] == "crossfit"]
    rng = np.random.default_rng(0)
    rows = []
    for n in (n for n in ns if n < min(map(len, pools))):
        rates: dict[str, list[float]] = {r: [] for r in ("lognormal", *OTHER_RULES)}
        for pool in pools:
            per: dict[str, list[float]] = {rule: [] for rule in rates}
            for _ in range(draws):
                idx = rng.permutation(len(pool))
                ok, new = pool[idx[:n]], pool[idx[n:]]
                for rule in rates:
                    t = image_threshold(ok, cal, rule)
                    per[rule].append(float((new >= t).mean()))
            for rule in rates:
                rates[rule].append(float(np.mean(per[rule])))
        rows.append([n, *(f"{np.mean(v):.1%} (worst {max(v):.1%})" for v in rates.values())])
    return rows


def update(path: Path, text: str, heading: str = HEADING) -> None:
    """Replace the section under `heading` in the Markdown file `path` with `text`."""
    old = path.read_text() if path.exists() else ""
    text = text.rstrip("\n") + "\n\n"
    start = old.find(heading)
    if start < 0:  # a new section goes before the reproduction notes, else at the end
        at = old.find("\n## How to reproduce")
        path.write_text(old.rstrip("\n") + "\n\n" + text if at < 0
                        else old[:at + 1] + text + old[at:])
        return
    end = old.find("\n## ", start + len(heading))
    path.write_text(old[:start] + text + ("" if end < 0 else old[end + 1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sets (a smoke check)")
    ap.add_argument("--only", help=f"comma-separated sets: {', '.join(SETS)}")
    ap.add_argument("--update", type=Path, help="Markdown file whose section to replace")
    a = ap.parse_args()
    plan = QUICK if a.quick else FULL
    only = a.only.split(",") if a.only else list(SETS)
    if unknown := [s for s in only if s not in SETS]:
        ap.error(f"unknown sets {unknown}; known: {', '.join(SETS)}")
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    res: dict[str, Any] = {"machine": machine(" ".join(["benchmarks/accuracy.py",
                                                         *sys.argv[1:]])),
                           "plan": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in plan.__dict__.items()},
                           "sets": {}, "flat": []}
    plan.out.mkdir(parents=True, exist_ok=True)
    for name in only:
        root, cats = SETS[name](plan)
        res["sets"][name] = {}
        for cat in cats:
            r = res["sets"][name][cat] = measure(root, cat)
            res["flat"] += [{"set": name, "category": cat, "kind": k.split("/")[0],
                             "mode": k.split("/")[1], **v}
                            for k, v in r.items() if "/" in k]
            (plan.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    res["minutes"] = (time.time() - t0) / 60
    (plan.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    text = section(res)
    if a.update:
        update(a.update, text)
        log(f"updated {a.update}")
    else:
        print(text)


if __name__ == "__main__":
    main()
