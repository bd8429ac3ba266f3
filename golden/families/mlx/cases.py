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
    # the older eras (issue 15), on today's mlx: these mlx-lm releases ask for mlx >= 0.11 / >= 0.19.2, and mlx has
    # Linux CPU wheels only from 0.2x, so mlx[cpu] 0.32.4 runs their (pure Python) code unpatched; transformers and
    # peft of each release's time (transformers 5 writes a tokenizer class 4.x cannot read: each env writes its own
    # base folder, the same seeded weights)
    "mlxlm0131": {
        "library": "mlx-lm",
        "library_version": "0.13.1",  # era mlx-lm-2024-03 (scale·alpha/rank), the first release with use_dora
        "deps": ["mlx[cpu]==0.32.4", "mlx-lm==0.13.1", "transformers==4.40.2", "peft==0.11.1", "safetensors",
                 "numpy==1.26.4"],
        "check": "import mlx_lm.tuner.utils, mlx_lm.utils, peft",
    },
    "mlxlm0206": {
        "library": "mlx-lm",
        "library_version": "0.20.6",  # era mlx-lm-2024-06 (scale absolute), num_layers + fine_tune_type
        "deps": ["mlx[cpu]==0.32.4", "mlx-lm==0.20.6", "transformers==4.46.3", "peft==0.13.2", "safetensors",
                 "numpy==1.26.4"],
        "check": "import mlx_lm.tuner.utils, mlx_lm.utils, peft",
    },
}

PRIMARY_ENV = "mlxlm0322"  # the older eras' envs check their bases against this one's (the references are shared)
MODEL_SEED, LORA_SEED, LORA_STD, INPUT_IDS = TINY.MODEL_SEED, TINY.LORA_SEED, TINY.LORA_STD, TINY.INPUT_IDS


_DENSE = {k: v for k, v in TINY.LLAMA["config"].items() if k != "attention_bias"}
# tiny MoE decoders (transformers 5: the experts fused into mlp.experts.gate_up_proj (E, 2I, H), gate rows first,
# and mlp.experts.down_proj (E, H, I)); "moe": the mlx-lm parent of switch_mlp, the expert count and size. They are
# saved with save_pretrained, which writes transformers' per-expert layout (the one mlx-lm's sanitize stacks), and
# read back with from_pretrained. Expert size 24, not 32: with hidden 64, 2I = 32·2 would make gate_up_proj square
# (E, 64, 64), so its shapes would not tell its in from its out
QWEN2_MOE = {"model_class": "Qwen2MoeForCausalLM", "config_class": "Qwen2MoeConfig", "save_pretrained": True,
             "moe": {"parent": "mlp", "experts": 4, "intermediate": 24},
             "config": {**TINY.QWEN2["config"], "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48,
                        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
                        "decoder_sparse_step": 1, "mlp_only_layers": []}}
MIXTRAL = {"model_class": "MixtralForCausalLM", "config_class": "MixtralConfig", "save_pretrained": True,
           "moe": {"parent": "block_sparse_moe", "experts": 4, "intermediate": 24},
           "config": {**_DENSE, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}}
# measured by the generate stage (meta.json "fuse" of the *_switch cases): mlx_lm fuse of an MoE adapter writes
# mlx-lm's module tree (switch_mlp.{gate,up,down}_proj.weight (E, out, in)); mlx_lm.load reads it, transformers does not
_NO_FUSE = ("mlx_lm fuse writes switch_mlp.*_proj.weight stacks; transformers 5.25 leaves mlp.experts.* unread "
            "and reports them unexpected")
QWEN2_MOE["fuse_not_applicable"] = MIXTRAL["fuse_not_applicable"] = _NO_FUSE
# more types with transformers 5's layout (gate_up_proj gate rows first, a TopKRouter `mlp.gate` holding a bare
# weight) and mlx-lm's mlp.switch_mlp (SwitchGLU) + mlp.gate (nn.Linear): Qwen3-MoE (qk norms per head, head_dim
# given: mlx-lm requires it), OLMoE (qk norms over all heads; its experts' size is intermediate_size; no shared
# expert, every block MoE)
QWEN3_MOE = {"model_class": "Qwen3MoeForCausalLM", "config_class": "Qwen3MoeConfig", "save_pretrained": True,
             "moe": {"parent": "mlp", "experts": 4, "intermediate": 24}, "fuse_not_applicable": _NO_FUSE,
             "config": {**TINY.QWEN2["config"], "head_dim": 16, "moe_intermediate_size": 24, "num_experts": 4,
                        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
                        "mlp_only_layers": []}}
OLMOE = {"model_class": "OlmoeForCausalLM", "config_class": "OlmoeConfig", "save_pretrained": True,
         "moe": {"parent": "mlp", "experts": 4, "intermediate": 24}, "fuse_not_applicable": _NO_FUSE,
         "config": {**_DENSE, "intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2,
                    "norm_topk_prob": False}}
# GLM-4.5 (glm4_moe): the same experts and switch_mlp, plus what the mapping must leave alone: a first dense block
# (first_k_dense_replace: mlp.{gate,up,down}_proj Linears, the same names on both sides), a shared expert
# (mlp.shared_experts.*, the same names), and a router that is a bare weight in both libraries (mlx-lm's MoEGate is
# no Linear: mlx-lm cannot put LoRA on it); partial rotary, qk norms and q/k/v biases (GLM-4.5's settings)
GLM4_MOE = {"model_class": "Glm4MoeForCausalLM", "config_class": "Glm4MoeConfig", "save_pretrained": True,
            "moe": {"parent": "mlp", "experts": 4, "intermediate": 24}, "fuse_not_applicable": _NO_FUSE,
            "config": {**_DENSE, "attention_bias": True, "head_dim": 16, "partial_rotary_factor": 0.5,
                       "rope_scaling": None, "use_qk_norm": True, "intermediate_size": 48,
                       "moe_intermediate_size": 24, "n_routed_experts": 4, "n_shared_experts": 1,
                       "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.5,
                       "norm_topk_prob": True, "first_k_dense_replace": 1}}
ARCHS = {"llama": TINY.LLAMA, "qwen2": TINY.QWEN2, "qwen2_moe": QWEN2_MOE, "mixtral": MIXTRAL,
         "qwen3_moe": QWEN3_MOE, "olmoe": OLMOE, "glm4_moe": GLM4_MOE}

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

# the older eras, in their own releases (issue 15): each case's adapter written by that release's lora.run path
# (its CLI flags: 0.13.1 --lora-layers/--use-dora, 0.20.6 --num-layers/--fine-tune-type), loaded by its
# mlx_lm.utils.load(base, adapter_path=); the PEFT equivalent uses the scale its era is claimed to apply
# ("scale_rule"), and the worker records the release's own LoRALinear.scale and the logits under the other rule.
# The CLI's default lora_parameters {rank 8, alpha 16, scale 10} have alpha ≠ rank: 20 in the 2024-03 era, 10 after
_CLI_LP = {"rank": 8, "alpha": 16, "dropout": 0.0, "scale": 10.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
_DORA_LP = {"rank": 4, "alpha": 2, "dropout": 0.0, "scale": 3.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}
for _env, _rule in (("mlxlm0131", "scale·alpha/rank"), ("mlxlm0206", "scale")):
    _stages = [("base", _env), ("generate", _env)]
    CASES.update({
        f"{_env}/llama_cli_lp": {"stages": _stages, "arch": "llama", "fine_tune_type": "lora", "num_layers": 2,
                                 "lora_parameters": _CLI_LP, "scale_rule": _rule,
                                 "note": "the CLI's default lora_parameters (alpha 16, rank 8, scale 10)"},
        f"{_env}/llama_dora": {"stages": _stages, "arch": "llama", "fine_tune_type": "dora", "num_layers": 1,
                               "lora_parameters": _DORA_LP, "scale_rule": _rule,
                               "note": "DoRA, alpha 2 ≠ rank 4, the last block"},
    })
# 0.19.0–0.21.x select blocks by model.layers[-min(num_layers, 0):] (0.22.0: -max): a positive num_layers adapts
# every block (llama_dora above: both), and -1 ("all") every block but the first
CASES["mlxlm0206/llama_all_minus1"] = {"stages": [("base", "mlxlm0206"), ("generate", "mlxlm0206")], "arch": "llama",
                                       "fine_tune_type": "lora", "num_layers": -1, "scale_rule": "scale",
                                       "lora_parameters": dict(_CLI_LP, rank=4, alpha=4, scale=2.0),
                                       "note": "num_layers -1"}

# MoE (issue 15). mlx-written: LoRASwitchLinear on switch_mlp (lora_a (E, r, in), lora_b (E, out, r)); the PEFT
# equivalent targets the experts' 3-D parameters (target_parameters, ParamWrapper). PEFT-written ("kind": "peft"):
# real get_peft_model + save_pretrained on the transformers-5 base, with an mlx-lm equivalent built by hand.
_SWITCH = ["switch_mlp.gate_proj", "switch_mlp.up_proj", "switch_mlp.down_proj"]
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CASES.update({
    "mlxlm0322/qwen2moe_switch": {"stages": STAGES, "arch": "qwen2_moe", "fine_tune_type": "lora", "num_layers": -1,
                                  "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 2.0,
                                                      "keys": ["self_attn.q_proj", "self_attn.v_proj",
                                                               *("mlp." + k for k in _SWITCH)]}},
    "mlxlm0322/mixtral_switch": {"stages": STAGES, "arch": "mixtral", "fine_tune_type": "lora", "num_layers": 1,
                                 "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 3.0,
                                                     "keys": ["self_attn.q_proj",
                                                              *("block_sparse_moe." + k for k in _SWITCH)]}},
    "mlxlm0322/qwen2moe_all_last1": {"stages": STAGES, "arch": "qwen2_moe", "fine_tune_type": "lora", "num_layers": 1,
                                     "lora_parameters": {"rank": 2, "dropout": 0.0, "scale": 1.5},
                                     "note": "no keys: every Linear and SwitchLinear of the last block (router, "
                                             "shared expert and its gate included)"},
    "mlxlm0322/peft_qwen2moe": {"stages": STAGES, "kind": "peft", "arch": "qwen2_moe",
                                "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                "target_parameters": _EXPERTS}},
    "mlxlm0322/peft_mixtral_rslora": {"stages": STAGES, "kind": "peft", "arch": "mixtral",
                                      "peft_config": {"r": 4, "lora_alpha": 6, "use_rslora": True,
                                                      "target_modules": ["o_proj"], "target_parameters": _EXPERTS}},
    "mlxlm0322/peft_qwen2moe_down": {"stages": STAGES, "kind": "peft", "arch": "qwen2_moe",
                                     "peft_config": {"r": 2, "lora_alpha": 5, "target_modules": [],
                                                     "target_parameters": ["mlp.experts.down_proj"]}},
    # peft nests ParamWrappers in the order the module defines its parameters (gate_up_proj, then down_proj: the
    # outer `experts.lora_A` is down_proj's when both are targeted), so here, alone, `experts.lora_A` is gate_up_proj's
    "mlxlm0322/peft_qwen2moe_gateup": {"stages": STAGES, "kind": "peft", "arch": "qwen2_moe",
                                       "peft_config": {"r": 2, "lora_alpha": 3, "target_modules": [],
                                                       "target_parameters": ["mlp.experts.gate_up_proj"]}},
    # more MoE types with the same layout: one mlx-written and one peft-written case each
    "mlxlm0322/qwen3moe_switch": {"stages": STAGES, "arch": "qwen3_moe", "fine_tune_type": "lora", "num_layers": -1,
                                  "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 2.5,
                                                      "keys": ["self_attn.q_proj", *("mlp." + k for k in _SWITCH)]}},
    "mlxlm0322/olmoe_switch": {"stages": STAGES, "arch": "olmoe", "fine_tune_type": "lora", "num_layers": -1,
                               "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 3.0,
                                                   "keys": ["self_attn.q_proj", *("mlp." + k for k in _SWITCH)]}},
    "mlxlm0322/peft_qwen3moe": {"stages": STAGES, "kind": "peft", "arch": "qwen3_moe",
                                "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                "target_parameters": _EXPERTS}},
    "mlxlm0322/peft_olmoe": {"stages": STAGES, "kind": "peft", "arch": "olmoe",
                             "peft_config": {"r": 4, "lora_alpha": 12, "target_modules": ["q_proj", "v_proj"],
                                             "target_parameters": _EXPERTS}},
    # block 0 dense, block 1 MoE with a shared expert. peft 0.21.2 rewrites target_modules ending in gate_proj/
    # up_proj/down_proj into the experts' target_parameters on this model type (measured by "peft_target_probe"), so
    # the dense block's and the shared expert's Linears have no PEFT equivalent: only attention and switch_mlp here
    "mlxlm0322/glm4moe_switch": {"stages": STAGES, "arch": "glm4_moe", "fine_tune_type": "lora", "num_layers": -1,
                                 "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 2.0,
                                                     "keys": ["self_attn.q_proj", *("mlp." + k for k in _SWITCH)]},
                                 "peft_target_probe": [["model.layers.1.mlp.shared_experts.down_proj"],
                                                       ["model.layers.0.mlp.gate_proj",
                                                        "model.layers.0.mlp.up_proj"]]},
    "mlxlm0322/peft_glm4moe": {"stages": STAGES, "kind": "peft", "arch": "glm4_moe",
                               "peft_config": {"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"],
                                               "target_parameters": _EXPERTS}},
})

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


_MOE_TYPES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "glm4_moe")


def _row(case, target, load, ref, *, source="adapter", expect="ok", note=None, model_type=True, env=PRIMARY_ENV,
         from_=None):
    arch = CASES[case]["arch"] if case in CASES else case.split("/")[-1].split("_")[0]
    row = {"case": case, "source": source, "target": target, "env": env, "expect": expect, "arch": arch,
           "load": load, "ref": ref}
    if model_type and arch in _MOE_TYPES:
        row["extra_args"] = ["--model-type", arch]  # mlx-lm names the experts by model type, and whether peft
        # retargets a Linear onto them depends on it; the configs here name no base model that resolves from the
        # working directory (a user passes --base-model DIR or --model-type)
    if from_:
        row["extra_args"] = ["--from", from_]
    return dict(row, note=note) if note else row


_OLD = "mlx-lm-2024-03"
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
    # MoE (issue 15): PEFT target_parameters ↔ mlx-lm LoRASwitchLinear; no `mlx_lm fuse` check (_NO_FUSE)
    + [_row("mlxlm0322/" + c, "mlx-lm", "mlx", "logits")
       for c in ("peft_qwen2moe", "peft_mixtral_rslora", "peft_qwen2moe_down", "peft_qwen2moe_gateup")]
    + [_row("mlxlm0322/" + c, "peft", "peft", "logits_mlx")
       for c in ("qwen2moe_switch", "mixtral_switch", "qwen2moe_all_last1")]
    + [_row("mlxlm0322/" + c, "mlx-lm", "mlx", "logits_mlx", note="mlx-lm → mlx-lm")
       for c in ("qwen2moe_switch", "mixtral_switch")]
    + [_row("mlxlm0322/qwen2moe_switch", "mlx-lm", "mlx", "logits_mlx", source="peft_equivalent")]
    + [_row("mlxlm0322/peft_qwen2moe", "mlx-lm", "mlx", "logits", expect="refused", model_type=False,
            note="no model type (the config names no base model): mlx-lm's experts path is not known")]
    # more MoE types (qwen3_moe, olmoe, glm4_moe): PEFT → mlx-lm, mlx-lm → PEFT
    + [_row("mlxlm0322/" + c, "mlx-lm", "mlx", "logits") for c in ("peft_qwen3moe", "peft_olmoe", "peft_glm4moe")]
    + [_row("mlxlm0322/" + c, "peft", "peft", "logits_mlx")
       for c in ("qwen3moe_switch", "olmoe_switch", "glm4moe_switch")]
    # the older eras (issue 15): outputs loaded by the real old releases (env = the release's), and the adapters
    # those releases wrote converted to peft (peft 0.21.2) and to today's mlx-lm (0.32.2)
    + [_row(_GGUF + c, "mlx-lm-2024-03", "mlx", "logits", env="mlxlm0131")
       for c in ("llama_plain", "llama_rslora", "llama_patterns")]
    + [_row(_GGUF + c, "mlx-lm-2024-06", "mlx", "logits", env="mlxlm0131",
            note="the 2024-06 writer's alpha = rank, lora_layers and use_dora load in 0.13.1 too")
       for c in ("llama_plain", "llama_dora")]
    + [_row(_GGUF + c, "mlx-lm-2024-06", "mlx", "logits", env="mlxlm0206")
       for c in ("llama_plain", "llama_rslora", "llama_patterns", "llama_dora")]
    + [_row("mlxlm0322/llama_all_last1", "mlx-lm-2024-06", "mlx", "logits_mlx", env="mlxlm0206",
            note="num_layers 1 of 2: 0.20.6 adapts block 0 too, lora_b = 0 there")]
    + [_row("mlxlm0131/llama_dora", "mlx-lm-2024-06", "mlx", "logits_mlx", env="mlxlm0206", from_=_OLD,
            note="DoRA on the last block: 0.20.6 puts DoRA on block 0 too (lora_b = 0, m = ‖W‖)")]
    + [_row("mlxlm0131/llama_dora", "mlx-lm-2024-03", "mlx", "logits_mlx", env="mlxlm0131", from_=_OLD,
            expect="refused", note="DoRA into mlx-lm-2024-03 (0.2.0–0.13.0 have no DoRA; 0.13.1 has)")]
    # adapters the old releases wrote: 0.13.1's config (alpha 16 ≠ rank 8, use_dora but no num_layers) does not
    # tell its era, so --from mlx-lm-2024-03, as a user who knows the writer passes it
    + [_row(f"mlxlm0131/{c}", "peft", "peft", "logits_mlx", from_=_OLD) for c in ("llama_cli_lp", "llama_dora")]
    + [_row(f"mlxlm0206/{c}", "peft", "peft", "logits_mlx") for c in ("llama_cli_lp", "llama_dora", "llama_all_minus1")]
    + [_row("mlxlm0131/llama_cli_lp", "mlx-lm", "mlx", "logits_mlx", from_=_OLD, note="0.13.1 → today's mlx-lm")]
    + [_row("mlxlm0206/llama_cli_lp", "mlx-lm", "mlx", "logits_mlx", note="0.20.6 → today's mlx-lm")]
    + [_row("mlxlm0206/llama_dora", "mlx-lm", "mlx", "logits_mlx",
            note="num_layers 1 but both blocks saved: 0.32.2 refuses the file as it is (block 0's tensors)")]
)
# the harness's bound on max |logit diff|; each row also meets tests/tolerance.py's model, checked by the worker:
# 192·u(f32)·max|ref| + 4·noise (noise: this base's logits against the stored base logits), ~6e-5 for logits ≤ 5
TOL = 1e-4

# a result "matches" when max |logit diff| <= REL_TOL[dtype] * max |reference logit| (float32: ~80 ulps of the
# largest logit; the tiny models' logits reach ~5-10, the LoRA effects 1-4)
REL_TOL = {"f32": 1e-5}
