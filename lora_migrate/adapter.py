"""The one canonical in-memory form that sits between every reader and every writer.

Per adapted module the update is

    LoRA:   ΔW = s · B @ A        A: (r, in), B: (out, r), ΔW in nn.Linear layout (out, in)
            Δb = s · bias         (a LoRA bias, where a library has one)
    (IA)³:  y  = (W x + b) ⊙ (s · l)      l: (out,), stored as B with shape (out, 1) and A = None
    Embedding (PEFT ``lora_embedding_A/B``): A: (r, vocab), B: (dim, r); the table's update is (s · B @ A)ᵀ
    Conv (PEFT ``_ConvNd``): A: (r, in, *k), B: (out, r, 1, …); ΔW = s · B.flatten(1) @ A.flatten(1), reshaped
    DoRA: ``magnitude`` m (PEFT ``lora_magnitude_vector``) rides along; it needs the base weight to apply, so it
    is carried through between conventions that know DoRA and refused elsewhere
    Experts (MoE, one LoRA per expert on a stacked (E, …) weight: PEFT ``target_parameters``, mlx-lm
    ``LoRASwitchLinear``): A: (E, r, in), B: (E, out, r); ΔW_e = s · B[e] @ A[e] for every expert e, with one s

The effective scale ``s`` is kept apart from the factors (readers never fold it in) and its provenance — the alpha
and rank it came from and the rule that turned them into ``s`` — is recorded, so that every rewrite can be
explained. Rules and writers see only this form, never a library's key names.

A fused-QKV layer (AdapterHub ``LoRAMergedLinear``: GPT-2 ``c_attn``, DeBERTa ``in_proj``) keeps its compact
factors, A: (n·r, in) and B: (n·E, r), with a :class:`FusedQKV` structure naming the enabled thirds of the fused
output. :meth:`ModuleDelta.factors` expands it, exactly and without SVD, into an ordinary rank-n·r pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["lora", "ia3", "embedding", "conv", "experts"]


@dataclass(frozen=True)
class ScaleProvenance:
    """Where an effective scale came from: ``scale = rule(alpha, r)`` in ``convention``."""

    alpha: float | None
    r: int
    rule: str  # e.g. "alpha/r", "1.0 (unmerged LoRALinear, adapters<1.1)"
    convention: str

    def describe(self) -> str:
        a = "-" if self.alpha is None else f"{self.alpha:g}"
        return f"{self.rule} with alpha={a}, r={self.r} ({self.convention})"


@dataclass(frozen=True)
class FusedQKV:
    """Block structure of a fused-QKV LoRA (AdapterHub ``LoRAMergedLinear``).

    ``groups`` are the enabled thirds of the fused output in q, k, v order (0 = q, 1 = k, 2 = v). With n enabled
    groups, rank r and E = out_features / 3: group g uses A[g·r:(g+1)·r] and B[g·E:(g+1)·E], and its ΔW fills the
    fused output rows [groups[g]·E : (groups[g]+1)·E]. Rows of disabled thirds are zero.
    """

    groups: tuple[int, ...]

    def expand(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """(A, B) compact → (A, B_full) with ΔW = B_full @ A of shape (3E, in), exactly (B_full is block-sparse)."""
        n = len(self.groups)
        r = A.shape[0] // n
        E = B.shape[0] // n
        B_full = torch.zeros(3 * E, n * r, dtype=B.dtype, device=B.device)
        for g, third in enumerate(self.groups):
            B_full[third * E : (third + 1) * E, g * r : (g + 1) * r] = B[g * E : (g + 1) * E]
        return A, B_full


def delta_kind(layer_kind: str) -> Kind:
    """The ModuleDelta kind of a convention's layer kind (linear and fused QKV are both plain LoRA products)."""
    return layer_kind if layer_kind in ("ia3", "embedding", "conv", "experts") else "lora"


def config_rank(kind: str, fused: FusedQKV | None, a_rows: int | None) -> int:
    """r as a config counts it: 1 for (IA)³, A's rows per enabled group for fused QKV, else A's rows (per expert:
    ``a_rows`` is then A.shape[1])."""
    if kind == "ia3":
        return 1
    return a_rows // (len(fused.groups) if fused else 1)


@dataclass(frozen=True)
class ModuleDelta:
    """ΔW = scale · B @ A for one module of the base model (see the module docstring for (IA)³ and fused QKV)."""

    module: str  # the base model's module path, as the checkpoint names it
    B: Tensor
    scale: float
    provenance: ScaleProvenance
    A: Tensor | None = None
    kind: Kind = "lora"
    bias: Tensor | None = None
    fused: FusedQKV | None = None
    magnitude: Tensor | None = None
    # block-quantized storage the factors went through (GGUF q8_0): a bound on ‖x̂ − x‖_F / ‖x‖_F per factor that
    # their dtype does not show (they are dequantized values); the check's tolerance follows it
    storage_error: float | None = None

    @property
    def rank(self) -> int:
        """The rank r as the library's config counts it (per group for fused QKV)."""
        return config_rank(self.kind, self.fused, None if self.A is None else self.A.shape[-2])

    @property
    def experts(self) -> int | None:
        """E for a stacked-experts delta, else None."""
        return self.A.shape[0] if self.kind == "experts" else None

    def expert(self, e: int) -> "ModuleDelta":
        """Expert ``e`` of a stacked-experts delta as a plain LoRA pair: ΔW_e = scale · B[e] @ A[e]."""
        return replace(self, A=self.A[e], B=self.B[e], kind="lora", module=f"{self.module}[{e}]")

    def factors(self) -> tuple[Tensor | None, Tensor]:
        """(A, B) such that ΔW = scale · B @ A holds for a plain (non-fused) product (per expert for experts:
        A (E, r, in), B (E, out, r))."""
        if self.fused is not None:
            return self.fused.expand(self.A, self.B)
        if self.kind == "conv":
            return self.A.flatten(1), self.B.flatten(1)
        return self.A, self.B

    def replace(self, **changes) -> "ModuleDelta":
        return replace(self, **changes)


@dataclass
class AdapterInfo:
    """The canonical adapter-level form: what a reader learned about one adapter besides its tensors.

    Writers build their config from the typed fields only. ``config`` and ``wrapper`` are the source library's
    own files (native): only the codec that read them looks inside (e.g. PEFT → PEFT keeps fields only PEFT knows).
    """

    name: str
    convention: str  # resolved convention name, e.g. "adapter-transformers-3.1"
    r: int | None = None  # the adapter's global rank, where its config has one
    alpha: float | None = None  # the adapter's global alpha, where its config has one
    config: dict = field(default_factory=dict)  # native: the library's own adapter config (``config`` block)
    wrapper: dict = field(default_factory=dict)  # native: the rest of adapter_config.json (model_type, …)
    base_model: str | None = None  # the base model's hub id or path, as the source names it
    model_type: str | None = None  # transformers ``model_type`` (llama, qwen2, …) or image family (sd1, sdxl, flux)
    task_type: str | None = None  # PEFT task type (CAUSAL_LM, …), where the source says
    fan_in_fan_out: bool = False  # the base layers store W transposed (GPT-2 Conv1D): factors are still A (r, in)
    components: tuple[str, ...] = ()  # image models: unet, text_encoder, text_encoder_2, transformer
    dropout: float | None = None  # training-only; carried where the target's config has the field
    coverage_unproven: str | None = None  # why the config does not prove each layer type covers every layer
