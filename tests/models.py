"""Tiny models built from configs, and the real `adapters` library around them (no hub downloads)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

INPUT_IDS = [[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]]
DECODER_IDS = [[0, 11, 42, 9], [0, 3, 100, 77]]


@functools.cache
def _golden_peft():
    """golden/families/peft/tiny_conv.py as a module (stdlib-only at its top level): the one definition of the tiny
    conv model (arch "conv", not from transformers) and its inputs, shared by the goldens and the live tests."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "golden" / "families" / "peft" / "tiny_conv.py"
    spec = importlib.util.spec_from_file_location("golden_peft_tiny_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def conv_model_class():
    return _golden_peft().conv_model_class()


def build(arch: str, seed: int = 0, **overrides):
    """A tiny T5 / GPT-2 / Llama / Qwen2 (or the conv model) with fixed-seed weights (``overrides`` change config
    fields, or the conv model's arguments)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "conv":
        return conv_model_class()(**overrides).eval()
    if arch == "t5":
        cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                          num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides)
        model = tf.T5ForConditionalGeneration(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def load_base(base_dir: Path):
    """Rebuild a golden base model from its saved config and weights."""
    import transformers as tf
    from safetensors.torch import load_file

    cfg = json.loads((base_dir / "config.json").read_text())
    cls_name = json.loads((base_dir / "arch.json").read_text())["model_class"]
    if cls_name == "TinyConvNet":
        model = conv_model_class()(**cfg)
    else:
        cls = getattr(tf, cls_name)
        model = cls(cls.config_class(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    sd = load_file(str(base_dir / "model.safetensors"))
    model.load_state_dict(sd, strict=False)
    return model.eval()


def inputs_for(model, input_json: Path | None = None) -> dict:
    if input_json is not None:
        raw = json.loads(input_json.read_text())
        out = {k: torch.tensor(v) for k, v in raw.items()}
    elif getattr(model, "config", None) is None:  # the conv model
        out = {"pixel_values": torch.tensor(_golden_peft().conv_inputs()["pixel_values"])}
    else:
        out = {"input_ids": torch.tensor(INPUT_IDS)}
        if model.config.model_type == "t5":
            out["decoder_input_ids"] = torch.tensor(DECODER_IDS)
    return out


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits.float()


def randomize_loras(model, name: str, seed: int = 1, std_b: float = 0.2) -> None:
    """lora_B is zero at init, so nothing would be tested: give every LoRA factor seeded random values."""
    g = torch.Generator().manual_seed(seed)
    for k, p in model.named_parameters():
        if f".loras.{name}." not in k:
            continue
        with torch.no_grad():
            if k.endswith("lora_B") and p.shape[-1] == 1 and "ia3" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif k.endswith("lora_B"):
                p.copy_(std_b * torch.randn(p.shape, generator=g))
            elif k.endswith("lora_A"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def with_adapter(arch: str, out_dir: Path, name: str, config, seed: int = 0, **save_kw):
    """Build, add a randomized adapter with the real `adapters`, save it; return (model, reference logits)."""
    import adapters

    model = build(arch, seed)
    adapters.init(model)
    model.add_adapter(name, config=config)
    randomize_loras(model, name, seed + 1)
    model.set_active_adapters(name)
    model.eval()
    ref = logits(model, inputs_for(model))
    model.save_adapter(str(out_dir), name, **save_kw)
    return model, ref


def load_and_run(arch: str, adapter_dir: Path, seed: int = 0, base=None, **load_kw) -> torch.Tensor:
    """A fresh base model, `load_adapter(adapter_dir)` + `set_active_adapters`, logits: the public API path."""
    import adapters

    model = build(arch, seed) if base is None else base
    adapters.init(model)
    name = model.load_adapter(str(adapter_dir), **load_kw)
    model.set_active_adapters(name)
    model.eval()
    return logits(model, inputs_for(model))
