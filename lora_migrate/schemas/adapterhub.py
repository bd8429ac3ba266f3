"""What every AdapterHub convention shares: the adapter_config.json wrapper, the LoRA config fields by version,
and the layers that are fused QKV.

Source: ../shared/reference/adapterhub.md §3–§5 (adapter-transformers 3.1.0 ``src/transformers/adapters/``,
adapters v0.1.0–v1.2.0 and main ``src/adapters/``), and adapters 1.3.0's ``LoRAConfig`` as installed from PyPI.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import KeyTemplates, plain_folder_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# `<host path>.loras.<adapter>.lora_A` (r, in) / `.lora_B` (out, r); bare nn.Parameters, no `.weight` suffix.
# Gated LoRA adds `gate.weight` (n_gates, in) and `gate.bias`. Same in every version (adapterhub.md §3).
FAMILY = "adapterhub"  # the codec that reads and writes these conventions

LORAS_KEYS = KeyTemplates(
    a="{module}.loras.{adapter}.lora_A",
    b="{module}.loras.{adapter}.lora_B",
    gate_weight="{module}.loras.{adapter}.gate.weight",
    gate_bias="{module}.loras.{adapter}.gate.bias",
)

# Keys of other AdapterHub methods, named so that an error can say what the file holds instead of "unknown keys".
OTHER_METHOD_KEYS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.adapters\.[^.]+\."), "bottleneck adapter"),
    (re.compile(r"(^|\.)_adapters\.[^.]+\."), "bottleneck adapter"),
    (re.compile(r"\.prefix_tunings\.[^.]+\."), "prefix tuning"),
    (re.compile(r"\.prefix_gates\.[^.]+\."), "prefix tuning gate"),
    (re.compile(r"\.prompt_tunings\.[^.]+\."), "prompt tuning"),
    (re.compile(r"\.refts\.[^.]+\."), "ReFT"),
    (re.compile(r"(^|\.)shared_parameters\.[^.]+\."), "VeRA / MTL-LoRA shared parameters"),
    (re.compile(r"\.loras\.[^.]+\.(vera_[BD]|m\.weight|task_specific\.|weights$)"), "VeRA / DoRA / MTL-LoRA"),
)


class AdapterHubWrapper(_Strict):
    """adapter_config.json as ``build_full_config`` writes it (3.1.0 configuration.py:817; adapters
    model_adapters_config.py). ``config_id`` is added by ``save_all_adapters``."""

    config: dict
    hidden_size: int | None = None
    model_class: str | None = None
    model_name: str | None = None
    model_type: str | None = None
    name: str
    version: str | None = None
    config_id: str | None = None

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, name: str) -> str:
        """The name becomes a folder (``save_all_adapters``, and ours for several adapters) and a key segment
        (``loras.<name>.``): one that is not a plain folder name ('..', a path, NUL) is refused here, with its
        reason, rather than later as keys no template claims."""
        if not plain_folder_name(name):
            raise ValueError(f"adapter name {name!r} is not a plain folder name (it would be written outside "
                             "its folder, or cannot be one)")
        return name


class LoRAConfig31(_Strict):
    """``LoRAConfig`` / ``IA3Config`` dataclass fields in adapter-transformers 3.1.0–3.2.1 and adapters 0.1.0."""

    architecture: Literal["lora"]
    selfattn_lora: bool
    intermediate_lora: bool
    output_lora: bool
    r: int = Field(gt=0)
    alpha: float = Field(gt=0, allow_inf_nan=False)
    dropout: float = Field(ge=0, le=1)
    attn_matrices: list[Literal["q", "k", "v", "o"]]
    composition_mode: Literal["add", "scale"]
    init_weights: str
    use_gating: bool


class LoRAConfig10(LoRAConfig31):
    """adapters 0.1.1–1.0.1 add ``leave_out`` (#608, first in v0.1.1); 0.1.0 lacks it, hence optional."""

    leave_out: list[int] | None = None


class LoRAConfig11(LoRAConfig10):
    """adapters ≥ 1.1.0 add ``dtype`` (#767); 1.2.0 adds ``init_weights_seed``, ``vera_d``, ``vera_b``;
    main and 1.3.0 add ``use_dora``. All optional when reading so that every ≥ 1.1 release validates."""

    dtype: str | None = None
    init_weights_seed: int | None = None
    vera_d: float | None = None
    vera_b: float | None = None
    use_dora: bool | None = None


FIELDS_31 = ("alpha", "architecture", "attn_matrices", "composition_mode", "dropout", "init_weights",
             "intermediate_lora", "output_lora", "r", "selfattn_lora", "use_gating")
FIELDS_10 = (*FIELDS_31, "leave_out")
FIELDS_11 = (*FIELDS_10, "dtype")

DEFAULTS = {"leave_out": [], "dtype": None}

# String config ids resolve to the library's defaults (adapterhub.md §1 "Config defaults", §4).
LORA_DEFAULT = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False,
                "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
                "init_weights": "lora", "use_gating": False}
IA3_DEFAULT = {**LORA_DEFAULT, "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"],
               "composition_mode": "scale", "init_weights": "ia3"}
STRING_IDS = {"lora": LORA_DEFAULT, "ia3": IA3_DEFAULT}

# LoRAMergedLinear hosts, by model_type: the module path suffix (adapterhub.md §5). Everything else is LoRALinear.
FUSED_QKV_MODULES: dict[str, re.Pattern] = {
    "gpt2": re.compile(r"(^|\.)attn\.c_attn$"),
    "deberta": re.compile(r"(^|\.)attention\.self\.in_proj$"),
    "modernbert": re.compile(r"(^|\.)attn\.Wqkv$"),
}

HEAD_FILES = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors")

# Where AdapterHub LoRA attaches, by model_type: (module-path suffix regex, location, attn key) — adapterhub.md §5.
# A LoRA module at a path no row claims cannot be expressed (e.g. Llama o_proj / gate_proj, GPT-2 attn.c_proj).
# Built-in Llama/Mistral mixins wrap mlp.down_proj as "intermediate" and mlp.up_proj as "output"; the ≥1.2.0
# plug-in interfaces (Qwen2, Gemma, …) use the opposite, so the flag is chosen by module path per model_type.
_T5 = ((r"\.(SelfAttention|EncDecAttention)\.q$", "selfattn", "q"),
       (r"\.(SelfAttention|EncDecAttention)\.k$", "selfattn", "k"),
       (r"\.(SelfAttention|EncDecAttention)\.v$", "selfattn", "v"),
       (r"\.DenseReluDense\.wi(_1)?$", "intermediate", None), (r"\.DenseReluDense\.wo$", "output", None))
_LLAMA = ((r"\.self_attn\.q_proj$", "selfattn", "q"), (r"\.self_attn\.k_proj$", "selfattn", "k"),
          (r"\.self_attn\.v_proj$", "selfattn", "v"),
          (r"\.mlp\.down_proj$", "intermediate", None), (r"\.mlp\.up_proj$", "output", None))
_PLUGIN = (*_LLAMA[:3], (r"\.mlp\.up_proj$", "intermediate", None), (r"\.mlp\.down_proj$", "output", None))
_BART = ((r"\.(self_attn|encoder_attn)\.q_proj$", "selfattn", "q"),
         (r"\.(self_attn|encoder_attn)\.k_proj$", "selfattn", "k"),
         (r"\.(self_attn|encoder_attn)\.v_proj$", "selfattn", "v"),
         (r"\.fc1$", "intermediate", None), (r"\.fc2$", "output", None))
_BERT = ((r"\.attention\.self\.query$", "selfattn", "q"), (r"\.attention\.self\.key$", "selfattn", "k"),
         (r"\.attention\.self\.value$", "selfattn", "v"),
         (r"\.intermediate\.dense$", "intermediate", None), (r"(?<!attention)\.output\.dense$", "output", None))
AH_LOCATIONS: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "t5": _T5, "mt5": _T5, "llama": _LLAMA, "mistral": _LLAMA,
    "qwen2": _PLUGIN, "qwen3": _PLUGIN, "gemma2": _PLUGIN, "gemma3": _PLUGIN, "gemma3_text": _PLUGIN,
    "phi": (*_LLAMA[:3], (r"\.mlp\.fc1$", "intermediate", None), (r"\.mlp\.fc2$", "output", None)),
    "bart": _BART, "mbart": _BART,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "gpt2": ((r"\.attn\.c_attn$", "fused", None), (r"\.mlp\.c_fc$", "intermediate", None),
             (r"\.mlp\.c_proj$", "output", None)),
}
# Recognising a model family from module paths alone (PEFT configs carry no model_type).
MODEL_TYPE_BY_PATH: tuple[tuple[str, str], ...] = (
    (r"^transformer\.h\.\d+\.(attn|mlp)\.", "gpt2"),
    (r"\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention|DenseReluDense)\.", "t5"),
    (r"^model\.layers\.\d+\.(self_attn|mlp)\.", "llama"),
    (r"^model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn|fc1|fc2)", "bart"),
    (r"(^|\.)encoder\.layer\.\d+\.(attention|intermediate|output)\.", "bert"),
)
