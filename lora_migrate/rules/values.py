"""Value rules: what the numbers in a module must satisfy before they are written."""

from __future__ import annotations

import torch

from ..adapter import ModuleDelta
from ..errors import LoraMigrateError
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
