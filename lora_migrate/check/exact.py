"""Exact proofs: when a conversion copies A bit for bit and multiplies B by a power of two, s'·B'·A' = s·B·A holds
exactly, and :func:`exactly_rescaled` shows it with one elementwise pass, no norm and no matmul. Also the fast
tensor predicates it is built from, :func:`same_bytes` and :func:`all_finite`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .report import UNIT_ROUNDOFF

_F64 = torch.float64


def all_finite(t: Tensor) -> bool:
    """True if no element of ``t`` is NaN or ±Inf, in one fast pass for the common (finite) case.

    A sum in the tensor's own dtype (torch accumulates in float32 or wider) is finite exactly when no element is
    non-finite, unless the sum itself overflows; that rare case, and fp16 (whose result overflows at 65504) and
    fp8 (no native sum), are settled element by element.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in (torch.float32, torch.float64, torch.bfloat16) and math.isfinite(t.sum().item()):
        return True
    return bool(torch.isfinite(t).all().item())


def _power_of_two(c: float) -> bool:
    return math.isfinite(c) and c != 0.0 and abs(math.frexp(c)[0]) == 0.5


def _exact_work_dtype(*ts: Tensor) -> torch.dtype | None:
    """float32 if every value of ``ts`` is exactly a float32 value (fp8/fp16/bf16/fp32), float64 for float64."""
    dts = {t.dtype for t in ts}
    if _F64 in dts:
        return _F64 if dts <= {_F64, torch.float32, torch.float16, torch.bfloat16} else None
    if all(dt.is_floating_point and dt.itemsize <= 4 and dt in UNIT_ROUNDOFF for dt in dts):
        return torch.float32
    return None


_NATIVE_EXACT = (torch.float16, torch.bfloat16, torch.float32)


def _native_rescaled(x: Tensor, k: float, y: Tensor) -> bool:
    """y = fl(k·x) bit for bit and finite, for x, y of one dtype among fp16/bf16/fp32 and k = 2^j, 1 < k ≤ 2^127.

    torch forms an fp16/bf16 product in float32 and an fp32 one in float32; a power-of-two multiply there is exact
    (no underflow for k ≥ 1; k is a float32 value), so fl(k·x) is k·x exactly or ±inf on overflow, as in float64
    (checked exhaustively for fp16/bf16 in the tests). The product is formed in x's dtype, a cache-sized piece at a
    time into one small buffer (no float32 copy, no tensor-sized temporary whose pages must be faulted in),
    compared byte for byte with memcmp (``torch.equal`` compares values at a tenth of the speed) and tested for
    NaN/Inf while it is in the cache: equal bits are equal values except for NaN, and a finite product rules out
    an overflow. +0 vs −0 only costs the slower path."""
    if x.shape != y.shape:
        return False
    xf, yf = x.reshape(-1), y.reshape(-1)
    n = xf.numel()
    scratch = torch.empty(min(n, _PIECE), dtype=x.dtype)
    for i in range(0, n, _PIECE):
        j = min(i + _PIECE, n)
        piece = scratch[: j - i]
        torch.mul(xf[i:j], k, out=piece)
        if not (same_bytes(piece, yf[i:j]) and all_finite(piece)):
            return False
    return True


_PIECE = 1 << 18  # elements per step of _native_rescaled (512 KB of bf16)


def same_bytes(a: Tensor, b: Tensor) -> bool:
    """True if two CPU tensors of one dtype and shape hold the same bytes (in their contiguous layout)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = (t.detach().resolve_conj().resolve_neg().contiguous() for t in (a, b))
    n = a.numel() * a.element_size()
    if n == 0:
        return True
    if a.device.type == "cpu" and b.device.type == "cpu":
        import ctypes

        from ..io._common import libc_function

        memcmp = libc_function("memcmp", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int)
        if memcmp is not None:
            return a.data_ptr() == b.data_ptr() or memcmp(a.data_ptr(), b.data_ptr(), n) == 0
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def exactly_rescaled(A1: Tensor, B1: Tensor, s1: float, A2: Tensor, B2: Tensor, s2: float, *,
                     finite_source: bool = False) -> str | None:
    """A proof that s2·B2·A2 = s1·B1·A1 *exactly* (in real arithmetic), or None when there is none to be had cheaply.

    It holds when A2 = A1 bit for bit and B2 = c·B1 exactly with c = s1/s2 a power of two (1 included: factors
    copied bit for bit) and c·s2 = s1 exactly. A power-of-two multiply in binary floating point is exact unless it
    overflows or underflows, so the test is made in the direction that cannot underflow, B2 = fl(c·B1) if c ≥ 1,
    B1 = fl(B2/c) if c < 1, and in the factors' own dtype for fp16/bf16/fp32 (see :func:`_native_rescaled`),
    else in a dtype that holds every value of both sides exactly (float32 for fp8, float64 for float64); an
    overflow gives inf, which equals no finite value. All values must be finite (NaN ≠ NaN fails the test
    anyway). Then ΔW_out − ΔW_src = 0 and no norm, probe or matmul is needed: the cost is
    one elementwise pass over B and a comparison of A. This is the common case: every rescale by alpha/r with a
    power-of-two ratio (alpha = 2r, alpha = r, ...), and every module whose scale is kept.

    ``finite_source``: the caller has already found every value of A1 and B1 finite (the conversion's
    ``refuse_nonfinite``), so they are not scanned again; the rescaled side is still tested (an overflow).
    """
    c = s1 / s2 if s2 != 0 else float("nan")
    if not (_power_of_two(c) and c * s2 == s1):
        return None
    if A1.shape != A2.shape or B1.shape != B2.shape or A1.dtype != A2.dtype:
        return None
    work = _exact_work_dtype(B1, B2)
    if work is None or not (A1 is A2 or same_bytes(A1, A2)):
        return None
    # x, y: the side multiplied by k = max(c, 1/c) ≥ 1, and the side it must equal
    (x, y), k = ((B1, B2), c) if c >= 1.0 else ((B2, B1), 1.0 / c)
    if B1.dtype == B2.dtype and B1.dtype in _NATIVE_EXACT and k <= 2.0**127:
        if k == 1.0:
            y_finite = same_bytes(x, y) and (finite_source or all_finite(y))  # y = B1's bytes
        else:
            y_finite = _native_rescaled(x, k, y)  # y = fl(k·x), each piece tested finite as it is compared
        if not y_finite:
            return None
    else:
        kx = x.to(work) if k == 1.0 else x.to(work, copy=True).mul_(k)
        if not (torch.equal(kx, y.to(work)) and all_finite(y)):  # y = fl(k·x) exactly, and nothing overflowed
            return None
    if not (finite_source or all_finite(A1)):
        return None
    return "exact: A identical, B' = B" if c == 1.0 else f"exact: A identical, B' = {c:g}·B with no rounding"
