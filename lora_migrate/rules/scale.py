"""Scale rules: move the effective scale between the factors and the config, without changing ΔW."""

from __future__ import annotations

import math
import torch

from ..adapter import ModuleDelta, ScaleProvenance
from ..errors import UnsupportedFeature
from ..schemas import Convention
from .registry import rule

# Two scales closer than this are the same scale: rescaling by 1 ± 1e-12 changes no fp32/bf16/fp16 value.
SAME = 1e-12


_EXACT_IN_F32 = (torch.float16, torch.bfloat16, torch.float32)


def _mul(t: torch.Tensor | None, c: float) -> torch.Tensor | None:
    """c·t rounded once to t's dtype (the product is formed in float64).

    Fast path, same bits: for c = 2^k with 1 ≤ c ≤ 2^127 and fp16/bf16/fp32, ``t * c`` in t's own dtype. torch
    forms an fp16/bf16 product in float32 (and an fp32 one in float32), where a power-of-two multiply is exact
    (no rounding; no underflow for c ≥ 1; c itself is a float32 value), so the one rounding to t's dtype, or the
    overflow to inf, is the same as from float64 (checked exhaustively for fp16/bf16 in the tests). One pass over
    t, no float32 or float64 copy.
    """
    if t is None:
        return None
    if t.device.type == "meta":
        return t
    if t.dtype in _EXACT_IN_F32 and 1.0 <= c <= 2.0**127 and math.frexp(c)[0] == 0.5:
        return t * c
    return (t.to(torch.float64) * c).to(t.dtype)


@rule("rescale")
def rescale(d: ModuleDelta, scale: float, provenance: ScaleProvenance) -> ModuleDelta:
    """B' = (s/s')·B, bias' = (s/s')·bias, scale := s'. Then s'·B'·A = s·B·A and s'·bias' = s·bias.

    For (IA)³, l' = (s/s')·l, so (W x + b) ⊙ (s'·l') = (W x + b) ⊙ (s·l). A is never touched. With s' = 1 this is
    "fold the scale into B".
    """
    if not (math.isfinite(scale) and scale != 0):
        raise UnsupportedFeature(f"{d.module}: target scale {scale} cannot carry a delta")
    c = d.scale / scale
    if abs(c - 1.0) <= SAME:
        return d.replace(scale=scale, provenance=provenance)
    return d.replace(B=_mul(d.B, c), bias=_mul(d.bias, c), scale=scale, provenance=provenance)


@rule("choose_alpha")
def choose_alpha(modules: list[tuple[str, float, int]], target: Convention, source_alpha: float | None,
                 r: int) -> tuple[float, dict[str, float]]:
    """Pick the alpha to write so that as few modules as possible need a rescale.

    ``modules`` is (layer kind, source scale s, rank r). For each candidate alpha the target gives scale
    t = rule_kind(alpha, r); a module with t = s keeps its factors bit for bit; the others get ``rescale`` to t.
    Candidates: alpha solving rule_kind(alpha, r) = s for some module, the source alpha, and r. Conventions that
    must write alpha = r (adapters-1.0, see its schema) get alpha = r. Ties prefer the source alpha, then r.
    Returns (alpha, {kind: target scale}).
    """
    kinds = sorted({k for k, _, _ in modules})
    missing = [k for k in kinds if k not in target.scaling]
    if missing:
        raise UnsupportedFeature(f"{target.name} cannot express {', '.join(missing)} layers")

    def targets(alpha: float) -> dict[str, float]:
        return {k: target.scale(k, alpha, r) for k in kinds}

    if target.alpha_equals_r_on_write:
        return float(r), targets(float(r))
    cands = [a for a in (source_alpha, float(r)) if a is not None]
    for k, s, _ in modules:
        a = target.scaling[k].alpha_for(s, r)
        if a is not None and math.isfinite(a) and a > 0:
            cands.append(a)

    def kept(alpha: float) -> int:
        t = targets(alpha)
        return sum(abs(s / t[k] - 1) <= SAME for k, s, _ in modules)

    order = {a: i for i, a in enumerate(dict.fromkeys(cands))}
    best = max(order, key=lambda a: (kept(a), -order[a]))
    return best, targets(best)


@rule("module_alpha")
def module_alpha(scale: float, r: int, rule_out, source_alpha: float | None = None, rule_in=None) -> float:
    """The alpha a PEFT-style writer stores for a module so that rule_out(alpha, r) = s, leaving B untouched.

    Same rule as the source: the source alpha, unchanged. rsLoRA (s = α/√r) into alpha/r: α' = α·√r, computed
    from α itself (not the rounded s), so that α'/r = α/√r to the last bit where it can be. (The workaround posted
    for LoRAX, α' = α·r, over-scales by √r: 2.83× at r = 8.) Otherwise α' = rule_out.alpha_for(s, r).
    """
    if source_alpha is not None and rule_in is not None and rule_in == rule_out:
        return float(source_alpha)
    if (source_alpha is not None and rule_in is not None and rule_in.value == "alpha/sqrt(r)"
            and rule_out.value == "alpha/r"):
        return float(source_alpha) * math.sqrt(r)
    a = rule_out.alpha_for(scale, r)
    if a is None or not (math.isfinite(a) and a > 0):
        raise UnsupportedFeature(f"scale {scale:g} cannot be expressed with {rule_out.value} at r={r}")
    return a
