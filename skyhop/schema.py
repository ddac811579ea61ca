"""Validated configuration: the strict pydantic base every config section uses.

    cfg = validated(BrokerConfig, raw_table, where="fleet/config.toml", section="broker")
    cfg = updated(cfg, "--policy", policy="weighted")

Each process owns its section's schema (``cloud_broker/config.py``,
``edge_agent/config.py``); ``Home`` hands the TOML tables over raw, and the entry
point validates them here, so that an error names the file, the key and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from skyhop.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Strict)


def validated(schema: type[S], raw: Mapping[str, Any], where: str, section: str = "") -> S:
    """``raw`` as ``schema``; a ConfigError naming ``where`` and ``section.key`` if not."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {pretty(exc, section)}") from None


def one_of(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``; else a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def updated(config: S, where: str, **changes: object) -> S:
    """``config`` with ``changes``, validated again (``model_copy`` does not validate);
    a bad value is a ConfigError that names the field under ``where``."""
    return validated(type(config), {**config.model_dump(), **changes}, where)


def pretty(exc: ValidationError, section: str = "") -> str:
    prefix = (section,) if section else ()
    return "; ".join(_one((*prefix, *e["loc"]), e["msg"]) for e in exc.errors())


def _one(loc: tuple[int | str, ...], msg: str) -> str:
    msg = msg.removeprefix("Value error, ")  # our own validators' messages read on their own
    return f"{'.'.join(str(p) for p in loc)}: {msg}" if loc else msg
