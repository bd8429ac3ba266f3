"""Shape rules: re-express a delta with other factors, exactly (no SVD, no rounding: only copies and zeros)."""

from __future__ import annotations

import torch

from ..adapter import FusedQKV, ModuleDelta
from ..errors import LoraMigrateError
from .registry import rule


def _zeros(t: torch.Tensor, shape) -> torch.Tensor:
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


@rule("pad_rank")
def pad_rank(d: ModuleDelta, r: int) -> ModuleDelta:
    """A' = [A; 0], B' = [B, 0] up to rank r. B'A' = BA exactly (the new rows and columns meet only zeros).

    For conv factors the zero rows/columns keep the kernel dimensions. For stacked experts (A (E, r, in), B (E, out,
    r)) every expert is padded alike: B[e]'A[e]' = B[e]A[e]. Used where a target holds one rank per adapter
    (AdapterHub configs, mlx-lm) or per layer type (LoRAX, vLLM).
    """
    if d.A is None or d.fused is not None:
        raise LoraMigrateError(f"{d.module}: pad_rank needs a plain LoRA pair")
    lead = 1 if d.kind == "experts" else 0  # the experts axis comes first
    k = d.A.shape[lead]
    if r < k:
        raise LoraMigrateError(f"{d.module}: cannot pad rank {k} down to {r}")
    if r == k:
        return d
    A = torch.cat([d.A, _zeros(d.A, (*d.A.shape[:lead], r - k, *d.A.shape[lead + 1:]))], dim=lead)
    B = torch.cat([d.B, _zeros(d.B, (*d.B.shape[:lead + 1], r - k, *d.B.shape[lead + 2:]))], dim=lead + 1)
    return d.replace(A=A, B=B)


@rule("expand_fused_qkv")
def expand_fused_qkv(d: ModuleDelta) -> ModuleDelta:
    """AdapterHub ``LoRAMergedLinear`` (A: (n·r, in), B: (n·E, r), n enabled thirds) → one LoRA pair of rank n·r
    on the fused layer: A' = A, B' = block-sparse (3E, n·r) with B' [third_g·E:(third_g+1)·E, g·r:(g+1)·r] = B_g.
    Then B'A' puts B_g·A_g in the rows of third g and zeros elsewhere: the same ΔW, with no SVD."""
    if d.fused is None:
        return d
    A, B = d.factors()
    return d.replace(A=A, B=B, fused=None)


@rule("to_fused_qkv")
def to_fused_qkv(d: ModuleDelta) -> ModuleDelta:
    """One LoRA pair on a fused QKV layer (A: (r, in), B: (3E, r)) → ``LoRAMergedLinear`` with all three thirds
    enabled: A' = [A; A; A] (3r, in), B' = B (3E, r), groups (q, k, v). Group g computes B[g·E:(g+1)·E]·A, which
    is row block g of B·A: the same ΔW, exactly, at the same config rank r."""
    if d.fused is not None:
        return d
    if d.A is None or d.B.shape[0] % 3:
        raise LoraMigrateError(f"{d.module}: a fused QKV layer needs 3·E outputs, got {d.B.shape[0]}")
    return d.replace(A=torch.cat([d.A, d.A, d.A], dim=0), fused=FusedQKV((0, 1, 2)))


@rule("pissa_to_lora")
def pissa_to_lora(d: ModuleDelta, init: ModuleDelta) -> ModuleDelta:
    """PiSSA / OLoRA / CorDA / LoRA-GA → plain LoRA against the original weights (PEFT subtract_mutated_init).

    Training started from W = W_res + s·B₀A₀ and ends at W_res + s·BA, so relative to the original W the update
    is ΔW = s·(BA − B₀A₀) = s·B'A' with A' = [A; A₀] (2r, in) and B' = [B, −B₀] (out, 2r). The scale s is the
    same; a writer that derives alpha from (s, 2r) gets 2α (alpha/r) or √2·α (alpha/√r), as PEFT does.
    """
    if init.A is None or tuple(init.A.shape) != tuple(d.A.shape) or tuple(init.B.shape) != tuple(d.B.shape):
        raise LoraMigrateError(f"{d.module}: the initial adapter's factors {tuple(init.A.shape)} / "
                               f"{tuple(init.B.shape)} do not match the trained ones")
    if init.scale != d.scale:
        raise LoraMigrateError(f"{d.module}: the initial adapter's scale {init.scale:g} differs from {d.scale:g}")
    A = torch.cat([d.A, init.A.to(d.A.dtype)], dim=0)
    B = torch.cat([d.B, -init.B.to(d.B.dtype)], dim=1)
    return d.replace(A=A, B=B)


@rule("rope_rows_interleave")
def rope_rows_interleave(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k output (B (out, r), or a magnitude (out,)) from the HF rotary layout (per head: the first halves
    of the rotated pairs, then the second halves) to the interleaved one (checkpoints whose rotary embedding pairs adjacent rows):
    ``view(n, 2, hd/2, …).transpose(1, 2)``. A row permutation P, so P·(B·A) = (P·B)·A: A is unchanged and ΔW'
    = P·ΔW exactly (only copies)."""
    return _per_head(t, n_heads, (2, -1))


@rule("rope_rows_deinterleave")
def rope_rows_deinterleave(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``rope_rows_interleave``: interleaved rows → HF layout, ``view(n, hd/2, 2, …).transpose(1,
    2)``. Exact (only copies)."""
    return _per_head(t, n_heads, (-1, 2))


def _per_head(t: torch.Tensor, n: int, split: tuple[int, int]) -> torch.Tensor:
    out = t.shape[0]
    if n <= 0 or out % n or (out // n) % 2:
        raise LoraMigrateError(f"cannot permute {out} rows per head over {n} heads (head size must be even)")
    hd = out // n
    a, b = (2, hd // 2) if split[0] == 2 else (hd // 2, 2)
    return t.reshape(n, a, b, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
