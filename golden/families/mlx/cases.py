"""mlx family (mlx-lm LoRA/DoRA adapters): data only, stdlib-only.

Ground truth for mlx-lm's adapter convention, written and loaded by the real mlx-lm (Linux CPU backend): a tiny base
in HF layout (transformers, seeded) that mlx-lm loads with its own loader; mlx-lm's ``linear_to_lora_layers`` on it
(what ``mlx_lm lora`` does before training), the LoRA factors randomized with a seed, saved the way mlx-lm saves
(``adapters.safetensors`` = tree_flatten(trainable_parameters()), ``adapter_config.json`` = the whole args dict);
logits from ``mlx_lm.load(base, adapter_path=...)``; PEFT's logits for the equivalent PEFT adapter
(lora_A = lora_aᵀ, lora_B = lora_bᵀ, lora_alpha = scale·r, layers_to_transform = the last num_layers blocks).
"""

import importlib.util as _iu
from pathlib import Path as _Path

_spec = _iu.spec_from_file_location("golden_tiny_decoders", _Path(__file__).resolve().parent.parent / "tiny_decoders.py")
TINY = _iu.module_from_spec(_spec)
_spec.loader.exec_module(TINY)  # shared data: the tiny Llama/Qwen2, seeds, token ids


ENVS = {
    "mlxlm0322": {
        "library": "mlx-lm",
        "library_version": "0.32.2",
        # mlx-lm 0.32.2 needs transformers >= 5.7; peft shares the env for the PEFT-side logits
        "deps": ["mlx[cpu]==0.32.4", "mlx-lm==0.32.2", "transformers==5.25.0", "peft==0.21.2", "safetensors",
                 "numpy"],
    },
}

MODEL_SEED, LORA_SEED, LORA_STD, INPUT_IDS = TINY.MODEL_SEED, TINY.LORA_SEED, TINY.LORA_STD, TINY.INPUT_IDS


ARCHS = {"llama": TINY.LLAMA, "qwen2": TINY.QWEN2}

# each case: the bases it uses (once per arch), then the case, in the one env
STAGES = [("base", "mlxlm0322"), ("generate", "mlxlm0322")]
# block-relative mlx keys -> HF module names (the same names in mlx-lm's llama/qwen2 module trees)
CASES = {
    "mlxlm0322/llama_qv": {"stages": STAGES, "arch": "llama", "fine_tune_type": "lora", "num_layers": 2,
                 "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0,
                                     "keys": ["self_attn.q_proj", "self_attn.v_proj"]}},
    "mlxlm0322/llama_all_last1": {"stages": STAGES, "arch": "llama", "fine_tune_type": "lora", "num_layers": 1,
                        "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 2.5},
                        "note": "no keys: every Linear of the last block"},
    "mlxlm0322/llama_dora": {"stages": STAGES, "arch": "llama", "fine_tune_type": "dora", "num_layers": 2,
                   "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 2.0,
                                       "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}},
    "mlxlm0322/qwen2_qkv": {"stages": STAGES, "arch": "qwen2", "fine_tune_type": "lora", "num_layers": 2,
                  "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 10.0,
                                      "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}},
    "mlxlm0322/llama_lm_head": {"stages": STAGES, "arch": "llama", "fine_tune_type": "lora", "num_layers": 2,
                                "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 3.0,
                                                    "keys": ["self_attn.q_proj", "lm_head"]},
                                "note": "a full-path key selects a module outside the blocks (lm_head)"},
    "mlxlm0322/qwen2_all": {"stages": STAGES, "arch": "qwen2", "fine_tune_type": "lora", "num_layers": -1,
                  "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 5.0}},
}

# ACCEPTANCE: conversions by the landed CLI, loaded back in mlx-lm 0.32.2 (``mlx_lm.load(base, adapter_path=OUT)``
# and ``mlx_lm fuse`` of OUT in transformers) or in peft 0.21.2 (same env), against the reference logits of the
# source case. Sources: PEFT adapters written by real peft on the same tiny bases (the gguf family's cases), this
# family's PEFT equivalents and mlx-lm's own adapters. Each row: "load" (mlx | peft) and "ref" (the key of the
# case's logits.safetensors the output must reproduce; "base_logits" there is the base, for the noise floor).
_GGUF = "llamacpp/"
_TO_MLX = ["llama_plain", "llama_rslora", "llama_patterns", "llama_all_linear", "llama_dora", "qwen2_plain",
           "qwen2_rslora", "qwen2_patterns", "qwen2_all_linear"]
_REFUSED = {"llama_embed": "embedding LoRA: mlx-lm's LoRAEmbedding not proven against PEFT's",
            "llama_lora_bias": "lora_B.bias: mlx-lm's LoRA layers have no bias"}


def _row(case, target, load, ref, *, source="adapter", expect="ok", note=None):
    arch = case.split("/")[-1].split("_")[0]
    row = {"case": case, "source": source, "target": target, "env": "mlxlm0322", "expect": expect, "arch": arch,
           "load": load, "ref": ref}
    return dict(row, note=note) if note else row


ACCEPTANCE = (
    [_row(_GGUF + c, "mlx-lm", "mlx", "logits") for c in _TO_MLX]
    + [_row(_GGUF + "llama_plain", "mlx-lm-2024-06", "mlx", "logits",
            note="the 2024-06 era's config (alpha = rank, lora_layers, use_dora) loads in 0.32.2 too")]
    + [_row(_GGUF + c, "mlx-lm", "mlx", "logits", expect="refused", note=why) for c, why in _REFUSED.items()]
    + [_row("mlxlm0322/" + c, "mlx-lm", "mlx", "logits_peft", source="peft_equivalent")
       for c in ("llama_all_last1", "qwen2_qkv", "llama_dora", "llama_lm_head")]
    + [_row("mlxlm0322/" + c, "peft", "peft", "logits_mlx")
       for c in ("llama_qv", "llama_all_last1", "llama_dora", "llama_lm_head", "qwen2_qkv", "qwen2_all")]
    + [_row("mlxlm0322/llama_dora", "mlx-lm", "mlx", "logits_mlx", note="mlx-lm → mlx-lm")]
)
# the harness's bound on max |logit diff|; each row also meets tests/tolerance.py's model, checked by the worker:
# 192·u(f32)·max|ref| + 4·noise (noise: this base's logits against the stored base logits), ~6e-5 for logits ≤ 5
TOL = 1e-4

# a result "matches" when max |logit diff| <= REL_TOL[dtype] * max |reference logit| (float32: ~80 ulps of the
# largest logit; the tiny models' logits reach ~5-10, the LoRA effects 1-4)
REL_TOL = {"f32": 1e-5}
