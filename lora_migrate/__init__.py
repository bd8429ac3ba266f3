"""lora-migrate: rewrite LoRA checkpoints between library conventions so the math is identical, and prove it.

The API mirrors the CLI: :func:`convert`, :func:`inspect`, :func:`verify`, :func:`conventions`, :func:`check`,
:func:`batch`, :func:`push`, :func:`fix_merged`, :func:`merge_adapter` (``lora-migrate merge``). They are loaded on
first use so that importing the package (and ``lora-migrate --help``) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys
import types

_API = {"convert", "inspect", "verify", "ConvertResult", "InspectResult", "VerifyResult"}
_MORE = {"check": "gate", "CheckResult": "gate", "batch": "batching", "BatchResult": "batching",
         "push": "hub", "PushResult": "hub", "fix_merged": "fixmerged", "FixMergedResult": "fixmerged",
         "merge_adapter": "merge", "MergeResult": "merge", "conventions": "schemas.info"}


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _MORE:
        import importlib

        return getattr(importlib.import_module(f".{_MORE[name]}", __name__), name)
    if name in ("LoraMigrateError", "VerificationFailed"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'lora_migrate' has no attribute {name!r}")


__all__ = sorted(_API | set(_MORE) | {"LoraMigrateError", "VerificationFailed"})


class _Package(types.ModuleType):
    """Importing the subpackage ``lora_migrate.check`` (the numeric check) would otherwise bind the package attribute
    ``check`` to it, hiding the API function of that name: API names always resolve to the functions."""

    def __getattribute__(self, name):
        if name in _API or name in _MORE:
            return __getattr__(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
