"""The diffusers LoRA format: ``pytorch_lora_weights.safetensors`` with component prefixes, by era.

Source: ../shared/reference/ecosystem.md §3.1 and §15, and the diffusers sources of 0.33.1, 0.34.0, 0.39.0,
0.40.0, 0.41.0, 0.42.0 and 0.42.1 (``loaders/lora_base.py``, ``loaders/peft.py``, ``utils/peft_utils.py``,
``utils/state_dict_utils.py``), read from the PyPI wheels. What changes between eras:

- **0.34.0** (#11324): ``save_lora_weights`` writes each component's PEFT ``LoraConfig.to_dict()`` into the
  safetensors header key ``lora_adapter_metadata`` (JSON, ``indent=2, sort_keys=True``, keys flattened as
  ``<component>.<field>``), and the loaders build ``LoraConfig(**metadata)`` from it: per-module r and alpha through
  ``rank_pattern`` / ``alpha_pattern`` (matched as the installed PEFT matches them) and ``use_rslora`` honoured.
  Older loaders ignore the key.
- **0.40.0** (#14409): a file *without* the key loads at alpha = r for every module (scale 1). Before, the loader's
  ``get_peft_kwargs`` took ``lora_alpha`` = the rank of the first ``lora_B`` it met, so with mixed ranks a module of
  rank r loads at r_first / r (``larryvrh/MiniMax-H3-Turbo-Lora``: 0.25×).
- **0.41.0**: CLIP keys may carry ``text_model.`` or not (transformers 5 dropped that level; the loader strips it
  when the text encoder has none). Keys written with it load in every era.

Spellings read (one tensor pair per module): PEFT's ``.lora_A.weight`` / ``.lora_B.weight`` (what the training
scripts write today), ``.lora.down.weight`` / ``.lora.up.weight`` (UNet attention, ``convert_state_dict_to_diffusers``),
``.lora_linear_layer.down.weight`` / ``.up.weight`` (text encoders) and ≤ 0.20's attention processors
(``.processor.to_q_lora.down.weight``), from ``pytorch_lora_weights.safetensors`` or ``.bin``. The UNet/transformer loader decides by the
first key of the component alone (``"lora_A" not in first_key`` → rename all), so a file that mixes spellings loses
the modules of the other spelling without an error (measured 0.22 off, §15). One spelling is written: PEFT's.
"""

from __future__ import annotations

from .base import Convention, KeyTemplates, Scaling

FAMILY = "diffusers"  # the codec id (lora_migrate/codecs/diffusers)
WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHTS_BIN = "pytorch_lora_weights.bin"  # safe_serialization=False (no metadata possible: write_lora_layers raises)
METADATA_SINCE = "0.34.0"  # #11324: lora_adapter_metadata written and read
ALPHA_IS_R_SINCE = "0.40.0"  # #14409: no metadata → alpha = r per module (before: the first module's rank)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# CLIPTextModel's inner level (transformers < 5): canonical module names carry it (as kohya's lora_te_text_model_…)
TEXT_MODEL = "text_model."
TEXT_MODEL_CHILDREN = ("encoder.", "embeddings.", "final_layer_norm")

# (name, lora_A suffix, lora_B suffix) of each spelling a loader reads; the first is the one written
SPELLINGS = (
    ("peft", ".lora_A.weight", ".lora_B.weight"),
    ("unet-attn", ".lora.down.weight", ".lora.up.weight"),
    ("text-encoder", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
# diffusers ≤ 0.20's attention-processor spelling ("diffusers_old"): <path>[.processor].to_q_lora.down.weight;
# the UNet loader renames it to <path>.to_q (to_out_lora → to_out.0), the text encoder's to q_proj … out_proj
OLD_PROCESSOR = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"), "to_v_lora": ("to_v", "v_proj"),
                 "to_out_lora": ("to_out.0", "out_proj")}
# DoRA's magnitude (PEFT's key). diffusers 0.42.1 on transformers 5 loads a text encoder's only when spelled with
# ".weight" (without it the loader reports the key UNEXPECTED and runs the encoder without DoRA: 0.73 off on the
# tiny SD1 golden); the UNet/transformer loader takes PEFT's spelling. Both are read; each component's is written.
MAGNITUDE = ".lora_magnitude_vector"
MAGNITUDE_SUFFIXES = (MAGNITUDE, MAGNITUDE + ".weight")
LYCORIS_DORA = ".dora_scale"  # LyCORIS' DoRA: every diffusers pipeline loader drops it with a warning
BIAS_SUFFIX = ".lora_B.bias"

# The LoraConfig fields written per component. diffusers writes the whole to_dict() of the installed PEFT, but
# loads it with LoraConfig(**metadata), a dataclass constructor: a field the loading PEFT lacks raises TypeError
# ("`LoraConfig` class could not be instantiated"). These fields exist since PEFT 0.8 (use_rslora) and carry every
# thing the forward pass depends on; the rest are at their defaults.
METADATA_FIELDS = ("alpha_pattern", "bias", "fan_in_fan_out", "init_lora_weights", "lora_alpha", "lora_dropout",
                   "peft_type", "r", "rank_pattern", "target_modules", "use_rslora")
# PEFT fields a diffusers metadata block may hold whose non-default value this codec cannot carry, and why
REFUSED_FIELDS = {
    "lora_bias": "a LoRA bias on lora_B is not carried by this codec yet",
    "layers_to_transform": "layers_to_transform limits the targets by layer index",
    "target_parameters": "LoRA on raw parameters stacks one factor per expert",
}

FEATURES = frozenset({"conv", "dora", "patterns", "rslora"})

_KEYS = KeyTemplates(a="{module}.lora_A.weight", b="{module}.lora_B.weight", magnitude="{module}" + MAGNITUDE)
_SCALING = {"linear": Scaling.ALPHA_OVER_R, "conv": Scaling.ALPHA_OVER_R}

_COMMON = dict(family=FAMILY, library="diffusers", keys=_KEYS, scaling=_SCALING, config_file="",
               weights_read=(WEIGHTS, WEIGHTS_BIN), weights_write=WEIGHTS, pattern_matching="regex", features=FEATURES)

DIFFUSERS = Convention(
    name="diffusers", aliases=("diffusers-0.40",), versions=">=0.40",
    summary="diffusers ≥ 0.40: pytorch_lora_weights.safetensors, <component>.<module>.lora_A/B, alphas and "
            "patterns in the lora_adapter_metadata header; without it alpha = r per module",
    scaling_notes="alpha/r per module from lora_adapter_metadata (rank/alpha patterns, use_rslora: alpha/√r); "
                  "no metadata: scale 1",
    **_COMMON)
DIFFUSERS_0_34 = Convention(
    name="diffusers-0.34", versions=">=0.34,<0.40",
    summary="diffusers 0.34–0.39: metadata as ≥ 0.40; without it lora_alpha = the first module's rank",
    scaling_notes="alpha/r per module from lora_adapter_metadata; no metadata: r_first / r",
    **_COMMON)
DIFFUSERS_0_33 = Convention(
    name="diffusers-0.33", versions="<0.34",
    summary="diffusers < 0.34: no lora_adapter_metadata (ignored if present): lora_alpha = the first module's rank",
    scaling_notes="r_first / r (alpha is not stored)",
    **_COMMON)

CONVENTIONS = (DIFFUSERS, DIFFUSERS_0_34, DIFFUSERS_0_33)
