"""The registry of conventions: every schema module declares one :class:`Convention`; this resolves names."""

from __future__ import annotations

import difflib

from ..errors import LoraMigrateError
from .adapter_transformers_3_1 import ADAPTER_TRANSFORMERS_3_1
from .adapters_1_0 import ADAPTERS_1_0
from .adapters_1_1 import ADAPTERS_1_1
from .peft import LORAX, PEFT_ERAS, VLLM
from .base import Convention, KeyTemplates, LayerKind, Scaling, VersionPattern

CONVENTIONS: tuple[Convention, ...] = (ADAPTER_TRANSFORMERS_3_1, ADAPTERS_1_0, ADAPTERS_1_1, *PEFT_ERAS, LORAX, VLLM)

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
