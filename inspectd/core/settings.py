"""Settings base: defaults < YAML file (`-c`) < `INSPECTD_*` environment < `-o section.key=value`.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting; a key given twice in a YAML file is an error too (YAML would keep
the last), and every error says where its key was set: the file's line, `-o` or the
environment. Environment variables nest with `__`:
`INSPECTD_PATCHCORE__CORESET_RATIO=0.05` is `-o patchcore.coreset_ratio=0.05`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML would silently keep
    the last one, so a second `worker:` section would replace the first without a word.

    The check runs on the whole composed document before anything is built from it, so a
    merge key (`<<: *defaults`) may still be overridden by a key of the mapping itself.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        dups: list[str] = []
        self._check_keys(node, (), set(), dups)
        if dups:
            raise _DuplicateKeys(dups)
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: tuple[str, ...], seen: set[int],
                    dups: list[str]) -> None:
        if id(node) in seen:  # an alias: checked where its anchor is
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, (*path, str(i)), seen, dups)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._check_keys(value_node, path, seen, dups)
                    continue
                # Scalar keys compare as YAML builds them (`1` and `0x1` are one key);
                # a sequence or mapping as a key is left to construction to refuse.
                key = (self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode)
                       else key_node)
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:
                    earlier = key_node
                if earlier is not key_node:
                    a, b = earlier.start_mark, key_node.start_mark
                    at = (f"lines {a.line + 1} and {b.line + 1}" if a.line != b.line else
                          f"line {a.line + 1} (columns {a.column + 1} and {b.column + 1})")
                    dups.append(f"duplicate key '{'.'.join((*path, name))}' at {at} "
                                "(YAML would silently keep only the last)")
                self._check_keys(value_node, (*path, name), seen, dups)


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """One readable line: the file, where (line and column, 1-based) and what."""
    if isinstance(e, _DuplicateKeys):
        return f"{path}: {e}"
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return f"{path}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    m = e.problem_mark
    text = f"{path}: not valid YAML at line {m.line + 1}, column {m.column + 1}: {e.problem}"
    if "<block end>" in (e.problem or ""):
        text += " (check the indentation)"
    if e.context and e.context_mark is not None and e.context_mark.line != m.line:
        text += f", {e.context} started at line {e.context_mark.line + 1}"
    return text


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError (file, line, column) when it is missing,
    not YAML, or repeats a key."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


# A model-wide check (no key of its own) that names its key first: "cameras.cam1: set sku …".
_KEY_FIRST = re.compile(r"([A-Za-z_][\w-]*(?:\.[\w-]+)*): (.+)", re.S)


def describe_validation_error(
    err: ValidationError,
    source: str = "",
    model: type[BaseModel] | None = None,
    where: Callable[[tuple[str | int, ...]], str | None] | None = None,
) -> str:
    """One line naming each bad key as the user wrote it (`model` drops union tags from the
    path; `where` says where the key was set: `line 7`, `from -o k`, `from environment V`)."""
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
            named = _KEY_FIRST.fullmatch(text) if not loc else None
            if named:  # a check across sections names its key first: "cameras.cam1: …"
                key, text, loc = named[1], named[2], tuple(named[1].split("."))
            if key:
                text = f"'{key}': {text}"
            if key and not named and not isinstance(got, dict):  # a section: the key says it
                text += f" (got {got!r})"
        # A missing key has no line of its own: point at its section.
        at = loc[:-1] if e["type"] in ("missing", "union_tag_not_found") else loc
        origin = where(at) if where and at else None
        parts.append(text + (f" ({origin})" if origin else ""))
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
    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        root = None

    def line(loc: tuple[str | int, ...]) -> int | None:
        node, mark = root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                hit = _mapping_item(node, str(part))
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


def _mapping_item(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key, value) nodes of `key` in a mapping, looking into merged (`<<:`) mappings."""
    merged: list[yaml.Node] = []
    for k, v in node.value:
        if k.tag == "tag:yaml.org,2002:merge":
            merged += v.value if isinstance(v, yaml.SequenceNode) else [v]
        elif isinstance(k, yaml.ScalarNode) and k.value == key:
            return k, v
    for m in merged:
        hit = _mapping_item(m, key) if isinstance(m, yaml.MappingNode) else None
        if hit:
            return hit
    return None


def _put(tree: dict[str, Any], path: Sequence[str], label: str) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            return
    if not isinstance(node.get(path[-1]), dict):
        node[path[-1]] = label


def _labels(node: Any) -> list[str]:
    return [x for v in node.values() for x in _labels(v)] if isinstance(node, dict) else [node]


def key_origins(
    cls: type[BaseSettings],
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> Callable[[tuple[str | int, ...]], str | None]:
    """`loc → where that key was set`, by priority: `from -o worker.count`, `from environment
    INSPECTD_WORKER__COUNT`, `line 12` (of the file); None for a default. A key inside a
    value given whole (`-o cameras={...}`) is from there; a section, from what set it."""
    given: dict[str, Any] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        _put(given, key.split("."), f"-o {key}")
    for key, value in values.items():
        if value is not None:
            _put(given, [key], "the command line")
    prefix = str(cls.model_config.get("env_prefix") or "")
    delim = cls.model_config.get("env_nested_delimiter") or None
    env: dict[str, Any] = {}
    for name in sorted(os.environ):
        if prefix and name.upper().startswith(prefix.upper()):
            _put(env, name[len(prefix):].lower().split(delim), f"environment {name}")
    line = _yaml_key_lines(config_file) if config_file else None

    def where(loc: tuple[str | int, ...]) -> str | None:
        section: list[str] = []
        for tree, fold in ((given, False), (env, True)):
            node: Any = tree
            for part in loc:
                if not isinstance(node, dict):
                    break  # a value given whole holds this key
                node = node.get(str(part).lower() if fold else str(part))
            if isinstance(node, str):
                return f"from {node}"
            section += _labels(node) if node else []
        # A section: its line in the file, else whatever set keys inside it.
        n = line(loc) if line and loc else None
        if n:
            return f"line {n}"
        return "from " + ", ".join(dict.fromkeys(section)) if section else None

    return where


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
        where = key_origins(cls, config_file, overrides, **values)
        raise ConfigError(describe_validation_error(
            e, str(config_file or "settings"), cls, where)) from None
    except SettingsError as e:  # an environment variable holding a section that is not JSON
        field = re.search(r'field "([^"]+)"', str(e))
        names = [n for n in sorted(os.environ) if field and n.upper().startswith(
            f"{cls.model_config.get('env_prefix') or ''}{field[1]}".upper())]
        raise ConfigError(
            f"{config_file or 'settings'}: '{field[1] if field else '?'}': not valid JSON (from "
            f"environment {', '.join(names) or '?'}); a section given whole in the environment "
            "is JSON, e.g. INSPECTD_WORKER='{\"count\": 2}'") from None
    finally:
        _FILE_DATA.reset(token)
