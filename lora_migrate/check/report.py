"""The numeric check's verdicts: one :class:`ModuleCheck` per module, aggregated into a :class:`VerifyReport`,
against a relative-error tolerance tied to the dtypes involved (:func:`tolerance_for`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import pydantic
import torch

from ..adapter import ModuleDelta

Status = Literal["ok", "mismatch", "missing_in_output", "extra_in_output", "shape_mismatch", "nonfinite_allowed"]

_F64 = torch.float64

# unit roundoff u = 2^-(p) with p the significand precision (stored mantissa bits + 1)
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
for _name, _u in (
    ("float8_e4m3fn", 2.0**-4),
    ("float8_e4m3fnuz", 2.0**-4),
    ("float8_e5m2", 2.0**-3),
    ("float8_e5m2fnuz", 2.0**-3),
    ("float8_e8m0fnu", 2.0**-1),
):
    if hasattr(torch, _name):
        UNIT_ROUNDOFF[getattr(torch, _name)] = _u

FLOAT64_TOLERANCE = 1e-12


def tolerance_for(*dtypes: torch.dtype) -> float:
    """Relative-error threshold for deltas stored in ``dtypes``: 4·u of the coarsest floating dtype involved.

    Why 4·u (u = unit roundoff, 2^-24 for fp32, 2^-11 fp16, 2^-8 bf16, 2^-4 / 2^-3 for fp8 e4m3 / e5m2): an exact
    migration may still round each element once — folding a scale into a factor (fl(s·B)), or casting to the
    target dtype — and a per-element relative error ≤ u in B perturbs ΔW = B·A by ≤ u·‖|B||A|‖/‖BA‖ relative,
    i.e. u times a cancellation factor that is small (≈ 1-3) for real adapters; random rounding errors typically
    give ≈ 0.6·u (measured). 4·u leaves room for that amplification while keeping bf16 at 1.6 %, so that a wrong
    scale (alpha/r vs alpha/sqrt(r), a dropped factor 2, r/alpha, ...) is never inside it. The float64 evaluation itself adds ≈ 1e-15.
    float64 uses a fixed 1e-12 (4·u would be 4e-16, at the level of the evaluation's own error).
    Non-floating dtypes are exact and ignored; with no floating dtype at all the fp32 value is returned.
    Caveat: for fp8 the rule gives 0.25 (e4m3) and 0.5 (e5m2), which certifies little.
    """
    tol = 0.0
    for dt in dtypes:
        if dt is None or not dt.is_floating_point:
            continue
        if dt == _F64:
            t = FLOAT64_TOLERANCE
        else:
            u = UNIT_ROUNDOFF.get(dt)
            if u is None:
                u = torch.finfo(dt).eps / 2
            t = 4.0 * u
        tol = max(tol, t)
    return tol if tol > 0.0 else 4.0 * UNIT_ROUNDOFF[torch.float32]


def storage_tolerance(*deltas: ModuleDelta) -> float:
    """The relative-error threshold that block-quantized factors need (0 when none is): with each factor off by at
    most ε in Frobenius norm (``ModuleDelta.storage_error``, e.g. q8_0's √32·(1/254 + 2⁻¹¹) ≈ 0.025),
    ΔW' − ΔW = E_B·A + B·E_A + E_B·E_A, so ‖ΔW' − ΔW‖_F ≤ (2ε + ε²)·‖B‖‖A‖ — relative to ‖ΔW‖ the same cancellation
    factor as in :func:`tolerance_for` (≈ 1 for real adapters), taken as 1 here. For q8_0 that is 0.051: a wrong
    scale (a factor 2, α/r for α/√r at r ≥ 2, a lost alpha pattern) is still far outside it."""
    eps = max((d.storage_error or 0.0 for d in deltas), default=0.0)
    return 2 * eps + eps * eps


def delta_dtypes(d: ModuleDelta) -> list[torch.dtype]:
    """The dtypes of the tensors a delta holds (for :func:`tolerance_for`)."""
    return [t.dtype for t in (d.A, d.B, d.bias) if t is not None]


class ModuleCheck(pydantic.BaseModel):
    """The verdict for one module. Relative errors are against the source delta (see :func:`.compare.compare`)."""

    model_config = pydantic.ConfigDict(frozen=True, ser_json_inf_nan="strings")

    module: str
    status: Status
    rel_fro: float | None = None  # ‖ΔW_src − ΔW_out‖_F / ‖ΔW_src‖_F
    rel_probe: float | None = None  # max over probes of ‖(ΔW_src − ΔW_out)x‖ / ‖ΔW_src x‖
    rel_bias: float | None = None  # ‖s·b_src − s·b_out‖ / ‖s·b_src‖
    norm: float | None = None  # ‖ΔW_src‖_F (‖s·l‖ for (IA)³)
    tolerance: float
    ok: bool
    detail: str = ""


class VerifyReport(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(ser_json_inf_nan="strings")

    ok: bool
    modules: list[ModuleCheck]
    max_rel_fro: float
    max_rel_probe: float
    n_modules: int
    n_failed: int
    tolerance: float
    seconds: float

    def failures(self) -> list[ModuleCheck]:
        return [m for m in self.modules if not m.ok]

    def summary(self) -> str:
        head = (
            f"{self.n_modules} module{'' if self.n_modules == 1 else 's'}, max relative error "
            f"{self.max_rel_fro:.2g} (Frobenius) / {self.max_rel_probe:.2g} (probes), "
            f"tolerance {self.tolerance:.2g}"
        )
        if self.ok:
            skipped = sum(m.status == "nonfinite_allowed" for m in self.modules)
            return head + (f": OK ({skipped} with non-finite values not compared, --allow-nonfinite)"
                           if skipped else ": OK")
        if self.n_modules == 0:
            return head + ": FAILED (nothing was compared)"
        counts: dict[str, int] = {}
        for m in self.failures():
            counts[m.status] = counts.get(m.status, 0) + 1
        what = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return head + f": FAILED ({self.n_failed} of {self.n_modules}: {what})"


def _absent(status: Status, module: str | ModuleDelta, detail: str) -> ModuleCheck:
    if isinstance(module, ModuleDelta):
        return ModuleCheck(module=module.module, status=status, tolerance=tolerance_for(*delta_dtypes(module)),
                           ok=False, detail=detail)
    return ModuleCheck(module=module, status=status, tolerance=tolerance_for(), ok=False, detail=detail)


def missing(module: str | ModuleDelta, detail: str = "in the source adapter but not in the output") -> ModuleCheck:
    """A module of the source that the output lacks (a failure). Pass the delta to record its dtype tolerance."""
    return _absent("missing_in_output", module, detail)


def extra(module: str | ModuleDelta, detail: str = "in the output but not in the source adapter") -> ModuleCheck:
    """A module the output has and the source has not (a failure)."""
    return _absent("extra_in_output", module, detail)


def build_report(checks: Iterable[ModuleCheck], seconds: float) -> VerifyReport:
    """Aggregate module checks. ``ok`` needs at least one module and no failure (an empty comparison proves nothing).

    ``tolerance`` is the largest tolerance among compared modules (missing/extra ones carry no dtype information
    unless built from a delta; they count only when nothing was compared).
    """
    modules = list(checks)
    n_failed = sum(not m.ok for m in modules)
    compared = [m.tolerance for m in modules if m.status not in ("missing_in_output", "extra_in_output")]
    tols = compared or [m.tolerance for m in modules] or [tolerance_for()]
    return VerifyReport(
        ok=bool(modules) and n_failed == 0,
        modules=modules,
        max_rel_fro=max((m.rel_fro for m in modules if m.rel_fro is not None), default=0.0),
        max_rel_probe=max((m.rel_probe for m in modules if m.rel_probe is not None), default=0.0),
        n_modules=len(modules),
        n_failed=n_failed,
        tolerance=max(tols),
        seconds=float(seconds),
    )
