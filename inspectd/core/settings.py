"""Settings base: defaults < YAML file (`-c`) < `INSPECTD_*` environment < `-o section.key=value`.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting. Environment variables nest with `__`:
`INSPECTD_PATCHCORE__CORESET_RATIO=0.05` is `-o patchcore.coreset_ratio=0.05`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from inspectd.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("inspectd_file_settings", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's values, placed between the environment and the defaults."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_DATA.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get() or {})


class InspectdSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECTD_", env_nested_delimiter="__", extra="forbid"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: -o overrides arrive as init kwargs.
        return init_settings, env_settings, _FileSource(settings_cls)


S = TypeVar("S", bound=InspectdSettings)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1,2]"]` → `{"a": {"b": 1}, "c": [1, 2]}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def describe_validation_error(
    err: ValidationError,
    source: str = "",
    model: type[BaseModel] | None = None,
    key_line: Callable[[tuple[str | int, ...]], int | None] | None = None,
) -> str:
    """One line naming each bad key as the user wrote it (`model` drops union tags from the
    path; `key_line` finds the key's line in the file)."""
    parts = []
    for e in err.errors():
        loc = _user_loc(e["loc"], model) if model else tuple(e["loc"])
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc += (str(e.get("ctx", {}).get("discriminator", "type")).strip("'"),)
        key = ".".join(str(p) for p in loc)
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            text = f"unknown key '{key}'"
        else:
            text = e["msg"].removeprefix("Value error, ")
            if key:
                text = f"'{key}': {text}"
            if key and not isinstance(got, dict):  # a whole section is noise, the key says it
                text += f" (got {got!r})"
        # A missing key has no line of its own: point at its section.
        where = loc[:-1] if e["type"] in ("missing", "union_tag_not_found") else loc
        line = key_line(where) if key_line and where else None
        parts.append(text + (f" (line {line})" if line else ""))
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(parts)


def _user_loc(loc: Sequence[str | int], model: type[BaseModel]) -> tuple[str | int, ...]:
    """Drop the tags pydantic puts into the path of a discriminated union's member:
    `cameras.cam1.folder.path` is `cameras.cam1.path` in the file."""
    out: list[str | int] = []
    tp: Any = model
    tags: dict[Any, Any] = {}
    for part in loc:
        if part in tags:
            tp, tags = tags[part], {}
            continue
        out.append(part)
        tp, tags = _child_type(tp, part)
    return tuple(out)


def _child_type(tp: Any, part: str | int) -> tuple[Any, dict[Any, Any]]:
    """The type at `part` inside `tp`, and its members by tag when it is a tagged union."""
    disc = None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        if field is None:
            return None, {}
        tp, disc = field.annotation, field.discriminator
    elif get_origin(tp) in (dict, list, tuple, set, frozenset):
        tp = get_args(tp)[-1] if get_args(tp) else None
    else:
        return None, {}
    if get_origin(tp) is Annotated:
        tp, *meta = get_args(tp)
        disc = next((m.discriminator for m in meta
                     if isinstance(m, FieldInfo) and m.discriminator), disc)
    if not isinstance(disc, str):
        return tp, {}
    members = {}
    for member in get_args(tp):
        field = getattr(member, "model_fields", {}).get(disc)
        for tag in get_args(field.annotation) if field else ():
            members[tag] = member
    return tp, members


def _yaml_key_lines(path: Path) -> Callable[[tuple[str | int, ...]], int | None]:
    """`loc → line number` of that key in the YAML file (None where the file lacks it)."""
    root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)

    def line(loc: tuple[str | int, ...]) -> int | None:
        node, mark = root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if hit is None:
                    return None
                mark, node = hit[0].start_mark, hit[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                    and part < len(node.value):
                node = node.value[part]
                mark = node.start_mark
            else:
                return None
        return mark.line + 1 if mark else None

    return line


def load_settings(
    cls: type[S],
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> S:
    """Build settings from the file, the environment, `-o` overrides and explicit values."""
    file_data = read_yaml(config_file) if config_file else {}
    init = parse_overrides(overrides)
    for key, value in values.items():
        if value is not None:
            init[key] = value
    token = _FILE_DATA.set(file_data)
    try:
        return cls(**init)
    except ValidationError as e:
        key_line = _yaml_key_lines(config_file) if config_file else None
        raise ConfigError(describe_validation_error(
            e, str(config_file or "settings"), cls, key_line)) from None
    finally:
        _FILE_DATA.reset(token)
