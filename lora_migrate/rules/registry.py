"""The registry of rules: ``@rule(name)`` records a function under its name; ``describe`` gives what
``convert --dry-run`` shows for it (its docstring's first line)."""

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
