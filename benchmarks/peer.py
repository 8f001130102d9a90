"""The peer library on the accuracy sets: anomalib's PatchCore and PaDiM with our backbone.

    make peer-venv    # once: a copy of .venv with anomalib (not a dependency of inspectd)
    .venv-peer/bin/python benchmarks/peer.py [--only SET[,SET…]] [--update FILE]

Run after `benchmarks/accuracy.py` on the same machine: this script fits and scores only the
peer, and reads inspectd's figures from that run's outputs/accuracy/results.json (same sets,
same images). Both use the same EfficientNet-Lite0 weights (the embedded default, loaded
into anomalib's timm extractor, which is the same timm model), 256² inputs normalised as
inspectd normalises them, and anomalib's torch models directly (no Lightning engine):
  PatchCore  `PatchcoreModel`, layers blocks.2 + blocks.4 (strides 8 and 16, as its default
             layer2 + layer3 of a ResNet), 9 neighbours, 10 % coreset (its default) except
             on ELPV: 1 % (its greedy coreset takes ~25 min per ELPV category at 10 % here).
  PaDiM      `PadimModel`, layers blocks.1 + blocks.2 + blocks.4 (strides 4, 8, 16, as its
             default layer1–3), a random subset of 100 channels. anomalib draws the subset
             without a seed of its own: three seeds, mean and min–max.
Both fit on every OK training image (anomalib sets no threshold here; image AUROC needs
none). Image AUROC on every test image, pixel AUROC where masks exist (the masks resized to
256² nearest-neighbour). Fit s: feature extraction + coreset or Gaussians.

`--update FILE` replaces the section headed "## Against the peer library" in FILE (adds it
before "## How to reproduce" when missing); without it the section is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from accuracy import FULL, SETS, update
from run import machine, num, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADING = "## Against the peer library (anomalib)"
SIZE = 256
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PADIM_SEEDS = (0, 1, 2)
BATCH = 16
CORESET = {"elpv": 0.01}  # set → the peer's coreset ratio where not its default 0.1


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def backbone_state() -> tuple[dict[str, Any], tuple[float, ...], tuple[float, ...]]:
    """Our Lite0 weights (timm tf_efficientnet_lite0 names) and normalisation."""
    from inspectd.models.features import backbone_spec, load_backbone, resolve_weights

    spec = backbone_spec("efficientnet_lite0")
    model = load_backbone("efficientnet_lite0", resolve_weights("efficientnet_lite0", None))
    return model.state_dict(), tuple(spec.mean), tuple(spec.std)


def load_weights(extractor: Any, state: dict[str, Any]) -> None:
    """Our weights into anomalib's timm extractor: every tensor it has must come from them
    (the classifier head it lacks is left out)."""
    net = extractor.feature_extractor
    own = net.state_dict()
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise SystemExit(f"anomalib's extractor has tensors our weights lack: {missing[:5]}")
    net.load_state_dict({k: state[k] for k in own})


def tensor(paths: list[Path], mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    import torch

    out = []
    for p in paths:
        img = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        out.append((img.astype(np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def run_model(model: Any, train: list[Path], test: list[Any], norm: tuple,
              fit: Any) -> dict[str, Any]:
    import torch

    from inspectd.core.imaging import read_mask
    from inspectd.models import metrics

    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for i in range(0, len(train), BATCH):
            model(tensor(train[i:i + BATCH], *norm))
    fit(model)
    seconds = time.perf_counter() - t0
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(test), BATCH):
            out = model(tensor([s.path for s in test[i:i + BATCH]], *norm))
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map.reshape(-1, SIZE, SIZE).numpy())
    scores_a, maps_a = np.concatenate(scores), np.concatenate(maps)
    labels = np.array([s.label for s in test])
    r: dict[str, Any] = {"image_auroc": metrics.auroc(labels, scores_a),
                         "pixel_auroc": None, "fit_seconds": seconds}
    has = [i for i, s in enumerate(test) if s.label == 0 or s.mask_path is not None]
    if any(test[i].mask_path is not None for i in has):
        masks = np.zeros((len(has), SIZE, SIZE), bool)
        for j, i in enumerate(has):
            if test[i].mask_path is not None:
                masks[j] = cv2.resize(read_mask(test[i].mask_path).astype(np.uint8),
                                      (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0
        r["pixel_auroc"] = metrics.pixel_auroc(masks, maps_a[has])
    return r


def measure(root: Path, category: str, state: dict[str, Any], norm: tuple,
            coreset: float) -> dict[str, Any]:
    import torch
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from inspectd.models.datasets.mvtec import expand_image_paths, test_samples

    train = expand_image_paths([root / category / "train" / "good"])
    test = test_samples(root, category)
    torch.manual_seed(0)
    pc = PatchcoreModel(PATCHCORE_LAYERS, "tf_efficientnet_lite0", pre_trained=False)
    load_weights(pc.feature_extractor, state)
    res = {"patchcore": {**run_model(pc, train, test, norm,
                                     lambda m: m.subsample_embedding(sampling_ratio=coreset)),
                         "coreset": coreset}}
    log(f"{category}: peer patchcore {res['patchcore']['image_auroc']:.3f}")
    runs = []
    for seed in PADIM_SEEDS:
        torch.manual_seed(seed)  # anomalib's channel subset: torch.randperm, unseeded
        pd = PadimModel("tf_efficientnet_lite0", PADIM_LAYERS, pre_trained=False,
                        n_features=100)
        load_weights(pd.feature_extractor, state)
        runs.append(run_model(pd, train, test, norm, lambda m: m.fit()))
    res["padim"] = {"runs": runs, **{k: float(np.mean([r[k] for r in runs]))
                                     if runs[0][k] is not None else None
                                     for k in ("image_auroc", "pixel_auroc", "fit_seconds")}}
    log(f"{category}: peer padim {res['padim']['image_auroc']:.3f}")
    return res


def section(res: dict[str, Any], ours: dict[str, Any]) -> str:
    m = res["machine"]
    rows, gaps, auto_all, peer_all = [], [], [], []

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        return num(r["image_auroc"]) + (f" / {num(r['pixel_auroc'])}"
                                        if r.get("pixel_auroc") is not None else "")

    for set_name, cats in res["sets"].items():
        for cat, peer in cats.items():
            mine = ours.get(set_name, {}).get(cat)
            runs = peer["padim"]["runs"]
            lo, hi = (min(r["image_auroc"] for r in runs), max(r["image_auroc"] for r in runs))
            best_peer = max(peer["patchcore"]["image_auroc"], peer["padim"]["image_auroc"])
            auto = mine["auto"] if mine else None
            gap = None if auto is None else auto["image_auroc"] - best_peer
            if gap is not None:
                gaps.append(gap)
                auto_all.append(auto["image_auroc"])
                peer_all.append(best_peer)
            rows.append([
                f"{set_name}/{cat}",
                *(cell(mine[f"{k}/holdout"]) if mine else "–"
                  for k in ("patchcore", "padim", "orthoad")),
                f"**{auto['chosen']}** {cell(auto)}" if auto else "–",
                f"{cell(peer['patchcore'])} ({peer['patchcore']['coreset']:.0%})",
                f"{cell(peer['padim'])} ({lo:.3f}–{hi:.3f})",
                "–" if gap is None else f"{gap:+.3f}".replace("-", "−"),
                f"{peer['patchcore']['fit_seconds']:.1f} / {peer['padim']['fit_seconds']:.1f}",
            ])
    head = ["set", "inspectd PatchCore", "PaDiM", "OrthoAD", "inspectd auto",
            "peer PatchCore (coreset)", "peer PaDiM (3 seeds: mean (min–max))", "auto − best peer",
            "peer fit s (PatchCore / PaDiM)"]
    summary = ""
    if gaps:
        summary = (f"\n\nauto − the best peer kind of each row: mean {np.mean(gaps):+.3f}, "
                   f"worst {min(gaps):+.3f}, {sum(g >= 0 for g in gaps)} of {len(gaps)} rows "
                   f"≥ 0; mean image AUROC auto {np.mean(auto_all):.3f} vs best peer per row "
                   f"{np.mean(peer_all):.3f}.").replace("-", "−")
    return "\n".join([
        HEADING, "",
        f"`{m['command']}` ({m['date']}, {m['cpu']}, {m['cores']} cores, torch threads "
        f"{m['threads']}; anomalib {res['anomalib']}; {res['minutes']:.0f} min), beside "
        f"inspectd's figures from the accuracy run above (`outputs/accuracy/results.json`, "
        f"{res['ours_date']}). Same sets and images, same EfficientNet-Lite0 weights, 256². "
        "Peer PatchCore: layers blocks.2 + blocks.4, 9 neighbours, 10 % coreset (its "
        "defaults, with the Lite0 stages of a ResNet's layer2 + layer3; 1 % on ELPV, where "
        "its greedy coreset would take ~25 min per category); peer PaDiM: blocks.1 "
        "+ blocks.2 + blocks.4, 100 random channels, mean of three seeds. The peer fits on "
        "every OK image; inspectd's kinds hold 10 % out for calibration, and auto chooses "
        "on OK images only. Image AUROC / pixel AUROC where masks exist. The peer's coreset "
        "draws random numbers that torch's seed does not fix, so its PatchCore figures move "
        "between runs by a few hundredths.", "",
        table(head, rows) + summary,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help=f"comma-separated sets: {', '.join(SETS)}")
    ap.add_argument("--update", type=Path, help="Markdown file whose section to replace")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar
    try:
        import anomalib
    except ImportError:
        raise SystemExit("anomalib is not installed in this Python: `make peer-venv`, then "
                         "run this with .venv-peer/bin/python") from None
    import torch

    only = a.only.split(",") if a.only else list(SETS)
    ours_path = FULL.out / "results.json"
    ours = json.loads(ours_path.read_text()) if ours_path.exists() else {}
    if not ours:
        log(f"{ours_path} missing: run benchmarks/accuracy.py first for inspectd's figures")
    state, mean, std = backbone_state()
    norm = (np.array(mean, np.float32), np.array(std, np.float32))
    torch.set_grad_enabled(False)
    t0 = time.time()
    res: dict[str, Any] = {
        "machine": machine(" ".join(["benchmarks/peer.py", *sys.argv[1:]])),
        "anomalib": anomalib.__version__, "sets": {},
        "ours_date": ours.get("machine", {}).get("date", "not run"),
    }
    for name in only:
        root, cats = SETS[name](FULL)
        res["sets"][name] = {cat: measure(root, cat, state, norm, CORESET.get(name, 0.1))
                             for cat in cats}
    res["minutes"] = (time.time() - t0) / 60
    FULL.out.mkdir(parents=True, exist_ok=True)
    (FULL.out / "peer.json").write_text(json.dumps(res, indent=1, default=str))
    text = section(res, ours.get("sets", {}))
    if a.update:
        update(a.update, text, HEADING)
        log(f"updated {a.update}")
    else:
        print(text)


if __name__ == "__main__":
    main()
