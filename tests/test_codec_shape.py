"""The codec architecture as a reading of the code (issue 13): outside ``lora_migrate/schemas/`` and
``lora_migrate/codecs/`` no module names a convention, a family or a library as a string, or imports a family's
schema or codec module; every convention belongs to exactly one registered codec; no module is over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from lora_migrate.codecs import CODECS, codec_for
from lora_migrate.schemas import CONVENTIONS

PKG = Path(__file__).resolve().parent.parent / "lora_migrate"
SHARED = {"base", "info", "__init__"}  # schemas/ and codecs/ modules that belong to no family


def _family_modules() -> set[str]:
    mods = {f"schemas.{p.stem}" for p in (PKG / "schemas").glob("*.py") if p.stem not in SHARED}
    mods |= {f"codecs.{p.name}" for p in (PKG / "codecs").iterdir() if p.is_dir() and p.name != "__pycache__"}
    return mods


def _outside() -> list[tuple[str, ast.AST]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if not rel.startswith(("schemas/", "codecs/")):
            out.append((rel, ast.parse(p.read_text(encoding="utf-8"), rel)))
    return out


def test_nothing_outside_schemas_and_codecs_names_a_convention_or_family():
    names = {c.family for c in CONVENTIONS} | {c.library for c in CONVENTIONS}
    names |= {n.lower() for c in CONVENTIONS for n in c.all_names()}
    found = [f"{rel}:{n.lineno}: {n.value!r}" for rel, tree in _outside() for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.lower() in names]
    assert not found, found


def test_nothing_outside_schemas_and_codecs_imports_a_family_module():
    fam = _family_modules()
    found = []
    for rel, tree in _outside():
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                mod = (n.module or "").removeprefix("lora_migrate.").lstrip(".")
                hits = {mod} | {f"{mod}.{a.name}" for a in n.names}
                found += [f"{rel}:{n.lineno}: {h}" for h in hits if h in fam]
            elif isinstance(n, ast.Import):
                found += [f"{rel}:{n.lineno}: {a.name}" for a in n.names
                          if a.name.removeprefix("lora_migrate.") in fam]
    assert not found, found


def test_every_convention_has_exactly_one_codec():
    ids = [c.id for c in CODECS]
    assert len(ids) == len(set(ids))
    for conv in CONVENTIONS:
        assert codec_for(conv).id == conv.family
        assert sum(c.id == conv.family for c in CODECS) == 1
    assert {c.family for c in CONVENTIONS} == set(ids)  # no codec without conventions


def test_no_module_is_over_about_400_lines():
    big = {p.relative_to(PKG).as_posix(): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not big, big
