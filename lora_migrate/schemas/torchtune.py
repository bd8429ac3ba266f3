"""The torchtune family: ``adapter_model.pt`` (torch.save of the adapter state dict) or ``.safetensors``.

Source: ../shared/reference/ecosystem.md §6 and §15, torchtune 0.6.1 as installed (modules/peft/lora.py,
models/convert_weights.py, training/checkpointing/_checkpointer.py) and measured (golden/results/
FINDINGS_TORCHTUNE.md).

- Keys follow torchtune's module tree: ``layers.N.attn.{q,k,v,output}_proj.lora_{a,b}.weight``,
  ``layers.N.mlp.{w1,w2,w3}.lora_{a,b}.weight`` (w1 = gate, w2 = down, w3 = up), ``output.lora_{a,b}.weight``
  (lm_head); DoRA ``….magnitude`` (out,). PEFT orientation: lora_a (r, in), lora_b (out, r). Scale alpha/rank
  (``LoRALinear.scaling``), no rsLoRA; one rank and alpha per model (the builders' ``lora_rank``/``lora_alpha``).
- The builders put LoRA on the same modules of every layer: ``lora_attn_modules`` (a subset of q/k/v/output_proj),
  ``apply_lora_to_mlp`` (w1, w2 and w3 together), ``apply_lora_to_output``; the recipe's
  ``validate_missing_and_unexpected_for_lora`` refuses an adapter state dict that lacks any of them.
- Llama (and Mistral, which use ``convert_weights.hf_to_tune``) keep q/k in Meta's interleaved-RoPE row order:
  ``hf_to_tune`` permutes the rows of q_proj/k_proj per head (n_heads for q, n_kv_heads for k). ΔW' = P·ΔW =
  (P·B)·A, so only lora_b (and DoRA's magnitude, indexed by output row) is permuted. Qwen2/Qwen3 are not
  permuted (``qwen2_hf_to_tune``).
- Its PEFT export (``adapter_model.safetensors`` + ``adapter_config.json``) permutes q/k lora_B with
  ``tune_to_hf`` for every model type, Qwen2 included, where it scrambles q/k (measured: PEFT on the export 3.95
  logits off torchtune; with the permutation undone 1.8e-6); DoRA exports lack ``use_dora`` and leave the q/k
  magnitudes unpermuted. There is no PEFT → torchtune function.
"""

from __future__ import annotations

from .base import Convention, KeyTemplates, Scaling

FAMILY = "torchtune"
WEIGHTS_PT = "adapter_model.pt"
WEIGHTS_ST = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

TT_KEYS = KeyTemplates(a="{module}.lora_a.weight", b="{module}.lora_b.weight", magnitude="{module}.magnitude")

# torchtune module path (inside layers.N) ↔ the HF transformers path (inside model.layers.N)
LAYER_NAMES = {
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj", "mlp.w3": "mlp.up_proj",
}
TOP_NAMES = {"output": "lm_head"}
# the recipe options that switch each module on (the builders apply one choice to every layer)
ATTN_OPTION = {"attn.q_proj": "q_proj", "attn.k_proj": "k_proj", "attn.v_proj": "v_proj",
               "attn.output_proj": "output_proj"}
MLP = ("mlp.w1", "mlp.w2", "mlp.w3")

# HF model_type → whether torchtune's form permutes q/k rows (its checkpointer's hf_to_tune for that type)
PERMUTES_QK = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
# model_type → the checkpointer's ModelType and the LoRA builder (what the adapter must be loaded into)
MODEL_TYPES = {"llama": "LLAMA3", "mistral": "MISTRAL", "qwen2": "QWEN2", "qwen3": "QWEN3"}

REFUSALS = {
    "rslora": None,  # rewritten exactly: the scale is folded into the one global alpha/B
    "lora_bias": "torchtune's LoRALinear has no bias on lora_b",
    "modules_to_save": "torchtune adapters hold only LoRA factors (and DoRA magnitudes), not full module copies",
    "embedding": "torchtune has no embedding LoRA",
}

TORCHTUNE = Convention(
    name="torchtune", family=FAMILY, library="torchtune", versions=">=0.6.0", aliases=("torchtune-0.6",),
    summary="torchtune ≥ 0.6 (checked with 0.6.1) adapter_model.pt: layers.N.attn.q_proj.lora_a.weight … (PEFT orientation), scale alpha/rank",
    keys=TT_KEYS,
    scaling={"linear": Scaling.ALPHA_OVER_R},
    scaling_notes="alpha/rank, one rank and alpha for the model (modules/peft/lora.py); q/k lora_b in Meta row "
                  "order for Llama",
    config_file=CONFIG, weights_read=(WEIGHTS_PT, WEIGHTS_ST), weights_write=WEIGHTS_PT,
    features=frozenset({"dora"}),
)

CONVENTIONS = (TORCHTUNE,)
