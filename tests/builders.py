"""Builders shared by the test modules: AdapterHub adapter folders written without the library, a folder's bytes,
and the dense ΔW of a delta. Test modules import these from here, never from each other."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_migrate.adapter import ModuleDelta

MODULES = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v"]
BASE_CONFIG = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
               "r": 4, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
               "init_weights": "lora", "use_gating": False}


def tensors(name="m1", r=4, modules=MODULES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        sd[f"{m}.loras.{name}.lora_A"] = torch.randn(r, 16, generator=g).to(dtype)
        sd[f"{m}.loras.{name}.lora_B"] = torch.randn(12, r, generator=g).to(dtype)
    return sd


def make_adapter(folder, version="3.1.0", name="m1", config=None, sd=None, model_type="t5", file="pytorch_adapter.bin"):
    """An AdapterHub adapter folder as save_adapter lays it out, written without the library."""
    folder.mkdir(parents=True)
    cfg = dict(BASE_CONFIG, **(config or {}))
    wrapper = {"config": cfg, "hidden_size": 16, "model_class": "T5ForConditionalGeneration",
               "model_name": None, "model_type": model_type, "name": name, "version": version}
    (folder / "adapter_config.json").write_text(json.dumps(wrapper))
    sd = tensors(name, r=cfg["r"]) if sd is None else sd
    if file.endswith(".bin"):
        torch.save(sd, folder / file)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(folder / file))
    return folder


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path → bytes)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dense(d: ModuleDelta) -> torch.Tensor:
    """ΔW = (s·B)·A formed in float64: the brute-force reference."""
    A, B = d.factors()
    return d.scale * B.double() @ A.double()


def diffusers_file(folder: Path, modules: dict, metadata: dict | None = None, spelling=None, seed=0,
                   dtype=torch.float32) -> Path:
    """A diffusers LoRA folder (pytorch_lora_weights.safetensors) written without diffusers: ``modules`` maps a
    key prefix (``unet.…to_q``) to (r, in, out) or (r, in, out, k) for a conv; ``metadata`` is the per-component
    LoraConfig dicts, flattened into ``lora_adapter_metadata`` as save_lora_weights does; ``spelling(module)``
    gives the (down, up) key suffixes (default PEFT's lora_A/lora_B)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, shape in modules.items():
        r, i, o, *k = shape
        down, up = spelling(m) if spelling else (".lora_A.weight", ".lora_B.weight")
        sd[m + down] = torch.randn(r, i, *k, *k, generator=g).to(dtype)
        sd[m + up] = torch.randn(o, r, *([1, 1] if k else []), generator=g).to(dtype)
    header = {"format": "pt"}
    if metadata is not None:
        flat = {f"{c}.{f}": v for c, cfg in metadata.items() for f, v in cfg.items()}
        header["lora_adapter_metadata"] = json.dumps(flat, indent=2, sort_keys=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "pytorch_lora_weights.safetensors"), header)
    return folder


def codec_write(src: Path, target: str, dest: Path) -> None:
    """Read ``src``, plan it into ``target`` and write it at ``dest`` with the target's codec, unchecked (the
    codec methods as the pipeline calls them, for codec unit tests)."""
    from lora_migrate.codecs import PlanOptions, codec_for
    from lora_migrate.detect import open_source
    from lora_migrate.plan import plan_adapter
    from lora_migrate.schemas import get_convention

    conv = get_convention(target)
    s = open_source(src)
    try:
        ex = plan_adapter(s.adapters[0], conv, ".", PlanOptions())
        codec_for(conv).write(ex, dest, ex.deltas())
    finally:
        s.close()
