"""What ``lora_migrate.conventions()`` and ``lora-migrate conventions --json`` report: one record per convention.
Kept apart from :mod:`lora_migrate.api` so that listing them does not import torch."""

from __future__ import annotations

from pydantic import BaseModel

from . import CONVENTIONS


class ConventionInfo(BaseModel):
    name: str
    library: str
    versions: str
    aliases: list[str]
    scaling: dict[str, str]
    notes: str
    writes: str
    version_written: str


def conventions() -> list[ConventionInfo]:
    """Every convention lora-migrate reads and writes, with its scaling rule."""
    return [ConventionInfo(name=c.name, library=c.library, versions=c.versions, aliases=list(c.aliases),
                           scaling={k: v.value for k, v in c.scaling.items()}, notes=c.scaling_notes,
                           writes=f"{c.config_file} + {c.weights_write}", version_written=c.version_to_write)
            for c in CONVENTIONS]
