"""What ``inspect`` and ``check`` report about a file, as data every codec can produce without the commands."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Finding(BaseModel):
    level: Literal["error", "warning"]
    code: str  # stable, for scripts: convention, unknown-version, alpha-ignored, unclaimed-keys, nonfinite, ...
    message: str
    adapter: str | None = None
    module: str | None = None


class LoadCheck(BaseModel):
    """What another library version computes if it loads this file as it is."""

    convention: str
    library: str
    versions: str
    same: bool
    detail: str
