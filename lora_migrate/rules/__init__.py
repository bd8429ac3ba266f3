"""Rules: small named rewrites of the canonical form. Each states its math in its docstring and has a unit test
of that identity. The planner strings them together; ``convert --dry-run`` prints them."""

from __future__ import annotations

from typing import Callable

RULES: dict[str, Callable] = {}


def rule(name: str):
    """Register a rule under ``name`` (its docstring's first line is what ``--dry-run`` shows)."""

    def deco(fn):
        if name in RULES:
            raise ValueError(f"rule {name!r} registered twice")
        fn.rule_name = name
        RULES[name] = fn
        return fn

    return deco


def describe(name: str) -> str:
    doc = (RULES[name].__doc__ or "").strip().splitlines()
    return doc[0] if doc else name


from . import coverage, inits, keys, refuse, scale, select, values  # noqa: E402,F401  (registration)

__all__ = ["RULES", "describe", "rule"]
