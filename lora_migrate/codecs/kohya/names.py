"""kohya module names ↔ canonical (diffusers) module paths, from the data in :mod:`lora_migrate.schemas.kohya`.

- ``_`` → ``.``: each grammar (a regex over dotted paths) is compiled with its literal ``\\.`` turned into a
  captured ``_``; the groups that matched are exactly the underscores that were dots.
- SAI ↔ diffusers U-Net paths: the structural rules written beside ``LAYERS_PER_BLOCK`` in the schema.
- Flux BFL ↔ diffusers: ``FLUX_MAP`` (one BFL module may be several diffusers modules, split by rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ...schemas import kohya as S

COMPONENT_PREFIX = {"unet", "transformer", "text_encoder", "text_encoder_2"}


@lru_cache(maxsize=None)
def _underscored(grammar: str) -> re.Pattern:
    """The grammar over ``_``-joined names: every literal ``\\.`` becomes ``(_)``; other groups do not capture."""
    if re.search(r"\((?!\?)", grammar):
        raise ValueError("kohya grammars may only use (?:…) groups")
    return re.compile(grammar.replace(r"\.", "(_)"))


def dotted(name: str, grammar: str) -> str | None:
    """The dotted module path of ``name`` (a kohya module name without its prefix) under ``grammar``, or None."""
    m = _underscored(S.GRAMMARS[grammar]).fullmatch(name)
    if m is None:
        return None
    chars = list(name)
    for g in range(1, (m.re.groups or 0) + 1):
        if m.start(g) >= 0:
            chars[m.start(g)] = "."
    return "".join(chars)


def underscored(path: str) -> str:
    return path.replace(".", "_")


# ------------------------------------------------------------------------------------------------ SAI ↔ diffusers
_L = S.LAYERS_PER_BLOCK
_SAI_RES_INV = {v: k for k, v in S.SAI_RESNET.items()}
_SAI_TOP_INV = {v: k for k, v in S.SAI_TOP.items()}


def sai_to_diffusers(path: str) -> str:
    """A U-Net module path in SAI (sgm) names → diffusers names (the path matched the ``unet_sai`` grammar)."""
    if path in S.SAI_TOP:
        return S.SAI_TOP[path]
    parts = path.split(".")
    top, n, sub, rest = parts[0], int(parts[1]), parts[2], ".".join(parts[3:])
    if top == "middle_block":  # middle_block.N.<layer>: no sub-block index
        rest = ".".join(parts[2:])
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{n // 2}.{S.SAI_RESNET[rest]}"
    if top == "input_blocks":
        i, j = (n - 1) // (_L + 1), (n - 1) % (_L + 1)
        if rest == "op":
            return f"down_blocks.{i}.downsamplers.0.conv"
        if sub == "1":
            return f"down_blocks.{i}.attentions.{j}.{rest}"
        return f"down_blocks.{i}.resnets.{j}.{S.SAI_RESNET[rest]}"
    i, j = n // (_L + 1), n % (_L + 1)  # output_blocks
    if rest == "conv":
        return f"up_blocks.{i}.upsamplers.0.conv"
    if sub == "1":
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    return f"up_blocks.{i}.resnets.{j}.{S.SAI_RESNET[rest]}"


def diffusers_to_sai(path: str, up_blocks_with_attentions) -> str | None:
    """The inverse of :func:`sai_to_diffusers`; None for a path SAI has no name for."""
    if path in _SAI_TOP_INV:
        return _SAI_TOP_INV[path]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if m:
        blocks, i, what, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if blocks == "down_blocks":
            if what == "downsamplers":
                return f"input_blocks.{(_L + 1) * (i + 1)}.0.op" if rest == "conv" else None
            n = (_L + 1) * i + j + 1
        else:
            if what == "upsamplers":
                sub = 2 if i in up_blocks_with_attentions else 1
                return f"output_blocks.{(_L + 1) * i + _L}.{sub}.conv" if rest == "conv" else None
            n = (_L + 1) * i + j
        top = "input_blocks" if blocks == "down_blocks" else "output_blocks"
        if what == "attentions":
            return f"{top}.{n}.1.{rest}"
        return f"{top}.{n}.0.{_SAI_RES_INV[rest]}" if rest in _SAI_RES_INV else None
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        rest = m.group(3)
        return f"middle_block.{2 * int(m.group(2))}.{_SAI_RES_INV[rest]}" if rest in _SAI_RES_INV else None
    return None


# ------------------------------------------------------------------------------------------------ Flux
@dataclass(frozen=True)
class FluxPart:
    bfl: str  # BFL module path (dotted)
    index: int  # which part of the fused module
    parts: tuple[str, ...]  # the diffusers paths of all parts
    split: str | None  # "equal", "qkv_mlp", "swap" or None


def _flux_rx(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FLUX_BFL = [(_flux_rx(b), b, d, s) for b, d, s in S.FLUX_MAP]
_FLUX_DIFF = [(_flux_rx(p), b, d, s, k) for b, d, s in S.FLUX_MAP for k, p in enumerate(d)]


def flux_to_diffusers(bfl: str) -> tuple[tuple[str, ...], str | None] | None:
    """(diffusers paths, split) of a BFL module path; None if the map has no entry."""
    for rx, _b, d, s in _FLUX_BFL:
        m = rx.fullmatch(bfl)
        if m:
            i = m.groupdict().get("i")
            return tuple(p.replace("{i}", i or "") for p in d), s
    return None


def diffusers_to_flux(path: str) -> FluxPart | None:
    for rx, b, d, s, k in _FLUX_DIFF:
        m = rx.fullmatch(path)
        if m:
            i = m.groupdict().get("i") or ""
            return FluxPart(bfl=b.replace("{i}", i), index=k, parts=tuple(p.replace("{i}", i) for p in d), split=s)
    return None


def split_rows(split: str, rows: int, in_features: int, n: int) -> list[tuple[int, int]]:
    """Row ranges of the parts of a fused B with ``rows`` rows: equal thirds (qkv), or hidden×3 + the MLP rest
    with hidden = the layer's in-features (linear1)."""
    if split == "equal":
        if rows % n:
            raise ValueError(f"{rows} rows do not split into {n} equal parts")
        e = rows // n
        sizes = [e] * n
    else:  # qkv_mlp
        mlp = rows - 3 * in_features
        if mlp <= 0:
            raise ValueError(f"{rows} rows cannot hold q, k, v of width {in_features} and an MLP")
        sizes = [in_features] * 3 + [mlp]
    out, at = [], 0
    for s in sizes:
        out.append((at, at + s))
        at += s
    return out
