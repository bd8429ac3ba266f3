"""LoRAX's adapter loading, emulated (LoRAX itself cannot be installed here), from peft.md §7.1–7.3:

- the config is read through peft 0.4.0's LoraConfig, which has no ``use_rslora``: the scale is alpha/r;
- per layer type (``ADAPTER_LAYERS`` of LoRAX's flash_llama, in that order) and per layer ``i`` of the model it
  looks up only ``base_model.model.{weight_name}.lora_A.weight`` / ``lora_B.weight``; when any layer lacks them,
  ``if weight_name not in module_map: return None`` drops the type for every layer;
- ``lora_a = A.T``, ``lora_b = B.T · alpha/config.r``, ranks padded for SGMV (≤ 8 → 8, else the next multiple of
  16, at world size 1), and then ``config.r = padded_rank``, so the types loaded after the first are scaled with
  the padded r;
- y = W x + b + lora_b ᵀ·lora_aᵀ·x per layer, computed here by adding (lora_a · lora_b)ᵀ to W (the same map).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .models import build, inputs_for, logits

# server/lorax_server/models/flash_llama.py ADAPTER_LAYERS (lm_head left out: the tiny model ties nothing to it)
LLAMA_LAYERS = (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"), ("o_proj", "self_attn"),
                ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp"))


def _pad_rank(r: int) -> int:
    return 8 if r <= 8 else -(-r // 16) * 16


def lorax_deltas(adapter_dir: Path, num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """{module: ΔW (out, in)} as LoRAX applies ``adapter_dir`` to a Llama of ``num_layers`` layers, and the layer
    types it dropped although the file has weights for some of their layers."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config_r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])  # no use_rslora: peft 0.4.0 drops the field
    sd = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    deltas, dropped = {}, []
    for name, block in LLAMA_LAYERS:
        weight_names = [f"model.layers.{i}.{block}.{name}" for i in range(num_layers)]
        keys = [(f"base_model.model.{w}.lora_A.weight", f"base_model.model.{w}.lora_B.weight") for w in weight_names]
        if not all(a in sd and b in sd for a, b in keys):
            if any(a in sd for a, _ in keys):
                dropped.append(name)
            continue  # `return None`: the whole type
        scale = alpha / config_r
        a_list = [sd[a].T for a, _ in keys]  # (in, r)
        b_list = [sd[b].T * scale for _, b in keys]  # (r, out)
        padded = _pad_rank(a_list[0].shape[1])
        a_list = [torch.nn.functional.pad(a, (0, padded - a.shape[1])) for a in a_list]
        b_list = [torch.nn.functional.pad(b, (0, 0, 0, padded - b.shape[0])) for b in b_list]
        config_r = padded  # LoraWeights.load mutates config.r
        for w, a, b in zip(weight_names, a_list, b_list):
            deltas[w] = (a @ b).T
    return deltas, dropped


def lorax_logits(adapter_dir: Path, seed: int = 0, model_kw=None) -> tuple[torch.Tensor, list[str]]:
    """Logits of the tiny Llama served with ``adapter_dir`` by the emulated LoRAX, and the dropped types."""
    base = build("llama", seed, **(model_kw or {}))
    deltas, dropped = lorax_deltas(adapter_dir, base.config.num_hidden_layers)
    with torch.no_grad():
        for w, d in deltas.items():
            base.get_submodule(w).weight += d
    return logits(base, inputs_for(base)), dropped
