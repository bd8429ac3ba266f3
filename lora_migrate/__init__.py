"""lora-migrate: rewrite LoRA checkpoints between library conventions so the math is identical, and prove it.

The API mirrors the CLI: :func:`convert`, :func:`inspect`, :func:`verify`, :func:`conventions`,
:func:`fix_merged`, :func:`merge_adapter` (``lora-migrate merge``; in the module ``lora_migrate.merge``).
They are loaded on first use so that importing the package (and ``lora-migrate --help``) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"convert", "inspect", "verify", "conventions", "ConvertResult", "InspectResult", "VerifyResult",
        "fix_merged", "FixMergedResult", "merge_adapter", "MergeResult"}


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in ("LoraMigrateError", "VerificationFailed"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'lora_migrate' has no attribute {name!r}")


__all__ = sorted(_API | {"LoraMigrateError", "VerificationFailed"})
