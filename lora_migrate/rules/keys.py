"""Module-path rules: the canonical form names modules by the base model's path."""

from __future__ import annotations

from ..adapter import ModuleDelta
from ..errors import LoraMigrateError
from .registry import rule


@rule("reprefix")
def reprefix(d: ModuleDelta, old: str, new: str) -> ModuleDelta:
    """module := new + module[len(old):] for modules under ``old``. Tensors are unchanged.

    E.g. old="transformer.", new="" turns a T5AdapterModel path into a T5ForConditionalGeneration one.
    """
    if not d.module.startswith(old):
        raise LoraMigrateError(f"module {d.module!r} does not start with {old!r}")
    return d.replace(module=new + d.module[len(old):])
