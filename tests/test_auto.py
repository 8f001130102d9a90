"""`--model auto`: the kind chosen on OK images alone, by synthetic anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inspectd.core.errors import ConfigError
from inspectd.models import fit, load
from inspectd.models.auto import choose
from inspectd.models.settings import ModelSettings

SMALL = {"preprocess": {"resize": 128}}


def _ok(synth_root: Path) -> list[Path]:
    return sorted((synth_root / "object" / "train" / "good").glob("*.png"))


def _auto(candidates: list[dict], **auto) -> ModelSettings:
    return ModelSettings(kind="auto", **SMALL,
                         auto={"candidates": candidates, "min_validation": 4, **auto})


# A candidate crippled where it matters: PaDiM on one channel; PatchCore on the coarsest
# stage only (4×4 cells at 128²) with a blurred map — it cannot say where a defect is.
BAD_PADIM = {"name": "padim, 1 channel", "kind": "padim", "padim": {"channels": 1}}
BAD_PATCHCORE = {"name": "patchcore, coarse", "kind": "patchcore",
                 "backbone": {"layers": ["blocks.6"]}, "scoring": {"sigma": 16}}


@pytest.mark.parametrize(("candidates", "right"), [
    ([{"name": "patchcore", "kind": "patchcore"}, BAD_PADIM], "patchcore"),
    ([BAD_PATCHCORE, {"name": "padim", "kind": "padim"}], "padim"),
], ids=["patchcore-is-right", "padim-is-right"])
def test_auto_chooses_the_candidate_that_finds_the_anomalies(synth_root, candidates, right):
    chosen, report, _ = choose(_ok(synth_root), _auto(candidates))
    assert report["chosen"] == right and chosen.kind == right
    rows = {c["name"]: c for c in report["candidates"]}
    assert rows[right]["choice"] > min(c["choice"] for c in rows.values())
    assert all(c["fit_seconds"] > 0 for c in rows.values())


def test_the_artifact_records_the_choice_and_scores_like_its_kind(synth_root, tmp_path):
    det = fit(_ok(synth_root), _auto([{"name": "patchcore", "kind": "patchcore"},
                                      {"name": "patchcore topk", "kind": "patchcore",
                                       "patchcore": {"image_score": "topk"}},
                                      {"name": "orthoad", "kind": "orthoad"}]))
    det.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    report = manifest["auto"]
    assert manifest["kind"] == manifest["settings"]["kind"] != "auto"
    assert report["requested"]["kind"] == "auto"  # refit chooses again from these
    rows = {c["name"]: c for c in report["candidates"]}
    assert rows["patchcore topk"]["shared_fit"] == "patchcore"  # one fit, two ways to score
    assert report["chosen"] in rows and manifest["training"]["images"] == 14
    again = load(tmp_path / "a", precision="fp32")  # as fitted
    assert again.predict([_ok(synth_root)[0]])[0].score == det.predict([_ok(synth_root)[0]])[
        0].score


@pytest.mark.parametrize("candidate", [{"name": "padim", "kind": "padim"},
                                       {"name": "patchcore", "kind": "patchcore"}])
def test_the_final_fit_from_the_choices_features_is_the_kinds_own_fit(synth_root, candidate):
    """The winner is fitted on the backbone features model choice already computed: the
    same model, thresholds and scores as fitting its settings directly (float tolerance:
    the features came in other batches)."""
    auto = fit(_ok(synth_root), _auto([candidate], ensemble=False))
    plain = fit(_ok(synth_root), ModelSettings(**auto.manifest["settings"]))
    assert auto.manifest["training"]["fit_images"] == plain.manifest["training"]["fit_images"]
    assert auto.threshold == pytest.approx(plain.threshold, rel=1e-4)
    assert auto.pixel_threshold == pytest.approx(plain.pixel_threshold, rel=1e-4)
    for name, t in plain.model.tensors().items():
        assert torch.allclose(auto.model.tensors()[name].float(), t.float(), rtol=1e-3,
                              atol=1e-4), name
    probe = _ok(synth_root)[:3]
    assert [p.score for p in auto.predict(probe)] == pytest.approx(
        [p.score for p in plain.predict(probe)], rel=1e-4)


def test_an_ensemble_final_fit_normalises_on_the_choices_features(synth_root):
    """Chosen, the ensemble is fitted from the choice's features too: its members are
    normalised on the held-out images from the cache, as a direct fit does from files."""
    from inspectd.models.fitting import _fit

    train = _ok(synth_root)
    _, _, features = choose(train, _auto([{"name": "patchcore", "kind": "patchcore"},
                                          {"name": "padim", "kind": "padim"}]))
    ens = ModelSettings(kind="ensemble", **SMALL)
    reused = _fit(train, ens, [], lambda *_: None, features)
    plain = fit(train, ens)
    assert reused.threshold == pytest.approx(plain.threshold, rel=1e-4)
    probe = train[:3]
    assert [p.score for p in reused.predict(probe)] == pytest.approx(
        [p.score for p in plain.predict(probe)], rel=1e-4, abs=1e-5)


def test_the_budget_stops_trying_candidates_but_always_tries_one(synth_root):
    _, report, _ = choose(_ok(synth_root), _auto([{"name": "a", "kind": "padim"},
                                              {"name": "b", "kind": "orthoad"}],
                                             budget_s=0.001))
    a, b = report["candidates"]
    assert a["choice"] is not None and b["skipped"].startswith("budget")
    assert report["chosen"] == "a"


def test_a_bad_candidate_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"auto.candidates\[0\] \(x\)"):
        choose([], _auto([{"name": "x", "kind": "fastflow"}]))


def test_fit_cli_prints_the_table_of_candidates(synth_root, tmp_path, run_cli):
    proc = run_cli("fit", "--data", str(synth_root), "--category", "object", "--model", "auto",
                   "--out", str(tmp_path / "m"), "-o", "preprocess.resize=128",
                   "-o", "auto.min_validation=4",
                   "-o", "auto.candidates=[{kind: patchcore}, {kind: padim}]")
    assert "model choice" in proc.stdout and "pixel AUROC" in proc.stdout
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["auto"]["chosen"]


def test_confirmed_ng_images_count_in_the_choice(synth_root):
    ng = sorted(p for d in (synth_root / "object" / "test").iterdir() if d.name != "good"
                for p in d.glob("*.png"))
    cands = [{"name": "patchcore", "kind": "patchcore"}, BAD_PADIM]
    _, plain, _ = choose(_ok(synth_root), _auto(cands, ensemble=False))
    _, with_ng, _ = choose(_ok(synth_root), _auto(cands, ensemble=False), ng=ng)
    assert with_ng["ng_images"] == len(ng) and "confirmed NG" in with_ng["rule"]
    for a, b in zip(plain["candidates"], with_ng["candidates"], strict=True):
        assert a["ng_auroc"] is None and 0.0 <= b["ng_auroc"] <= 1.0
        assert b["choice"] == pytest.approx(a["choice"] + b["ng_auroc"])
