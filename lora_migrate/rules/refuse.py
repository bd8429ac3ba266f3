"""Refusals: what no exact rewrite can express is refused with the reason, never dropped."""

from __future__ import annotations

from ..errors import UnsupportedFeature
from ..schemas import Convention
from .registry import rule


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
    names = {"ia3": "(IA)³", "fused_qkv": "fused-QKV LoRA", "linear": "LoRA", "embedding": "embedding LoRA",
             "conv": "conv LoRA", "experts": "stacked-experts (MoE) LoRA"}
    missing = sorted(k for k in kinds if k not in target.scaling)
    if missing:
        raise UnsupportedFeature(f"{adapter}: {target.name} cannot express {', '.join(names[k] for k in missing)} "
                                 "layers")


@rule("refuse_before_release")
def refuse_before_release(adapter: str, needs: list[tuple[str, str]], target: Convention) -> list[str]:
    """A layer type that no release of the target PEFT era wraps (``needs``: (what, first release), e.g. LoRA on
    nn.Conv1d from PEFT 0.15) is refused: that PEFT raises on the target module instead of loading the adapter.
    Where only the era's later releases have it, the tensors are written unchanged and the returned note names
    the first release. Nothing is rewritten, so ΔW is unchanged either way."""
    notes = []
    for what, since in needs:
        have = target.releases_with(since)
        if have == "none":
            raise UnsupportedFeature(f"{adapter}: {what} needs PEFT ≥ {since}; {target.name} "
                                     f"(PEFT {target.versions}) raises on such a target module instead of loading "
                                     "the adapter")
        if have == "some":
            notes.append(f"{what} needs PEFT ≥ {since}")
    return notes


_WHY = {
    "dora": "DoRA (lora_magnitude_vector) rescales every row of W + s·BA by m/‖W + s·BA‖: that needs the base "
            "weights, and diag(m/n − 1)·W is not low rank, so no LoRA pair can express it",
    "lora_bias": "lora_B.bias (lora_bias=true) adds s·l to the layer's output, which {t} cannot hold",
    "modules_to_save": "modules_to_save holds full trained copies of modules, which {t} cannot hold",
    "bias": "trained base biases (bias != \"none\") are full tensors, which {t} cannot hold",
    "trainable_tokens": "trainable tokens replace embedding rows, which {t} cannot hold",
    "saved_embeddings": "full embedding/lm_head weights saved beside the adapter (save_embedding_layers), which "
                        "{t} cannot hold",
}


@rule("refuse_features")
def refuse_features(adapter: str, features: set[str], target: Convention) -> None:
    """A feature of the source that the target cannot express exactly (DoRA outside PEFT, LoRA bias outside
    PEFT ≥ 0.14, full module copies outside PEFT, PEFT-only forward variants) is refused with the reason, and for
    the serving targets with the message the server itself gives or the thing it silently drops."""
    serving = target.serving
    for f in sorted(features):
        if f in ("rslora", "patterns", "embedding", "conv"):
            continue  # rewritten exactly (alpha per module, padding) or refused by kind
        if target.fields_checked_on_write:
            if f == "lora_bias" and "lora_bias" not in target.features:
                raise UnsupportedFeature(f"{adapter}: lora_B.bias needs PEFT ≥ 0.14 (lora_bias, #2237); "
                                         f"{target.name} would ignore it")
            continue  # other config fields are checked field by field when the config is written
        if f in target.features:
            continue  # the target declares it, and its codec writes it (or, GGUF's frozen base-layer copies,
            # leaves it out; other full tensors are refused there)
        if serving and serving.skips_frozen_base_copies and f == "saved_embeddings":
            continue  # frozen base copies are left out, other saved embeddings refused: plan._without_base_copies
        if serving and f in serving.refuses:
            raise UnsupportedFeature(f"{adapter}: {serving.server} refuses it: \"{serving.refuses[f]}\"")
        if serving and f in serving.drops:
            raise UnsupportedFeature(f"{adapter}: {serving.drops[f]}; refused rather than served wrong")
        why = _WHY.get(f, f"{f} changes the forward pass in a way only PEFT reproduces")
        raise UnsupportedFeature(f"{adapter}: {why.format(t=target.name)}; {target.name} cannot express it")
