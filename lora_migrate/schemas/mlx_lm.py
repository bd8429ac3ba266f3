"""The mlx-lm family: ``adapters.safetensors`` + ``adapter_config.json`` (the whole ``mlx_lm lora`` args dict), by era.

Source: ../shared/reference/ecosystem.md §5 and §15, mlx-lm wheels 0.2.0, 0.14.2, 0.14.3, 0.19.0, 0.20.1, 0.21.0,
0.25.0, 0.25.1 read from PyPI, and mlx-lm 0.13.1, 0.20.6 and 0.32.2 measured (golden/results/FINDINGS_MLX.md).

Layout in every era: keys are the mlx model's parameter paths without ``.weight`` (``model.layers.N.self_attn.
q_proj.lora_a``); ``lora_a`` is (in, r) = Aᵀ and ``lora_b`` (r, out) = Bᵀ (``LoRALinear``: y = W x + scale·(x @
lora_a) @ lora_b); DoRA adds ``.m`` (out,), which computes what PEFT's ``lora_magnitude_vector`` does (measured:
2.3e-6 logits against PEFT in 0.32.2, 1.4e-6 in 0.13.1, its first release with DoRA, 2.4e-6 in 0.20.6). One ``rank``
for the whole adapter: ``load_adapters`` rejects any other shape.

What ``scale`` means, by era (the config is read at load time by whatever mlx-lm loads it):

- 2024-03 (#546, first in 0.2.0): ``self.scale = scale * (alpha / r)``; the CLI writes ``{"rank": 8, "alpha": 16,
  "dropout": 0.0, "scale": 10.0}``; the layer count is ``lora_layers``;
  ``use_dora`` (DoRA) from 0.13.1 on;
- 2024-06 (c457a3f8, first in 0.14.2): ``self.scale = scale`` — absolute; ``alpha`` is still written by the CLI
  (16) and ignored; ``lora_layers`` + ``use_dora`` until 0.19, where ``num_layers`` + ``fine_tune_type`` replace
  them; with no ``keys`` only the model type's defaults (q_proj, v_proj for Llama) get LoRA. 0.19.0–0.21.x pick
  the blocks by ``model.layers[-min(num_layers, 0):]`` (0.22.0: ``-max``): a positive count adapts every block,
  −1 every block but the first (measured in 0.20.6); blocks the file has no factors for keep lora_b = 0;
- 2025-06 (e673a97c, first in 0.25.1): the same formula; the CLI default scale 20 and no ``alpha``; with no
  ``keys`` every Linear of a block gets LoRA (0.32.2); ``keys`` may also name modules outside the blocks by their
  full path (the second loop over ``model.named_modules()``; in 0.18.2 and later, the earliest read, not in 0.13.1).

A config with ``alpha`` ≠ ``rank`` and no field that dates it is therefore read two ways (scale·alpha/rank before
0.14.2, scale after): detection asks for ``--from``. Writers always write explicit ``keys`` (the no-keys default
changed) and, for the 2024-06 era, ``alpha = rank`` (so a 2024-03 loader computes scale·rank/rank = scale as well)
and every spelling of the layer count and the DoRA switch.
"""

from __future__ import annotations

from .base import Convention, KeyTemplates, Scaling

FAMILY = "mlx-lm"
WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"

MLX_KEYS = KeyTemplates(a="{module}.lora_a", b="{module}.lora_b", magnitude="{module}.m")

# the parameter-leaf names mlx-lm's load_adapters accepts ("m": DoRA)
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
# mlx-lm's MoE layers (LoRASwitchLinear): stacked per-expert factors, lora_a (E, r, in) and lora_b (E, out, r) as
# they are (not transposed), ΔW_e = scale·lora_b[e]@lora_a[e]. Canonical names are transformers 5's: one 3-D
# ``mlp.experts.gate_up_proj`` (E, 2I, H), gate rows first, and ``mlp.experts.down_proj`` (E, H, I). Per model type
# (measured with mlx-lm 0.32.2 and transformers 5.25.0, golden/families/mlx: qwen2_moe, mixtral, qwen3_moe, olmoe,
# glm4_moe — one mlx-written and one peft-written case each, both ways): the block path of mlx-lm's SwitchGLU, and
# the block-path prefix mlx-lm names differently (mixtral's block_sparse_moe is transformers 5's mlp). glm4_moe's
# first dense blocks and shared experts keep the same names on both sides. Other layouts (gpt_oss, llama4, dots1,
# afmoe, Klear: ``experts``, some interleaved or transposed) and types not run (deepseek_v2/v3: MLA attention) are
# refused.
SWITCH_MARKERS = ("switch_mlp", "switch_glu")
SWITCH = "switch_mlp"
SWITCH_PARTS = ("gate_proj", "up_proj", "down_proj")
CANONICAL_EXPERTS = "mlp.experts"
SWITCH_PARENTS = {"qwen2_moe": "mlp", "mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "olmoe": "mlp",
                  "glm4_moe": "mlp"}
# types whose mlx-lm router (mlp.gate) is no Linear (glm4_moe's MoEGate: a bare weight plus a correction bias), so
# mlx-lm cannot load LoRA on it ("Can't convert layer of type MoEGate to LoRA", mlx-lm 0.32.2 tuner/utils.py)
SWITCH_ROUTER_NOT_LINEAR = ("glm4_moe",)
# types whose first blocks may be dense (glm4_moe: first_k_dense_replace, an nn MLP under the same ``mlp``)
SWITCH_DENSE_FIRST = ("glm4_moe",)

# the scale each era applies, from lora_parameters (see the module docstring)
SCALE_RULES = {
    "mlx-lm-2024-03": "scale·alpha/rank",
    "mlx-lm-2024-06": "scale",
    "mlx-lm": "scale",
}

# config fields that date a file to the scale-absolute eras (first release that writes them). Not ``use_dora``:
# mlx-lm 0.13.1 (2024-03 era, scale·alpha/rank) already writes it (``"use_dora": false`` in every args dict;
# measured, golden/mlx/mlxlm0131), so it says nothing about the scale
DATED_FIELDS = {"num_layers": "0.19.0", "fine_tune_type": "0.19.0"}
# what each era's load_adapters reads for the layer count and the DoRA switch (0.2.0/0.14.2: config.lora_layers,
# getattr(config, "use_dora", False); 0.19.0 and later: config.num_layers, getattr(config, "fine_tune_type", "lora"))
LAYER_COUNT_FIELDS = {"mlx-lm-2024-03": ("lora_layers",), "mlx-lm-2024-06": ("lora_layers", "num_layers"),
                      "mlx-lm": ("num_layers",)}
DORA_FIELDS = {"mlx-lm-2024-03": (), "mlx-lm-2024-06": ("use_dora", "fine_tune_type"), "mlx-lm": ("fine_tune_type",)}

# what the writer puts in adapter_config.json besides lora_parameters, per target (the CLI's own defaults)
CONFIG_BASE = {"adapter_path": "adapters", "batch_size": 4, "iters": 1000, "learning_rate": 1e-05,
               "max_seq_length": 2048, "seed": 0, "train": False, "test": False}

REFUSALS = {
    "switch": "stacked-experts LoRA under these names (3-D lora_a/lora_b outside <block>.mlp.switch_mlp or "
              "block_sparse_moe.switch_mlp: gpt_oss, llama4 and others, some with interleaved or transposed "
              "gate/up) has not been measured against PEFT here",
    "switch_era": "mlx-lm's LoRASwitchLinear is measured in mlx-lm 0.32.2 (era mlx-lm) only",
    "switch_model_type": "mlx-lm names a model's experts by its model type (qwen2_moe: mlp.switch_mlp, mixtral: "
                         "block_sparse_moe.switch_mlp); measured for " + ", ".join(SWITCH_PARENTS),
    "switch_router": "mlx-lm's router of this model type (MoEGate) is no Linear: mlx-lm cannot put LoRA on it",
    "embedding": "mlx-lm's LoRAEmbedding has not been checked against PEFT's embedding LoRA here",
    "full": "fine_tune_type \"full\" saves full trained weights, not a LoRA adapter",
    "lora_bias": "mlx-lm's LoRA layers have no bias on B",
    "modules_to_save": "mlx-lm adapters hold only lora_a/lora_b/m, not full module copies",
}

_COMMON = dict(family=FAMILY, library="mlx-lm", config_file=CONFIG, keys=MLX_KEYS,
               weights_read=(WEIGHTS,), weights_write=WEIGHTS)

MLX_LM_2024_03 = Convention(
    name="mlx-lm-2024-03", versions=">=0.2.0,<0.14.2", aliases=("mlx-lm@0.2", "mlx-lm-0.2"),
    summary="mlx-lm 0.2.0–0.14.1: adapters.safetensors + adapter_config.json; effective scale = scale·alpha/rank",
    scaling={"linear": Scaling.ALPHA},
    scaling_notes="scale·alpha/rank with lora_parameters {rank, alpha, scale} (mlx-examples #546, 2024-03)",
    features=frozenset(), **_COMMON)

MLX_LM_2024_06 = Convention(
    name="mlx-lm-2024-06", versions=">=0.14.2,<0.25.1", aliases=("mlx-lm-0.14", "mlx-lm-0.20"),
    summary="mlx-lm 0.14.2–0.25.0: scale absolute, alpha written but ignored; lora_layers/num_layers, use_dora",
    scaling={"linear": Scaling.ALPHA},
    scaling_notes="scale absolute (alpha ignored; c457a3f8, 2024-06); the CLI still writes alpha 16, scale 10",
    features=frozenset({"dora"}), **_COMMON)

MLX_LM = Convention(
    name="mlx-lm", versions=">=0.25.1", aliases=("mlx-lm-2025-06", "mlx_lm", "mlx"),
    summary="mlx-lm ≥ 0.25.1: adapters.safetensors (lora_a = Aᵀ, lora_b = Bᵀ) + adapter_config.json, scale absolute",
    scaling={"linear": Scaling.ALPHA, "experts": Scaling.ALPHA},
    scaling_notes="y = W x + scale·(x @ lora_a) @ lora_b, scale absolute (PEFT alpha = scale·r; measured in 0.32.2)",
    features=frozenset({"dora", "top_level_keys"}), **_COMMON)

CONVENTIONS = (MLX_LM_2024_03, MLX_LM_2024_06, MLX_LM)
