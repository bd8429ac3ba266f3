"""The numeric proof that a migration kept the math: compare source and output deltas module by module.

For LoRA modules the quantity that matters is ΔW = s · B @ A (out × in). It is never formed. Its Frobenius norm and
the Frobenius distance between two deltas come from the *Gram identity* of the stacked factors

    Bs = [s1·B1, −s2·B2]   (out × k),   As = [A1; A2]   (k × in),   k = r1 + r2
    ‖s1·B1A1 − s2·B2A2‖²_F = ‖Bs·As‖²_F = tr((BsᵀBs)(AsAsᵀ))

evaluated in factored form: a QR factorisation Asᵀ = Q·R (R: m × k, m = min(in, k)) gives AsAsᵀ = RᵀR, hence

    ‖Bs·As‖_F = ‖Bs·Rᵀ‖_F = ‖s1·B1R1ᵀ − s2·B2R2ᵀ‖_F      (R = [R1 R2] split by columns like As by rows)

M_i = s_i·B_i·R_iᵀ (out × m) are the rows of each ΔW written in one orthonormal basis of the joint row space, so the
difference is taken element by element. Summing tr((BsᵀBs) ⊙ (AsAsᵀ)) directly would instead subtract squared norms
(‖S1‖² + ‖S2‖² − 2⟨S1, S2⟩) and cannot resolve a relative error below ≈ sqrt(ε64) ≈ 1e-8: measured on 512×512,
r = 8, it reads anything from 0 to 6e-9 for deltas that differ by 0 … 1e-9, and 1e-8 to ±10 %. The factored form
has a floor of ≈ 5e-16 and reads 1e-14 … 1e-6 to three digits. That is a comfortable margin for fp32 (tolerance
2.4e-7, only ~40× above the literal Gram floor) and the only way float64 (tolerance 1e-12) can be checked at all.

Cost: one float64 upcast of the factors, a QR of an (in × k) matrix and an (out × k)·(k × m) product — O((in+out)·k²)
flops and O((in+out)·k) memory, nothing of size out × in. When A1 = A2 (a scale folded into B, the common case) or
B1 = B2 only the shared factor is factorised.

Independently of that, ``probes`` seeded random float64 vectors x are pushed through both deltas (y = s·B(Ax)) and
compared directly; this needs no identity at all and catches anything the Gram path could hide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..adapter import ModuleDelta
from .exact import exactly_rescaled
from .report import (ModuleCheck, VerifyReport, build_report, delta_dtypes, extra, missing, storage_tolerance,
                     tolerance_for)

_F64 = torch.float64
_TINY = torch.finfo(_F64).tiny  # keeps 0/0 at 0 in the absolute criterion


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=_F64)


def _num(x: float) -> float:
    """NaN (from non-finite inputs) would make max() order dependent; report it as +inf."""
    return float("inf") if math.isnan(x) else float(x)


def _within(x: float | None, tol: float) -> bool:
    return x is None or x <= tol  # False for inf


def _qr_r(M: Tensor) -> Tensor:
    """R of a reduced QR of M (n × k), shape (min(n, k), k); only R is formed."""
    if M.shape[1] == 0 or M.shape[0] == 0:
        return M.new_zeros(min(M.shape), M.shape[1])
    return torch.linalg.qr(M, mode="r")[1]


def _coordinates(
    A1: Tensor, B1: Tensor, s1: float, A2: Tensor, B2: Tensor, s2: float
) -> tuple[Tensor, Tensor]:
    """M1, M2 with ‖M1‖ = ‖s1B1A1‖_F and ‖M1 − M2‖ = ‖s1B1A1 − s2B2A2‖_F (float64 inputs, see module docstring)."""
    if A1.shape == A2.shape and torch.equal(A1, A2):  # shared A: ΔW_i = (s_i B_i)·A, A = (QR)ᵀ
        R = _qr_r(A1.T)
        return (B1 @ R.T) * s1, (B2 @ R.T) * s2
    if B1.shape == B2.shape and torch.equal(B1, B2):  # shared B = QR: ΔW_i = Q·(R s_i A_i)
        R = _qr_r(B1)
        return (R @ A1) * s1, (R @ A2) * s2
    r1 = A1.shape[0]
    R = _qr_r(torch.cat([A1, A2], 0).T)  # .T of a row-major stack is column-major: what LAPACK wants
    return (B1 @ R[:, :r1].T) * s1, (B2 @ R[:, r1:].T) * s2


def _shared_factor_norms(
    A1: Tensor, B1: Tensor, s1: float, A2: Tensor, B2: Tensor, s2: float
) -> tuple[float, float] | None:
    """(‖ΔW_src‖_F, ‖ΔW_src − ΔW_out‖_F) when one factor is the same on both sides, else None.

    With A shared, ΔW_src − ΔW_out = D·A where D = s1·B1 − s2·B2 is formed element by element in float64, so
    nothing large cancels, and ‖D·A‖² = Σ (D·G) ⊙ D with the Gram matrix G = A·Aᵀ (r × r). Every rescale is this
    case (A untouched). Because D is already the difference, the quadratic form needs precision relative to
    ‖D·A‖ only, not to ‖ΔW‖: it runs in float32 and sums in float64, which reads ‖D·A‖ to ~1e-6 of itself
    (less where D·A nearly cancels, ‖D·A‖ ≪ ‖D‖‖A‖), far finer than the fp32/fp16/bf16 tolerances; the float64
    probes check independently. float64 inputs (tolerance 1e-12) take the QR form. Likewise with B shared.
    """
    if _F64 in (A1.dtype, B1.dtype, A2.dtype, B2.dtype):
        return None  # float64 inputs are checked to 1e-12: the QR form, which does not square the condition
    if A1.shape == A2.shape and torch.equal(A1, A2):
        F, D, S, left = A1, B1.double() * s1 - B2.double() * s2, B1.double() * s1, False
    elif B1.shape == B2.shape and torch.equal(B1, B2):
        F, D, S, left = B1, A1.double() * s1 - A2.double() * s2, A1.double() * s1, True
    else:
        return None
    work = torch.float32
    kF = _pow2_scale(F)
    F = (F.double() / kF).to(work)
    G = F.T @ F if left else F @ F.T

    def norm(M: Tensor) -> float:
        k = _pow2_scale(M)
        M = (M / k).to(work)
        P = G @ M if left else M @ G
        return k * kF * math.sqrt(max(P.mul_(M).sum(dtype=_F64).item(), 0.0))

    return norm(S), norm(D)


def _pow2_scale(t: Tensor) -> float:
    """A power of two ≥ max |t| (1 for a zero tensor): dividing by it is exact and brings every element into
    [-1, 1], so that the float32 quadratic form above cannot overflow, whatever the scale (an alpha of 1e26 made
    s·B ≈ 1e25, its square inf in float32, and the check report a false mismatch)."""
    m = t.abs().max().item() if t.numel() else 0.0
    return 2.0 ** math.frexp(m)[1] if m > 0 and math.isfinite(m) else 1.0


def _probe_rel(y_src: Tensor, y_out: Tensor, fallback: Tensor, floor: Tensor | None = None) -> float:
    """max over columns of ‖y_src − y_out‖ / ‖y_src‖ (``fallback`` per column where ‖y_src‖ = 0; with ``floor``,
    the denominator is at least that)."""
    if y_src.shape[1] == 0:
        return 0.0
    num = torch.linalg.vector_norm(y_src - y_out, dim=0)
    den = torch.linalg.vector_norm(y_src, dim=0)
    den = torch.where(den > 0, den, fallback)
    if floor is not None:
        den = torch.maximum(den, floor)
    return _num((num / den).max().item())


def _vector_rel(v_src: Tensor, v_out: Tensor) -> float:
    """‖v_src − v_out‖ / ‖v_src‖; against ‖v_out‖ when v_src = 0 (so 0 vs 0 → 0, 0 vs nonzero → 1)."""
    diff = torch.linalg.vector_norm(v_src - v_out).item()
    den = torch.linalg.vector_norm(v_src).item()
    if den == 0.0:
        den = torch.linalg.vector_norm(v_out).item() + _TINY
    return _num(diff / den)


def _shape_mismatch(module: str, tol: float, detail: str) -> ModuleCheck:
    return ModuleCheck(module=module, status="shape_mismatch", tolerance=tol, ok=False, detail=detail)


def _lora_shape_problem(A: Tensor | None, B: Tensor) -> str | None:
    if A is None:
        return "LoRA delta without A"
    if A.dim() != 2 or B.dim() != 2:
        return f"factors are not matrices (A {tuple(A.shape)}, B {tuple(B.shape)})"
    if A.shape[0] != B.shape[1]:
        return f"inner dimensions disagree: B {tuple(B.shape)} @ A {tuple(A.shape)}"
    return None


def compare(src: ModuleDelta, out: ModuleDelta, *, probes: int = 4, seed: int = 0,
            finite_source: bool = False) -> ModuleCheck:
    """:func:`_compare_update`, and a DoRA magnitude vector (which is carried over, never rewritten) must be
    present on both sides or neither, and equal bit for bit. ``finite_source``: see :func:`exactly_rescaled`."""
    if src.kind == "experts" and out.kind == "experts":
        check = _compare_experts(src, out, probes=probes, seed=seed, finite_source=finite_source)
    else:
        check = _compare_update(src, out, probes=probes, seed=seed, finite_source=finite_source)
    m1, m2 = src.magnitude, out.magnitude
    if (m1 is None) != (m2 is None) or (m1 is not None and not torch.equal(m1, m2)):
        return check.model_copy(update=dict(ok=False, status="mismatch",
                                            detail="DoRA magnitude vector differs or is missing"))
    return check


def _compare_experts(src: ModuleDelta, out: ModuleDelta, **kw) -> ModuleCheck:
    """Stacked experts (A (E, r, in), B (E, out, r)): every expert's ΔW_e = s·B[e]@A[e] is its own matrix that the
    model applies to the tokens routed to it, so each is compared as a LoRA pair (:func:`_compare_update`) and the
    module passes only if every expert does. Reported: the worst expert's relative errors (a stronger criterion
    than the error of the whole stack against its norm) and the stack's norm √Σ‖ΔW_e‖²."""
    tol = max(tolerance_for(*delta_dtypes(src), *delta_dtypes(out)), storage_tolerance(src, out))
    for side, d in (("source", src), ("output", out)):
        if d.A is None or d.A.dim() != 3 or d.B.dim() != 3 or d.A.shape[:2] != (d.B.shape[0], d.B.shape[2]):
            shapes = "no A" if d.A is None else f"A {tuple(d.A.shape)}, B {tuple(d.B.shape)}"
            return _shape_mismatch(src.module, tol, f"{side}: experts factors are not (E, r, in) / (E, out, r): {shapes}")
    if src.A.shape[0] != out.A.shape[0]:
        return _shape_mismatch(src.module, tol, f"{src.A.shape[0]} experts in source vs {out.A.shape[0]} in output")
    exact = exactly_rescaled(src.A, src.B, float(src.scale), out.A, out.B, float(out.scale),
                             finite_source=kw.get("finite_source", False))
    if exact is not None:  # the whole stack at once (it holds per expert if it holds for all): one pass, not E
        return ModuleCheck(module=src.module, status="ok", rel_fro=0.0, rel_probe=0.0, tolerance=tol, ok=True,
                           detail=exact)
    src, out = (d.replace(A=d.A.contiguous(), B=d.B.contiguous()) for d in (src, out))  # no-ops when they are
    checks = [_compare_update(src.expert(e), out.expert(e), **kw) for e in range(src.A.shape[0])]
    bad = [c for c in checks if not c.ok]
    worst = bad[0] if bad else max(checks, key=lambda c: (c.rel_fro or 0.0, c.rel_probe or 0.0))
    norm = math.sqrt(sum((c.norm or 0.0) ** 2 for c in checks))
    detail = f"{len(bad)} of {len(checks)} experts differ; first: {worst.module}: {worst.detail}" if bad else \
        "; ".join(sorted({c.detail for c in checks if c.detail}))
    return worst.model_copy(update=dict(module=src.module, norm=_num(norm), detail=detail,
                                        rel_fro=max((c.rel_fro for c in checks if c.rel_fro is not None), default=None),
                                        rel_probe=max((c.rel_probe for c in checks if c.rel_probe is not None),
                                                      default=None)))


def _compare_update(src: ModuleDelta, out: ModuleDelta, *, probes: int = 4, seed: int = 0,
                    finite_source: bool = False) -> ModuleCheck:
    """Check that ``out`` applies the same update as ``src`` (ΔW, Δb; (IA)³ vectors), to within the dtype tolerance.

    Ranks may differ (zero padding, re-expressions); out/in dimensions, kind and bias length must agree. All
    arithmetic is float64. Relative errors are against the source; where the source delta is exactly zero (an
    untrained B) the distance is measured against |s1|‖B1‖‖A1‖ + |s2|‖B2‖‖A2‖ instead, so zero vs zero passes and zero
    vs nonzero fails.
    """
    module = src.module
    tol = max(tolerance_for(*delta_dtypes(src), *delta_dtypes(out)), storage_tolerance(src, out))
    if src.kind != out.kind:
        return _shape_mismatch(module, tol, f"kind {src.kind} in source vs {out.kind} in output")

    A1, B1 = src.factors()
    A2, B2 = out.factors()
    s1, s2 = float(src.scale), float(out.scale)
    notes: list[str] = []

    if src.kind == "ia3":
        l1, l2 = B1.reshape(-1), B2.reshape(-1)
        if l1.shape != l2.shape:
            return _shape_mismatch(module, tol, f"(IA)³ vector length {l1.numel()} vs {l2.numel()}")
        n_out = l1.numel()
        v1, v2 = _f64(l1) * s1, _f64(l2) * s2
        norm = torch.linalg.vector_norm(v1).item()
        rel_fro = _vector_rel(v1, v2)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n_out, probes, generator=g, dtype=_F64)
        ref = norm if norm > 0 else torch.linalg.vector_norm(v2).item() + _TINY
        rel_probe = _probe_rel(v1[:, None] * X, v2[:, None] * X, ref * torch.linalg.vector_norm(X, dim=0))
        if norm == 0.0:
            notes.append("source (IA)³ vector is zero; measured against the output's norm")
        ranks = "(IA)³"
    else:
        for side, A, B in (("source", A1, B1), ("output", A2, B2)):
            problem = _lora_shape_problem(A, B)
            if problem:
                return _shape_mismatch(module, tol, f"{side}: {problem}")
        if (B1.shape[0], A1.shape[1]) != (B2.shape[0], A2.shape[1]):
            return _shape_mismatch(
                module,
                tol,
                f"ΔW is {B1.shape[0]}×{A1.shape[1]} in source vs {B2.shape[0]}×{A2.shape[1]} in output",
            )
        n_out = B1.shape[0]
        exact = (exactly_rescaled(A1, B1, s1, A2, B2, s2, finite_source=finite_source)
                 if src.bias is None and out.bias is None else None)
        if exact is not None:
            return ModuleCheck(module=module, status="ok", rel_fro=0.0, rel_probe=0.0, tolerance=tol, ok=True,
                               detail=exact)
        shared = _shared_factor_norms(A1, B1, s1, A2, B2, s2)
        a1, b1, a2, b2 = _f64(A1), _f64(B1), _f64(A2), _f64(B2)
        if shared is not None:
            norm, diff = shared
        else:
            M1, M2 = _coordinates(a1, b1, s1, a2, b2, s2)
            norm = torch.linalg.matrix_norm(M1).item()
            diff = torch.linalg.matrix_norm(M1 - M2).item()
        if s1 == s2 and torch.equal(a1, a2) and torch.equal(b1, b2):
            diff = 0.0

        g = torch.Generator().manual_seed(seed)
        X = torch.randn(a1.shape[1], probes, generator=g, dtype=_F64)
        Y1 = (b1 @ (a1 @ X)) * s1
        Y2 = (b2 @ (a2 @ X)) * s2
        if norm > 0.0:
            rel_fro = _num(diff / norm)
            fallback = norm * torch.linalg.vector_norm(X, dim=0)
        else:
            fro = torch.linalg.matrix_norm
            ref = abs(s1) * fro(b1).item() * fro(a1).item() + abs(s2) * fro(b2).item() * fro(a2).item() + _TINY
            rel_fro = _num(diff / ref)
            fallback = ref * torch.linalg.vector_norm(X, dim=0)
            notes.append("source ΔW is zero; errors are against |s1|‖B1‖‖A1‖ + |s2|‖B2‖‖A2‖")
        # Factors rounded by a storage format (ModuleDelta.storage_error: A cast or block-quantized too, not only
        # B rescaled) carry error outside ΔW's row space, which a probe nearly orthogonal to it magnifies without
        # bound (at r = 4 the ratio of two χ²₄ draws: 5u seen on 1 of 56 probes for an fp16 cast). For them a
        # probe is measured against at least the typical ‖ΔW x‖ = ‖ΔW‖_F·‖x‖/√in of a Gaussian x.
        floor = (fallback / math.sqrt(a1.shape[1])) if (src.storage_error or out.storage_error) and norm > 0 \
            else None
        rel_probe = _probe_rel(Y1, Y2, fallback, floor)
        ranks = f"ranks {A1.shape[0]} / {A2.shape[0]}"

    rel_bias = None
    if src.bias is not None or out.bias is not None:
        b_src = _f64(src.bias).reshape(-1) * s1 if src.bias is not None else None
        b_out = _f64(out.bias).reshape(-1) * s2 if out.bias is not None else None
        for side, b in (("source", b_src), ("output", b_out)):
            if b is not None and b.numel() != n_out:
                return _shape_mismatch(module, tol, f"{side} bias has {b.numel()} entries for {n_out} outputs")
        if b_src is None:
            b_src = torch.zeros_like(b_out)
            notes.append("no bias in source (compared as zeros)")
        if b_out is None:
            b_out = torch.zeros_like(b_src)
            notes.append("no bias in output (compared as zeros)")
        rel_bias = _vector_rel(b_src, b_out)

    failed = [
        f"{name} {val:.3g} > {tol:.3g}"
        for name, val in (("Frobenius", rel_fro), ("probes", rel_probe), ("bias", rel_bias))
        if not _within(val, tol)
    ]
    ok = not failed
    if failed:
        notes.insert(0, "; ".join(failed) + f" (scales {s1:g} / {s2:g}, {ranks})" + _only_scale(src, out))
    return ModuleCheck(
        module=module,
        status="ok" if ok else "mismatch",
        rel_fro=rel_fro,
        rel_probe=rel_probe,
        rel_bias=rel_bias,
        norm=_num(norm),
        tolerance=tol,
        ok=ok,
        detail="; ".join(notes),
    )


def _only_scale(src: ModuleDelta, out: ModuleDelta) -> str:
    """Why a module failed, when both sides hold the same factors and only the effective scale differs: the ratio,
    and when it is √r the usual cause (one side reads alpha/√r, rsLoRA, the other alpha/r)."""
    A1, B1 = src.factors()
    A2, B2 = out.factors()
    same = all(x is not None and y is not None and x.shape == y.shape and torch.equal(x.to(y.dtype), y)
               for x, y in ((A1, A2), (B1, B2)))
    if not same or src.scale == out.scale or out.scale == 0:
        return ""
    k, r = src.scale / out.scale, A1.shape[0]
    why = ""
    if r > 1 and abs(k - math.sqrt(r)) <= 1e-6 * k:
        why = (f" = √r: the source scales by alpha/√r (rsLoRA), the output by alpha/r with the same alpha "
               f"(write alpha·√r = {out.scale * r * k:.6g} instead)")
    return f"; same factors, only the scale differs: source/output = {k:.6g}{why}"


def verify(
    src: Iterable[ModuleDelta] | Mapping[str, ModuleDelta],
    out: Iterable[ModuleDelta] | Mapping[str, ModuleDelta],
    *,
    probes: int = 4,
    seed: int = 0,
) -> VerifyReport:
    """Match modules by name, :func:`compare` each pair, and report missing/extra ones (source order first)."""
    import time

    t0 = time.perf_counter()

    def by_name(ds) -> dict[str, ModuleDelta]:
        items = ds.values() if isinstance(ds, Mapping) else ds
        table: dict[str, ModuleDelta] = {}
        for d in items:
            if d.module in table:
                raise ValueError(f"module {d.module!r} appears twice")
            table[d.module] = d
        return table

    s, o = by_name(src), by_name(out)
    checks = [compare(d, o[name], probes=probes, seed=seed) if name in o else missing(d) for name, d in s.items()]
    checks += [extra(d) for name, d in o.items() if name not in s]
    return build_report(checks, time.perf_counter() - t0)
