"""Value rules: what the numbers in a module must satisfy before they are written."""

from __future__ import annotations

import torch

from ..adapter import ModuleDelta
from ..errors import LoraMigrateError, UnsupportedFeature
from ..check.exact import all_finite
from .registry import rule


class NonFiniteValues(LoraMigrateError):
    """A tensor of the source holds NaN or ±Inf (bad input, exit code 2 unless --allow-nonfinite)."""


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count); the common all-finite case costs one sum (:func:`check.exact.all_finite`); 0, 0 for
    integer tensors."""
    if all_finite(t):
        return 0, 0
    return int(torch.isnan(t).sum().item()), int(torch.isinf(t).sum().item())


@rule("refuse_nonfinite")
def refuse_nonfinite(d: ModuleDelta, *, allow: bool = False) -> list[str]:
    """ΔW = s·B·A is only a meaningful delta if every element of A, B (and the bias) is finite: a NaN or Inf in one
    element makes whole rows or columns of ΔW NaN, and the numeric check cannot compare it. Such a module is
    refused with its name and the counts; with ``allow`` (``--allow-nonfinite``) it is passed through as it is
    (the rescale of B still applies: c·NaN = NaN, c·Inf = Inf) and the note is returned instead."""
    found = []
    tensors = (("lora_A", d.A), ("lora_B", d.B), ("bias", d.bias), ("magnitude", getattr(d, "magnitude", None)))
    for label, t in tensors:
        if t is None:
            continue
        nan, inf = count_nonfinite(t)
        if nan or inf:
            what = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if x)
            found.append(f"{label} holds {what} of {t.numel()} values")
    if not found:
        return []
    msg = f"module {d.module}: {'; '.join(found)}"
    if not allow:
        raise NonFiniteValues(msg + " (pass --allow-nonfinite to convert it as it is)")
    return [msg + " (passed through: --allow-nonfinite)"]


@rule("refuse_overflow")
def refuse_overflow(out: ModuleDelta, source_scale: float, source_b=None) -> None:
    """A source whose factors are all finite must give an output whose factors are too. Folding a scale c into B
    (B' = c·B) overflows the dtype when |c·B| exceeds its largest value (float32: 3.4e38, float16: 65504), e.g.
    an alpha of 5e38; such a module cannot be held by the target in that dtype and is refused, not written as Inf.
    Likewise downwards (``source_b`` given, c < 1): when even the largest |c·B| is below the dtype's smallest normal
    number (an alpha of 1e-180), every value of B' loses precision or becomes 0 — refused, not written as zeros."""
    for label, t in (("lora_A", out.A), ("lora_B", out.B), ("bias", out.bias)):
        if t is not None and not all_finite(t):
            raise UnsupportedFeature(
                f"module {out.module}: the source scale {source_scale:g} folded into {label} overflows "
                f"{str(t.dtype).removeprefix('torch.')}; the target cannot hold it in that dtype")
    c = abs(source_scale / out.scale) if out.scale else 1.0
    if source_b is not None and c < 1.0 and source_b.numel() and out.B.is_floating_point():
        top = float(source_b.abs().max())
        if 0.0 < top and c * top < torch.finfo(out.B.dtype).tiny:
            raise UnsupportedFeature(
                f"module {out.module}: the source scale {source_scale:g} folded into lora_B underflows "
                f"{str(out.B.dtype).removeprefix('torch.')} (its largest value becomes {c * top:.3g}); the target "
                "cannot hold it in that dtype")
