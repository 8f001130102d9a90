import re
from pathlib import Path

import pytest

from inspectd.core.errors import ConfigError
from inspectd.core.settings import load_settings, parse_overrides, read_yaml
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


@pytest.mark.parametrize("kind", ["patchcore", "padim", "orthoad", "ensemble", "auto"])
def test_shipped_model_configs_document_the_code_defaults(kind):
    s = load_settings(ModelSettings, CONFIGS / f"{kind}.yaml")
    assert s.kind == kind
    assert s.model_dump(exclude={"kind"}) == ModelSettings().model_dump(exclude={"kind"})


# --- the YAML file: repeated keys, syntax errors, where each bad key was set -------------


@pytest.mark.parametrize(("text", "message"), [
    ("patchcore:\n  topk: 3\nbackbone:\n  name: resnet18\npatchcore:\n  topk: 5\n",
     "duplicate key 'patchcore' at lines 1 and 5"),
    ("patchcore:\n  topk: 3\n  coreset_ratio: 0.1\n  topk: 5\n",
     "duplicate key 'patchcore.topk' at lines 2 and 4"),
    ("preprocess:\n  resize: [{a: 1, a: 2}]\n",
     "duplicate key 'preprocess.resize.0.a' at line 2 (columns 13 and 19)"),
    ("1: a\n0x1: b\n", "duplicate key '0x1' at lines 1 and 2"),  # one key once built
], ids=["section", "nested", "in-a-list", "same-value"])
def test_a_repeated_key_is_an_error_naming_file_key_and_both_lines(tmp_path, text, message):
    cfg = tmp_path / "model.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_yaml(cfg)
    assert str(e.value) == f"{cfg}: {message} (YAML would silently keep only the last)"


def test_merge_keys_may_be_overridden_and_all_repeats_are_reported(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: &b {topk: 1, num_neighbours: 2}\npatchcore:\n  <<: *b\n  topk: 3\n")
    assert read_yaml(cfg)["patchcore"] == {"topk": 3, "num_neighbours": 2}
    cfg.write_text("a: 1\nb: 2\na: 3\nb: 4\n")
    with pytest.raises(ConfigError, match="'a' at lines 1 and 3.*; duplicate key 'b' at lines 2 "
                                          "and 4"):
        read_yaml(cfg)


@pytest.mark.parametrize(("text", "message"), [
    ("patchcore:\n  topk: 3\n coreset_ratio: 0.1\n",
     "not valid YAML at line 3, column 2: expected <block end>, but found '<block mapping "
     "start>' (check the indentation), while parsing a block mapping started at line 1"),
    ("preprocess:\n  resize: [256, 256\nkind: padim\n",
     "not valid YAML at line 3, column 5: expected ',' or ']', but got ':', while parsing a "
     "flow sequence started at line 2"),
    ("kind: padim\npatchcore: topk: 3\n",
     "not valid YAML at line 2, column 16: mapping values are not allowed here"),
    ("kind: !!python/object:os.system x\n",
     "not valid YAML at line 1, column 7: could not determine a constructor for the tag"),
], ids=["indentation", "unclosed-list", "two-colons", "python-tag"])
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, message):
    cfg = tmp_path / "model.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(ModelSettings, cfg)
    assert str(e.value).startswith(f"{cfg}: {message}") and "\n" not in str(e.value)


def test_each_bad_key_says_where_it_was_set(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: patchcore\npatchcore:\n  topk: 0\nbackbone: resnet18\n")
    with pytest.raises(ConfigError) as e:
        load_settings(ModelSettings, cfg)
    assert "'patchcore.topk': Input should be greater than or equal to 1 (got 0) (line 3)" \
        in str(e.value)
    # a section given a scalar: named with its line too
    assert re.search(r"'backbone': Input should be a valid dictionary[^;]* \(got 'resnet18'\) "
                     r"\(line 4\)", str(e.value))

    with pytest.raises(ConfigError) as e:
        load_settings(ModelSettings, cfg, ["patchcore.topk=-1", "backbone={}"])
    assert "(got -1) (from -o patchcore.topk)" in str(e.value)

    monkeypatch.setenv("INSPECTD_PATCHCORE__TOPK", "-2")
    monkeypatch.setenv("INSPECTD_BACKBONE", '{"nmae": "x"}')  # a section given whole, as JSON
    with pytest.raises(ConfigError) as e:
        load_settings(ModelSettings, cfg)
    assert "(got '-2') (from environment INSPECTD_PATCHCORE__TOPK)" in str(e.value)
    assert "unknown key 'backbone.nmae' (from environment INSPECTD_BACKBONE)" in str(e.value)

    monkeypatch.setenv("INSPECTD_BACKBONE", "resnet18")
    with pytest.raises(ConfigError, match=r"'backbone': not valid JSON \(from environment "
                                          r"INSPECTD_BACKBONE\)"):
        load_settings(ModelSettings, cfg)
