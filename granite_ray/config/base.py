"""What every config section shares: strict fields, absolute URIs, one error type."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from granite_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute_uri(uri: str | None) -> str | None:
    """Local paths made absolute where the config is loaded: Ray workers run in other directories."""
    if uri is None or str(uri).startswith("s3://"):
        return uri
    return str(Path(uri).expanduser().resolve())


def split_label(entry: str) -> tuple[str, str]:
    """`label=uri` -> (label, uri); a bare uri is labelled by its last path component."""
    label, sep, uri = entry.partition("=")
    if sep and "/" not in label:
        return label, uri
    return entry.rstrip("/").rsplit("/", 1)[-1], entry


def labelled_absolute(entry: str) -> str:
    label, uri = split_label(entry)
    uri = absolute_uri(uri)
    return f"{label}={uri}" if "=" in entry and entry.partition("=")[0] == label else uri
