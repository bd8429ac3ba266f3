"""torchtune family: data only, stdlib-only.

Ground truth for torchtune's adapter files, written by the real torchtune 0.6.1: a tiny HF-layout base (written in the
peft env by transformers, seeded) read through torchtune's ``FullModelHFCheckpointer``, the model built with
torchtune's LoRA component builders (``lora_llama2`` / ``lora_qwen2``) with tiny dims, the LoRA factors randomized with
a seed, torchtune's logits, then ``save_checkpoint`` exactly as ``recipes/lora_finetune_single_device.py`` calls it
(adapter_model.pt, its PEFT export adapter_model.safetensors + adapter_config.json, and the merged HF model). The peft
env then loads the PEFT export in real peft and the merged model in transformers, against torchtune's logits.

torchtune 0.6.1 needs torchao 0.11.0 and peft 0.21.2 refuses torchao < 0.16 (ecosystem.md §15): two envs, torchtune061
and the peft family's pf21 (its package set is golden/peft/pf21/pip-freeze.txt).
"""

import importlib.util as _iu
from pathlib import Path as _Path

_spec = _iu.spec_from_file_location("golden_tiny_decoders", _Path(__file__).resolve().parent.parent / "tiny_decoders.py")
TINY = _iu.module_from_spec(_spec)
_spec.loader.exec_module(TINY)  # shared data: the tiny Llama/Qwen2, seeds, token ids


ENVS = {
    "torchtune061": {
        "library": "torchtune",
        "library_version": "0.6.1",
        "deps": ["torchtune==0.6.1", "torchao==0.11.0", "safetensors", "numpy"],
    },
}

MODEL_SEED, LORA_SEED, LORA_STD, INPUT_IDS = TINY.MODEL_SEED, TINY.LORA_SEED, TINY.LORA_STD, TINY.INPUT_IDS


# HF configs; torchtune's builders get the same dims (see worker.tt_model). rope_theta follows each torchtune
# builder's fixed/default base (llama2: 10000, qwen2: 1e6).
ARCHS = {
    name: {"model_class": a["model_class"], "config_class": a["config_class"], "tt_model_type": tt,
           "tt_builder": builder, "config": {**a["config"], **fixed}}
    for name, a, tt, builder, fixed in (
        ("llama", TINY.LLAMA, "LLAMA2", "torchtune.models.llama2.lora_llama2", {"rms_norm_eps": 1e-5}),
        ("qwen2", TINY.QWEN2, "QWEN2", "torchtune.models.qwen2.lora_qwen2", {"rope_theta": 1000000.0}))
}

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _case(arch, attn, *, mlp=False, output=False, rank=8, alpha=16.0, dora=False):
    # the HF base in pf21 (once per arch), torchtune's files in torchtune061, peft and transformers on them in pf21
    return {"stages": [("base", "pf21"), ("generate", "torchtune061"), ("peft_load", "pf21")], "arch": arch,
            "lora": {"lora_attn_modules": attn, "apply_lora_to_mlp": mlp, "apply_lora_to_output": output,
                     "lora_rank": rank, "lora_alpha": alpha, "use_dora": dora}}


# case ids are <env>/<name> (golden/torchtune/torchtune061/<name>); their bases are torchtune061/_base/<arch>
CASES = {f"torchtune061/{name}": case for name, case in {
    "llama_qv": _case("llama", ["q_proj", "v_proj"]),
    "llama_qk": _case("llama", ["q_proj", "k_proj"]),
    "llama_all": _case("llama", ALL_ATTN, mlp=True, output=True, rank=4, alpha=8.0),
    "llama_dora": _case("llama", ["q_proj", "k_proj", "v_proj"], rank=4, alpha=8.0, dora=True),
    "qwen2_qk": _case("qwen2", ["q_proj", "k_proj"]),
    "qwen2_all": _case("qwen2", ALL_ATTN, mlp=True, rank=4, alpha=8.0),
}.items()}

# ACCEPTANCE: conversions by the landed CLI loaded back in the real libraries: into torchtune through its
# checkpointer (FullModelHFCheckpointer resuming with adapter_checkpoint, the recipe's load_state_dict and
# validate_missing_and_unexpected_for_lora) in torchtune061, into PEFT with PeftModel.from_pretrained in pf21.
# "ref": the key of the source case's logits.safetensors the output must reproduce; "ref_base": its base logits
# (the noise floor). Bases: the source case's own <case>/../_base/<arch> (HF config.json + model.safetensors).
_BASE = ["--base-model", "{case}/../_base/"]


def _row(case, target, load, ref, ref_base, *, source="adapter", expect="ok", args=(), note=None):
    arch = case.split("/")[-1].split("_")[0]
    row = {"case": case, "source": source, "target": target, "expect": expect, "arch": arch, "load": load,
           "env": "torchtune061" if load == "torchtune" else "pf21", "ref": ref, "ref_base": ref_base,
           "extra_args": [*args, _BASE[0], _BASE[1] + arch]}
    return dict(row, note=note) if note else row


_TT = "torchtune061/"
_GGUF = "llamacpp/"  # PEFT adapters written by real peft 0.21.2 (the gguf family's cases)
ACCEPTANCE = (
    # torchtune's own adapter_model.pt → PEFT: q/k rows back to the HF layout for Llama, untouched for Qwen2
    [_row(_TT + c, "peft", "peft", "logits_torchtune", "base_logits_torchtune", source="torchtune")
     for c in ("llama_qv", "llama_qk", "llama_all", "llama_dora", "qwen2_qk", "qwen2_all")]
    # torchtune's PEFT export (SRC = the file: the folder is torchtune's) → torchtune (for Qwen2 the export is
    # scrambled: the output carries what PEFT computes from it, so torchtune must reproduce PEFT's logits of it)
    + [_row(_TT + c, "torchtune", "torchtune", ref, "base_logits_torchtune",
            source="torchtune/adapter_model.safetensors")
       for c, ref in (("llama_qv", "logits_torchtune"), ("llama_qk", "logits_torchtune"),
                      ("llama_all", "logits_torchtune"), ("qwen2_qk", "logits_peft_export"),
                      ("qwen2_all", "logits_peft_export"))]
    + [_row(_TT + "llama_dora", "torchtune", "torchtune", "logits_torchtune", "base_logits_torchtune",
            source="torchtune", note="torchtune → torchtune (DoRA, q/k permuted both ways)")]
    # PEFT goldens (rsLoRA, rank/alpha patterns, all-linear, DoRA) → torchtune
    + [_row(_GGUF + c, "torchtune", "torchtune", "logits", "base_logits")
       for c in ("llama_plain", "llama_rslora", "llama_patterns", "llama_all_linear", "llama_dora", "qwen2_plain",
                 "qwen2_rslora", "qwen2_patterns", "qwen2_all_linear")]
    + [_row(_GGUF + "llama_embed", "torchtune", "torchtune", "logits", "base_logits", expect="refused",
            note="embedding LoRA: torchtune has none"),
       _row(_GGUF + "llama_lora_bias", "torchtune", "torchtune", "logits", "base_logits", expect="refused",
            note="lora_B.bias: torchtune's LoRALinear has none"),
       _row("mlxlm0322/llama_all_last1", "torchtune", "torchtune", "logits_peft", "base_logits",
            source="peft_equivalent", expect="refused", note="LoRA on the last block only: torchtune's builders "
            "adapt every layer")]
)
# the harness's bound on max |logit diff|; each row also meets tests/tolerance.py's model, checked by the worker
TOL = 1e-4

# max |logit diff| <= REL_TOL * max |reference logit| (float32, ~80 ulps of the largest logit)
REL_TOL = {"f32": 1e-5}
