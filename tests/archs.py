"""The acceptance matrix's data: tiny architectures built from configs (pinned transformers, fixed seeds, no
downloads), the adapter variants made on them with the real peft 0.21.2 / adapters 1.3.0, the targets, and what
each target can express (the expectation a cell is judged against).

The expectation is data written from the README's "Conventions" table and /work/shared/reference/peft.md, not
from lora-migrate's code: ``EXPRESSES[target]`` is the set of adapter features the target's library computes as
the source does. Which modules AdapterHub LoRA can wrap is asked of the real adapters 1.3.0
(:func:`adapterhub_slots`), also not of lora-migrate.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch

VOCAB = 128
INPUT_IDS = [[5, 17, 33, 2, 90, 3], [7, 7, 64, 120, 3, 4]]
DECODER_IDS = [[0, 11, 42, 9], [0, 3, 100, 77]]


@dataclass(frozen=True)
class Arch:
    name: str
    cls: str  # transformers model class
    cfg: str  # transformers config class
    kind: str  # decoder / encoder / encoder-decoder
    attn: tuple  # PEFT target names of the attention projections ("plain" on attention only)
    mlp: str  # one MLP projection (suffix unique to it)
    emb: str  # the token embedding's module name
    norm: str  # a modules_to_save entry (the final norm, as users write it)
    kw: dict = field(default_factory=dict)


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
_GQA = dict(_DEC, num_key_value_heads=2)
_QV = ("q_proj", "v_proj")

ARCHS = {a.name: a for a in [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", "decoder", _QV, "down_proj", "embed_tokens", "norm", _GQA),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", "decoder", _QV, "down_proj", "embed_tokens", "norm",
         _GQA),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "decoder", _QV, "down_proj", "embed_tokens", "norm", _GQA),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "decoder", _QV, "down_proj", "embed_tokens", "norm",
         dict(_GQA, head_dim=8)),
    Arch("gemma", "GemmaForCausalLM", "GemmaConfig", "decoder", _QV, "down_proj", "embed_tokens", "norm",
         dict(_GQA, head_dim=8)),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config", "decoder", _QV, "down_proj", "embed_tokens", "norm",
         dict(_GQA, head_dim=8)),
    Arch("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig", "decoder", _QV, "down_proj", "embed_tokens",
         "norm", dict(_GQA, head_dim=8)),
    Arch("phi", "PhiForCausalLM", "PhiConfig", "decoder", _QV, "fc2", "embed_tokens", "final_layernorm", _DEC),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", "decoder", ("qkv_proj",), "down_proj", "embed_tokens", "norm",
         dict(_DEC, pad_token_id=0)),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", "decoder", ("query_key_value",), "dense_4h_to_h",
         "embed_in", "final_layer_norm", _DEC),
    Arch("falcon", "FalconForCausalLM", "FalconConfig", "decoder", ("query_key_value",), "dense_4h_to_h",
         "word_embeddings", "ln_f", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4)),
    Arch("opt", "OPTForCausalLM", "OPTConfig", "decoder", _QV, "fc2", "embed_tokens", "final_layer_norm",
         dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              word_embed_proj_dim=32, max_position_embeddings=64)),
    Arch("bloom", "BloomForCausalLM", "BloomConfig", "decoder", ("query_key_value",), "dense_4h_to_h",
         "word_embeddings", "ln_f", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config", "decoder", ("c_attn",), "c_fc", "wte", "ln_f",
         dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    Arch("stablelm", "StableLmForCausalLM", "StableLmConfig", "decoder", _QV, "down_proj", "embed_tokens", "norm",
         _GQA),
    Arch("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config", "decoder", _QV, "c_proj", "embed_tokens",
         "norm", _GQA),
    Arch("olmo2", "Olmo2ForCausalLM", "Olmo2Config", "decoder", _QV, "down_proj", "embed_tokens", "norm", _GQA),
    Arch("mixtral", "MixtralForCausalLM", "MixtralConfig", "decoder", _QV, "w2", "embed_tokens", "norm",
         dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    Arch("bert", "BertForMaskedLM", "BertConfig", "encoder", ("query", "value"), "intermediate.dense",
         "word_embeddings", "cls", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)),
    Arch("roberta", "RobertaForMaskedLM", "RobertaConfig", "encoder", ("query", "value"), "intermediate.dense",
         "word_embeddings", "lm_head", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64,
                                            max_position_embeddings=66)),
    Arch("modernbert", "ModernBertForMaskedLM", "ModernBertConfig", "encoder", ("Wqkv",), "mlp.Wo",
         "tok_embeddings", "final_norm", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                              bos_token_id=2, cls_token_id=2, sep_token_id=1)),
    Arch("t5", "T5ForConditionalGeneration", "T5Config", "encoder-decoder", ("q", "v"), "wo", "shared",
         "final_layer_norm", dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                  num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    Arch("bart", "BartForConditionalGeneration", "BartConfig", "encoder-decoder", _QV, "fc2", "embed_tokens",
         "layernorm_embedding", dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)),
    Arch("bart_scaled", "BartForConditionalGeneration", "BartConfig", "encoder-decoder", _QV, "fc2",
         "embed_tokens", "layernorm_embedding",
         dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
              scale_embedding=True)),
]}


@functools.cache
def _pristine(arch: str):
    import transformers as tf

    a = ARCHS[arch]
    torch.manual_seed(0)
    return getattr(tf, a.cls)(config(arch)).eval()


def config(arch: str):
    """The tiny config; eager attention, the one implementation every architecture and transformers release has
    (the golden environments' older transformers pick other defaults, e.g. Gemma2's soft-capping)."""
    import transformers as tf

    a = ARCHS[arch]
    return getattr(tf, a.cfg)(**a.kw, attn_implementation="eager")


def build(arch: str):
    """A fresh copy of the tiny model (the seeded weights are made once per process)."""
    return copy.deepcopy(_pristine(arch))


def inputs_for(arch: str) -> dict:
    out = {"input_ids": torch.tensor(INPUT_IDS)}
    if ARCHS[arch].kind == "encoder-decoder":
        out["decoder_input_ids"] = torch.tensor(DECODER_IDS)
    return out


@torch.no_grad()
def logits(model, arch: str) -> torch.Tensor:
    return model(**inputs_for(arch)).logits.float()


def pattern_key(arch: str, suffix: str) -> str:
    """The path of the first module ending in ``suffix``, without its first component (a key every PEFT era's
    pattern matching finds as a suffix)."""
    name = next(n for n, _ in _pristine(arch).named_modules() if n.endswith(suffix))
    return name.split(".", 1)[1]


# ---- adapter variants ---------------------------------------------------------------------------------------
# Each PEFT variant: the features it uses (keys of EXPRESSES) and its LoraConfig for an architecture.

def peft_variants(arch: str) -> dict:
    a = ARCHS[arch]
    attn, both = list(a.attn), [*a.attn, a.mlp]
    v = {
        "plain": ({"lora"}, dict(target_modules=attn, r=8, lora_alpha=16)),
        "all_linear": ({"lora"}, dict(target_modules="all-linear", r=4, lora_alpha=12)),
        "rslora": ({"lora", "rslora"}, dict(target_modules=both, r=8, lora_alpha=16, use_rslora=True)),
        "patterns": ({"lora", "patterns"}, dict(target_modules=both, r=4, lora_alpha=8,
                                                rank_pattern={pattern_key(arch, attn[0]): 8},
                                                alpha_pattern={a.mlp: 32})),
        "lora_bias": ({"lora", "lora_bias"}, dict(target_modules=attn, r=8, lora_alpha=32, lora_bias=True)),
        "dora": ({"lora", "dora"}, dict(target_modules=attn, r=4, lora_alpha=8, use_dora=True)),
        "embedding": ({"lora", "embedding"}, dict(target_modules=[a.emb, attn[0]], r=4, lora_alpha=8)),
        "modules_to_save": ({"lora", "modules_to_save"}, dict(target_modules=attn, r=4, lora_alpha=8,
                                                              modules_to_save=[a.norm])),
    }
    if arch == "gpt2":  # Conv1D: weights stored (in, out)
        v["fan_in_fan_out"] = ({"lora"}, dict(target_modules=["c_attn", "mlp.c_proj", "c_fc"], r=4, lora_alpha=8,
                                              fan_in_fan_out=True))
    return v


# AdapterHub LoRA variants (adapters 1.3.0 LoRAConfig arguments), on the architectures adapters supports
ADAPTERHUB_VARIANTS = {
    "ah_attn": dict(r=8, alpha=16, attn_matrices=["q", "v"]),
    "ah_ffn": dict(r=4, alpha=12, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
}

TARGETS = ["adapter-transformers-3.1", "adapters-1.0", "adapters-1.1", "peft-0.13", "peft-0.14", "peft-0.15",
           "peft-0.16", "peft", "lorax", "vllm"]

ADAPTERHUB = {"adapter-transformers-3.1", "adapters-1.0", "adapters-1.1"}
PEFT_ERAS = {"peft-0.13", "peft-0.14", "peft-0.15", "peft-0.16", "peft"}

# What each target's library computes as the source does (README "Conventions", peft.md):
# - every target: LoRA on Linear/Conv1D (also fused QKV), rsLoRA (alpha' = alpha·√r, or folded into B),
#   rank/alpha patterns (PEFT: each era's pattern form; AdapterHub/serving: folded into B, ranks zero-padded);
# - lora_B.bias: PEFT ≥ 0.14 only (LoRAX/vLLM drop or reject it, AdapterHub has none);
# - DoRA: PEFT (≥ 0.9) only; embedding LoRA: PEFT and vLLM (LoRAX drops it, AdapterHub has none);
# - modules_to_save: PEFT only (vLLM rejects it, LoRAX drops it);
# - MoE target_parameters: PEFT ≥ 0.18 only.
_BASE = {"lora", "rslora", "patterns"}
_PEFT = _BASE | {"dora", "embedding", "modules_to_save"}
EXPRESSES = {
    "adapter-transformers-3.1": _BASE, "adapters-1.0": _BASE, "adapters-1.1": _BASE,
    "peft-0.13": _PEFT, "peft-0.14": _PEFT | {"lora_bias"}, "peft-0.15": _PEFT | {"lora_bias"},
    "peft-0.16": _PEFT | {"lora_bias"}, "peft": _PEFT | {"lora_bias", "target_parameters"},
    "lorax": _BASE, "vllm": _BASE | {"embedding"},
}

# How a refusal must name the feature the target lacks (a regex on the one-line reason)
FEATURE_WORDS = {
    "lora_bias": r"lora_B\.bias|bias",
    "dora": r"DoRA|magnitude",
    "embedding": r"embedding",
    "modules_to_save": r"modules_to_save",
    "target_parameters": r"target_parameters",
    "adapterhub_slot": r"AdapterHub LoRA cannot (attach|wrap)|cannot attach|cannot wrap",
    "adapterhub_arch": r"model type|not supported",
}

# Which library checks each target's output in CI (the test venv has peft 0.21.2 and adapters 1.3.0 only).
CHECKED_BY = {
    "adapter-transformers-3.1": "adapters 1.3.0 (reads version 3.1.0 files with alpha/r on every layer, as "
                                "adapter-transformers 3.1 does)",
    "adapters-1.0": "adapters 1.3.0 (its load shim sets alpha := r for adapters.<1.1.0 files; the output has "
                    "alpha = r and the scale in B, which adapters 1.0.1 reads alike)",
    "adapters-1.1": "adapters 1.3.0",
    "peft-0.13": "peft 0.21.2, with embedding LoRA unscaled by embed_scale as before PEFT 0.18 (PR #2825)",
    "peft-0.14": "peft 0.21.2, with embedding LoRA unscaled by embed_scale as before PEFT 0.18 (PR #2825)",
    "peft-0.15": "peft 0.21.2, with embedding LoRA unscaled by embed_scale as before PEFT 0.18 (PR #2825)",
    "peft-0.16": "peft 0.21.2, with embedding LoRA unscaled by embed_scale as before PEFT 0.18 (PR #2825)",
    "peft": "peft 0.21.2",
    "lorax": "peft 0.21.2 (the output has one r, lora_alpha = r, no rsLoRA/patterns: what LoRAX reads, "
             "peft.md §7)",
    "vllm": "peft 0.21.2 (the output has one r, lora_alpha = r, no rsLoRA/patterns: what vLLM reads)",
}


@functools.cache
def adapterhub_slots(arch: str) -> frozenset:
    """Module paths (in the model, without the LoRA suffix) that adapters 1.3.0 wraps with LoRA when every LoRA
    location is switched on: what an AdapterHub target can carry. Empty when adapters does not support the
    model."""
    import adapters
    from adapters import LoRAConfig

    model = build(arch)
    try:
        adapters.init(model)
        model.add_adapter("probe", config=LoRAConfig(r=2, alpha=2, attn_matrices=["q", "k", "v"],
                                                     selfattn_lora=True, intermediate_lora=True,
                                                     output_lora=True))
    except Exception:  # noqa: BLE001 — "not supported" has several forms in adapters
        return frozenset()
    return frozenset(n.rsplit(".loras.", 1)[0] for n, _ in model.named_parameters() if ".loras.probe." in n)


# ---- the work of one cell, as top-level functions a spawned worker process can run ----------------------------

def _randomize_peft(model, seed):
    """PEFT starts B (and embedding A) at zero: give every adapter tensor seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))


def _randomize_ah(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".loras.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if n.endswith("lora_B") else 0.3))


def adapted_paths(src) -> set:
    """Module paths a PEFT source adapts (from its tensor names)."""
    import re

    from safetensors import safe_open

    with safe_open(str(src) + "/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    return {m.group(1) for k in keys if (m := re.match(r"base_model\.model\.(.+?)\.lora_(A|embedding_A)", k))}


def make_source(arch: str, variant: str, out, base_dir, seed: int) -> dict:
    """Save a randomized adapter of ``variant`` on ``arch`` made by the real library to ``out``; return its
    logits, the base model's, the features it uses and the modules it adapts."""
    from pathlib import Path

    out = Path(out)
    if variant in ADAPTERHUB_VARIANTS:
        import adapters
        from adapters import LoRAConfig

        model = build(arch)
        adapters.init(model)
        model.add_adapter("m1", config=LoRAConfig(**ADAPTERHUB_VARIANTS[variant]))
        _randomize_ah(model, "m1", seed)
        model.set_active_adapters("m1")
        ref = logits(model.eval(), arch)
        model.save_adapter(str(out), "m1")
        features, paths = {"lora"}, set()
        # the source library must reproduce its own saved adapter, or there is nothing to compare against
        again = build(arch)
        adapters.init(again)
        again.set_active_adapters(again.load_adapter(str(out)))
        if not torch.equal(logits(again.eval(), arch), ref):
            sd = model.state_dict()
            differ = sorted(k for k, t in again.state_dict().items() if k in sd and not torch.equal(t, sd[k]))
            return {"error": f"adapters 1.3.0 does not reproduce its own saved adapter: after load_adapter, "
                             f"{', '.join(differ) or 'no tensor'} differ from the model it was saved from (base "
                             f"tensors its LoRA wrapper creates uninitialized: they differ from load to load)"}
    else:
        from peft import LoraConfig, get_peft_model

        features, kw = peft_variants(arch)[variant]
        model = build(arch)
        model.__dict__["name_or_path"] = str(base_dir)  # as from_pretrained sets it: the PEFT config names it
        model = get_peft_model(model, LoraConfig(**kw))
        _randomize_peft(model, seed)
        ref = logits(model.eval(), arch)
        model.save_pretrained(out)
        import json

        if json.loads((out / "adapter_config.json").read_text()).get("target_parameters"):
            features = features | {"target_parameters"}
        paths = adapted_paths(out)
    base = logits(build(arch), arch)
    return {"ref": ref, "effect": (ref - base).abs().max().item(), "features": features, "paths": paths,
            "slots": adapterhub_slots(arch)}


def load_logits(arch: str, target: str, out) -> torch.Tensor:
    """Logits of a fresh base with ``out`` loaded through the target library's public API (see CHECKED_BY)."""
    if target in ADAPTERHUB:
        import adapters

        model = build(arch)
        adapters.init(model)
        name = model.load_adapter(str(out))
        model.set_active_adapters(name)
        return logits(model.eval(), arch)
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if target not in PEFT_ERAS - {"peft"}:
        return logits(PeftModel.from_pretrained(build(arch), out).eval(), arch)
    # PEFT before 0.18 (PR #2825) did not multiply embedding LoRA by the base layer's embed_scale
    orig = BaseTunerLayer._get_embed_scale
    BaseTunerLayer._get_embed_scale = lambda self: None
    try:
        return logits(PeftModel.from_pretrained(build(arch), out).eval(), arch)
    finally:
        BaseTunerLayer._get_embed_scale = orig


def worker_init():
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()


def try_load(arch, target, out):
    """load_logits for a worker: (logits, None) or (None, the error in one line)."""
    try:
        return load_logits(arch, target, out), None
    except Exception as e:  # noqa: BLE001 — the target library cannot load it: the cell says so
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def try_source(arch, variant, out, base_dir, seed):
    try:
        return make_source(arch, variant, out, base_dir, seed)
    except Exception as e:  # noqa: BLE001 — the library itself cannot make this variant here
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
