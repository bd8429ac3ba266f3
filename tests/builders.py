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


# ------------------------------------------------------------------------------ decoder-LLM adapters (no library)

LLAMA_DIMS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
              "mlp.down_proj": (128, 64)}  # (in, out): 4 heads of 16, 2 kv heads
LLAMA_CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "hidden_size": 64, "intermediate_size": 128}


def lora_pair(in_f, out_f, r, g):
    return torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)


def peft_folder(folder: Path, rel=("self_attn.q_proj", "self_attn.v_proj"), layers=(0, 1), r=4, alpha=8, seed=0,
                ranks=None, alphas=None, **config) -> Path:
    """A PEFT LoRA folder on the tiny Llama's modules ``model.layers.N.<rel>`` as PEFT saves it (written without
    the library): ``ranks``/``alphas`` map full module names to rank_pattern/alpha_pattern entries."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    sd = {}
    for n in layers:
        for p in rel:
            m = f"model.layers.{n}.{p}"
            A, B = lora_pair(*LLAMA_DIMS[p], (ranks or {}).get(m, r), g)
            sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"] = A, B
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "base_model_name_or_path": None,
           "target_modules": sorted({p.rsplit(".", 1)[-1] for p in rel}), "lora_dropout": 0.0, "bias": "none",
           "rank_pattern": dict(ranks or {}), "alpha_pattern": dict(alphas or {}), "use_rslora": False,
           "use_dora": False, "peft_version": "0.21.2", **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def assert_same_deltas(src, back) -> None:
    """Every module of ``src`` holds the same ΔW = s·B·A in ``back`` (float64 products, to 64·u(float32) of the
    largest element): what a codec's write → read_back must keep."""
    by = {e.module: e for e in back.modules}
    for e in src.modules:
        d, o = src.load(e), back.load(by[e.module])
        (A, B), (A2, B2) = d.factors(), o.factors()
        ref = e.scale * (B.double() @ A.double())
        got = o.scale * (B2.double() @ A2.double())
        assert torch.allclose(got, ref, rtol=0, atol=64 * 2**-24 * ref.abs().max().item()), e.module


# ------------------------------------------------------------------------------ one pipeline component, by real PEFT

UNET_LAYERS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 8),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
               "mid_block.attentions.0.proj_in": (16, 16),
               "down_blocks.0.resnets.0.conv1": (8, 8, 3)}  # (in, out[, kernel])
CLIP_LAYERS = {"encoder.layers.0.self_attn.q_proj": (32, 32), "encoder.layers.0.self_attn.out_proj": (32, 32),
               "encoder.layers.1.mlp.fc1": (32, 37)}  # transformers 5's CLIPTextModel: no text_model. level


def peft_component_folder(folder: Path, layers: dict, r=4, alpha=8, seed=0, **config) -> Path:
    """What ``get_peft_model(unet, LoraConfig(...)).save_pretrained(folder)`` writes for one pipeline component
    (keys ``base_model.model.<path>.lora_A.weight``, no ``unet.`` prefix), written by the real PEFT on a module tree
    with the component's paths and ``layers``' sizes; the factors are seeded noise (B is zero at init)."""
    from peft import LoraConfig, get_peft_model

    def tree(paths: dict) -> torch.nn.Module:
        root = torch.nn.Module()
        for path, (i, o, *k) in paths.items():
            node = root
            *parents, leaf = path.split(".")
            for p in parents:
                if not hasattr(node, p):
                    node.add_module(p, torch.nn.Module())
                node = getattr(node, p)
            node.add_module(leaf, torch.nn.Conv2d(i, o, k[0], padding=1) if k else torch.nn.Linear(i, o))
        return root

    torch.manual_seed(seed)
    model = get_peft_model(tree(layers), LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(layers), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(folder))
    return folder
