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

ACCEPTANCE = []

# max |logit diff| <= REL_TOL * max |reference logit| (float32, ~80 ulps of the largest logit)
REL_TOL = {"f32": 1e-5}
