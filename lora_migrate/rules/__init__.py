"""Rules: small named rewrites of the canonical form. Each states its math in its docstring and has a unit test
of that identity. The planner strings them together; ``convert --dry-run`` prints them."""

from __future__ import annotations

from . import coverage, inits, refuse, scale, select, shape, values  # noqa: F401  (registration)
from .registry import RULES, describe

__all__ = ["RULES", "describe"]
