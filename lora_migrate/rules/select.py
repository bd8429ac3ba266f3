"""Selecting adapters from a source that holds several side by side."""

from __future__ import annotations

from ..errors import LoraMigrateError
from .registry import rule


@rule("select_adapters")
def select_adapters(names: list[str], wanted: str | None) -> list[str]:
    """Keep adapter ``wanted`` (``--adapter``), or every adapter, each into its own output subfolder.

    Adapters are independent: selecting one changes none of its tensors.
    """
    if wanted is None:
        return list(names)
    if wanted not in names:
        raise LoraMigrateError(f"no adapter {wanted!r} in the source; it holds {', '.join(names)}")
    return [wanted]
