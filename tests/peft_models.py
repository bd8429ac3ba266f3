"""PEFT adapters made by the real peft library on tiny models, and loaders that compute their logits."""

from __future__ import annotations

from pathlib import Path

import torch

from .models import build, inputs_for, logits as run_logits


def randomize(model, seed: int = 1, scale: float = 0.3) -> None:
    """PEFT starts B (and embedding A) at zero: give every adapter tensor seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "magnitude" in n else 0.0))


def make_peft(out: Path, arch: str = "llama", seed: int = 0, adapter_seed: int = 1, model_kw=None, **lora_kw):
    """Save a randomized PEFT LoRA adapter of ``arch`` to ``out``; return (logits with it, base logits)."""
    from peft import LoraConfig, get_peft_model

    base = build(arch, seed, **(model_kw or {}))
    inputs = inputs_for(base)
    base_logits = run_logits(base, inputs)
    model = get_peft_model(base, LoraConfig(**lora_kw))
    randomize(model, adapter_seed)
    model.eval()
    logits = run_logits(model, inputs)
    model.save_pretrained(out)
    return logits, base_logits


def peft_logits(adapter_dir: Path, arch: str = "llama", seed: int = 0, model_kw=None, adapter_name="default"):
    """Logits of a fresh base with ``adapter_dir`` loaded by ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    base = build(arch, seed, **(model_kw or {}))
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name).eval()
    return run_logits(model, inputs_for(base))


def adapters_logits(adapter_dir: Path, arch: str = "llama", seed: int = 0, model_kw=None):
    """Logits of a fresh base with ``adapter_dir`` loaded by the real ``adapters`` library."""
    import adapters

    base = build(arch, seed, **(model_kw or {}))
    adapters.init(base)
    name = base.load_adapter(str(adapter_dir))
    base.set_active_adapters(name)
    base.eval()
    return run_logits(base, inputs_for(base))
