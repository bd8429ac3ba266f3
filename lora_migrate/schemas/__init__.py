"""The conventions: every schema module in this package that declares ``CONVENTIONS`` (a tuple of
:class:`Convention`) contributes them, in module-name order; nothing else lists them. This resolves names."""

from __future__ import annotations

import difflib

from ..errors import LoraMigrateError
import importlib
import pkgutil

from .base import Convention, KeyTemplates, LayerKind, Scaling, VersionPattern


def _discover() -> tuple[Convention, ...]:
    out: list[Convention] = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name in ("base", "info"):
            continue
        out += getattr(importlib.import_module(f"{__name__}.{m.name}"), "CONVENTIONS", ())
    return tuple(out)


CONVENTIONS: tuple[Convention, ...] = _discover()

_BY_NAME: dict[str, Convention] = {}
for _c in CONVENTIONS:
    for _n in _c.all_names():
        if _n.lower() in _BY_NAME:
            raise ValueError(f"convention name {_n!r} is declared twice")
        _BY_NAME[_n.lower()] = _c


def get_convention(name: str) -> Convention:
    """Resolve ``adapters-1.0``, ``adapters@1.0.1``, ``adapters==1.0.1`` or ``adapters 1.0.1`` to its convention."""
    key = name.strip().lower().replace("==", "@").replace(" ", "@")
    if key in _BY_NAME:
        return _BY_NAME[key]
    if "@" in key:  # library@version: the convention whose version range holds it
        lib, _, ver = key.partition("@")
        for c in CONVENTIONS:
            if c.library == lib and VersionPattern(specifier=c.versions).matches(ver):
                return c
    close = difflib.get_close_matches(key, list(_BY_NAME), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise LoraMigrateError(f"unknown convention {name!r}{hint} (see `lora-migrate conventions`)")


__all__ = ["CONVENTIONS", "Convention", "KeyTemplates", "LayerKind", "Scaling", "VersionPattern", "get_convention"]
