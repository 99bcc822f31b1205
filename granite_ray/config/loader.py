"""Loading a stage's config: YAML, then `key.sub=value` overrides, then validation naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from granite_ray import storage
from granite_ray.config.base import ConfigError
from granite_ray.config.sections import ModelConfig, StageConfig

C = TypeVar("C", bound=StageConfig)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries into a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{got_text}")
    return "invalid config:\n" + "\n".join(lines)


def read_yaml(yaml_path: str | Path) -> dict[str, Any]:
    """A config file's mapping (local or s3://); any fault is a one-line ConfigError naming the file."""
    if not storage.is_s3(str(yaml_path)) and not Path(yaml_path).is_file():
        raise ConfigError(f"{yaml_path}: no such config file")
    text = storage.read_bytes(str(yaml_path)).decode()
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{yaml_path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{yaml_path}: top level must be a mapping")
    return loaded


def load_config(cls: type[C], yaml_path: str | Path | None = None, overrides: list[str] = ()) -> C:
    tree = read_yaml(yaml_path) if yaml_path is not None else {}
    tree = apply_overrides(tree, list(overrides))
    try:
        config = cls.model_validate(tree)
        if isinstance(getattr(config, "model", None), ModelConfig):
            config.model.size()
        return config
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, written beside every artifact."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
