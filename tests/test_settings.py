from pathlib import Path

import pytest

from inspectd.core.errors import ConfigError
from inspectd.core.settings import load_settings, parse_overrides
from inspectd.models.settings import ModelSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def test_precedence_is_defaults_then_file_then_env_then_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("patchcore:\n  coreset_ratio: 0.2\n  topk: 3\n  num_neighbours: 4\n")
    monkeypatch.setenv("INSPECTD_PATCHCORE__CORESET_RATIO", "0.3")
    monkeypatch.setenv("INSPECTD_PATCHCORE__TOPK", "7")
    s = load_settings(ModelSettings, cfg, ["patchcore.topk=5"])
    assert s.patchcore.num_neighbours == 4  # file beats default
    assert s.patchcore.coreset_ratio == 0.3  # env beats file
    assert s.patchcore.topk == 5  # -o beats env
    assert s.patchcore.neighbourhood == 3  # default


def test_unknown_keys_are_errors_that_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown key 'patchcore.coreset_ration'"):
        load_settings(ModelSettings, None, ["patchcore.coreset_ration=0.1"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'backbone.nmae'"):
        load_settings(ModelSettings, cfg)
    monkeypatch.setenv("INSPECTD_PADIM__BOGUS", "1")
    with pytest.raises(ConfigError, match="unknown key 'padim.bogus'"):
        load_settings(ModelSettings)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="'patchcore.coreset_ratio'"):
        load_settings(ModelSettings, None, ["patchcore.coreset_ratio=2"])
    with pytest.raises(ConfigError, match="'kind'"):
        load_settings(ModelSettings, None, ["kind=fastflow"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["patchcore.topk"])


def test_override_values_parse_as_yaml():
    assert parse_overrides(["a.b=0.5", "a.c=[1, 2]", "d=null", "e=text"]) == {
        "a": {"b": 0.5, "c": [1, 2]}, "d": None, "e": "text"}


@pytest.mark.parametrize("kind", ["patchcore", "padim", "orthoad"])
def test_shipped_model_configs_document_the_code_defaults(kind):
    s = load_settings(ModelSettings, CONFIGS / f"{kind}.yaml")
    assert s.kind == kind
    assert s.model_dump(exclude={"kind"}) == ModelSettings().model_dump(exclude={"kind"})
