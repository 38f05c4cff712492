"""How both daemons read their settings: defaults < YAML file < environment < command line.

The scheduler (``galaxy_dirac.wms.config``) and the SiteDirector (``sitedirector.config``) each declare a pydantic
model; this module stacks the sources in that order, validates once, and turns pydantic's errors into one
:class:`ConfigError` whose lines name the dotted key and, where known, the file or variable the bad value came
from, because an operator fixes the source, not the merged result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
KeyPath = tuple[Union[str, int], ...]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


class NestedError(ValueError):
    """Raised by a validator that validated a part on its own: its errors keep their path below the field."""

    def __init__(self, errors: Sequence[tuple[KeyPath, str]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in self.errors))

    @classmethod
    def of(cls, exc: ValidationError) -> NestedError:
        """The errors of a ``model_validate`` call, each at its own path."""
        return cls([(tuple(e["loc"]), _message(e)) for e in exc.errors()])


@dataclass
class Layer:
    """One source of settings: its (nested) values and what to call it in errors ("" = say nothing)."""

    source: str
    values: Mapping[str, Any]
    #: A more precise name for some keys (e.g. the environment variable that set them).
    origins: dict[KeyPath, str] = field(default_factory=dict)


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: no settings)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def env_layer(
    environ: Mapping[str, str],
    prefix: str,
    aliases: Optional[Mapping[str, KeyPath]] = None,
    *,
    names: Optional[Sequence[str]] = None,
    skip: Sequence[str] = (),
) -> Layer:
    """``<prefix><NAME>`` variables as top-level settings ``name``, and each alias variable at its key path.

    With ``names``, only those settings are read (other variables with the prefix are left alone); without, every
    variable with the prefix is a setting, so a misspelt one is reported instead of ignored.
    """
    values: dict[str, Any] = {}
    origins: dict[KeyPath, str] = {}
    for var, path in (aliases or {}).items():
        if var in environ:
            _set(values, path, environ[var])
            origins[path] = f"environment variable {var}"
    for var, value in environ.items():
        if not var.startswith(prefix) or var in skip or var in (aliases or {}):
            continue
        name = var[len(prefix) :].lower()
        if names is None or name in names:
            values[name] = value
            origins[(name,)] = f"environment variable {var}"
    return Layer("the environment", values, origins)


def overlay(model: type[M], layers: Sequence[Layer], context: Optional[dict[str, Any]] = None) -> M:
    """Merge the layers, lowest first (mappings merge key by key, ``None`` means "not given"), validate once."""
    merged: dict[str, Any] = {}
    origins: dict[KeyPath, str] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if value is None:
                continue
            merged[key] = _merge(merged.get(key), value)
            origins = {p: s for p, s in origins.items() if p[0] != key or isinstance(value, Mapping)}
            origins[(key,)] = layer.source
        origins.update(layer.origins)
    try:
        return model.model_validate(merged, context=context)
    except ValidationError as exc:
        raise ConfigError(describe(exc, origins)) from None


def describe(exc: ValidationError, origins: Optional[Mapping[KeyPath, str]] = None, prefix: KeyPath = ()) -> str:
    """``key.path: message (setting 'key.path' from <source>)``, one per error, ``; ``-separated.

    ``prefix``: where the validated part sits in the whole configuration (``("options",)`` for a queue's options).
    """
    lines = []
    for error in exc.errors():
        loc = prefix + tuple(error["loc"])
        ctx_error = (error.get("ctx") or {}).get("error")
        nested = ctx_error.errors if isinstance(ctx_error, NestedError) else [((), _message(error))]
        for sub, msg in nested:
            path = loc + tuple(sub)
            source = _origin(path, origins or {})
            line = f"{_dotted(path) or 'top level'}: {msg}"
            if source:
                what = "unknown setting" if error["type"] == "extra_forbidden" else "setting"
                line += f" ({what} {_dotted(path)!r} from {source})"
            lines.append(line)
    return "; ".join(lines)


def _message(error: Mapping[str, Any]) -> str:
    ctx_error = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and ctx_error is not None:
        return str(ctx_error)  # our own validators' words, without pydantic's "Value error, " prefix
    return str(error["msg"])


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def _origin(path: KeyPath, origins: Mapping[KeyPath, str]) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in origins:
            return origins[path[:n]]
    return ""


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = dict(old)
        for key, value in new.items():
            out[key] = _merge(out.get(key), value)
        return out
    return new


def _set(values: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = values
    for key in path[:-1]:
        node = node.setdefault(str(key), {})
    node[str(path[-1])] = value
