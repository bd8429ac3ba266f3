"""Refusals: what no exact rewrite can express is refused with the reason, never dropped."""

from __future__ import annotations

from ..errors import UnsupportedFeature
from ..schemas import Convention
from . import rule


@rule("refuse_gated")
def refuse_gated(adapter: str, gated: bool) -> None:
    """Gated LoRA: y = W x + g(x)·B A x with g(x) = mean_T σ(W_g x + b_g). The gate replaces alpha/r per input,
    so no fixed scale s with ΔW = s·B·A exists; refused."""
    if gated:
        raise UnsupportedFeature(
            f"{adapter}: gated LoRA (use_gating=true) cannot be converted exactly: its gate replaces alpha/r with "
            "a per-input factor, which no fixed-scale convention can express")


@rule("refuse_kinds")
def refuse_kinds(adapter: str, kinds: set[str], target: Convention) -> None:
    """A layer kind the target has no scaling rule for ((IA)³ into a LoRA-only target, fused QKV where the target
    cannot hold it) is refused."""
    names = {"ia3": "(IA)³", "fused_qkv": "fused-QKV LoRA", "linear": "LoRA"}
    missing = sorted(k for k in kinds if k not in target.scaling)
    if missing:
        raise UnsupportedFeature(f"{adapter}: {target.name} cannot express {', '.join(names[k] for k in missing)} "
                                 "layers")
