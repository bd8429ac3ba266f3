"""The PEFT family: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``), by version era.

Source: ../shared/reference/peft.md (huggingface/peft at tags v0.1.0 … v0.20.0), checked against peft 0.21.2 as
installed from PyPI. What changes between eras, and so makes a convention of its own:

- how ``rank_pattern`` / ``alpha_pattern`` keys match module names (§1.3): one combined list (≤ 0.13, #873), two
  separate suffix lookups (0.14, #2195), regexes anchored at a dot boundary (≥ 0.15, #2419);
- which config fields exist (§4.4) and whether unknown ones raise ``TypeError`` (0.6–0.13) or are dropped with a
  warning (≥ 0.14, #2038); ``peft_version`` is written from 0.18 (#2782);
- ``merge_and_unload`` added ``lora_B.bias`` unscaled in 0.14.0–0.15.2 (#2486, fixed by #2489 in 0.16.0; §2);
- embedding LoRA on a scaled embedding (a base layer with an ``embed_scale``: Gemma3's
  ``Gemma3TextScaledWordEmbedding``, BART's with ``scale_embedding``) is multiplied by that factor from 0.18.0
  (#2825, issue #2809; DoRA's with it, #2839), not before (``lora_embedding_scaled``; table ``SCALED_EMBEDDINGS``).

The forward pass is the same in every era: y = W x + b + s·(B A x + l), s = alpha/r, or alpha/√r with
``use_rslora`` (from 0.8, #1244), per module with alpha and r from the patterns. Embedding LoRA stores bare
``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r); DoRA a bare ``lora_magnitude_vector`` (§3.1).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .base import Convention, KeyTemplates, Scaling, Serving

# Keys never carry the adapter name (removed on save, §4.1); the prefix is always written by PeftModel.
PEFT_KEYS = KeyTemplates(
    a="base_model.model.{module}.lora_A.weight",
    b="base_model.model.{module}.lora_B.weight",
    bias="base_model.model.{module}.lora_B.bias",
    emb_a="base_model.model.{module}.lora_embedding_A",
    emb_b="base_model.model.{module}.lora_embedding_B",
    magnitude="base_model.model.{module}.lora_magnitude_vector",
)
FAMILY = "peft"  # the codec that reads and writes these conventions
PEFT_PREFIX = "base_model.model."

# LoraConfig fields and the first release that has them (peft.md §4.4). A config written by PEFT holds every
# field of its release (``to_dict`` of the dataclass), which dates it.
FIELDS_SINCE: dict[str, str] = {
    "peft_type": "0.1", "task_type": "0.1", "base_model_name_or_path": "0.1", "inference_mode": "0.1",
    "r": "0.1", "lora_alpha": "0.1", "lora_dropout": "0.1", "target_modules": "0.1", "fan_in_fan_out": "0.1",
    "bias": "0.1", "modules_to_save": "0.1",
    "init_lora_weights": "0.3",
    "auto_mapping": "0.4", "revision": "0.4", "layers_to_transform": "0.4", "layers_pattern": "0.4",
    "rank_pattern": "0.6", "alpha_pattern": "0.6",
    "loftq_config": "0.7", "megatron_config": "0.7", "megatron_core": "0.7",
    "use_rslora": "0.8",
    "use_dora": "0.9",
    "layer_replication": "0.10",
    "exclude_modules": "0.14", "lora_bias": "0.14", "eva_config": "0.14",
    "trainable_token_indices": "0.15", "corda_config": "0.15",
    "use_qalora": "0.16", "qalora_group_size": "0.16",
    "target_parameters": "0.17",
    "peft_version": "0.18", "alora_invocation_tokens": "0.18", "arrow_config": "0.18", "ensure_weight_tying": "0.18",
    "lora_ga_config": "0.19", "use_bdlora": "0.19",
    "velora_config": "0.20", "monteclora_config": "0.20",
    "kasa_config": "0.21",
}
# Fields removed (v0.3.0) that an ancient config may still hold.
FIELDS_REMOVED = {"enable_lora": "0.3", "merge_weights": "0.3"}

# LoRA (and DoRA) on torch conv layers, by the first PEFT release whose LoRA wraps each (peft.md §1.5, §3.1):
# nn.Conv2d from the start (its DoRA from 0.10, #1516), nn.Conv3d from 0.14 (#2082, DoRA with it), nn.Conv1d from
# 0.15 (#2333; its DoRA from 0.16, #2531). Keyed by lora_A's spatial dimensions (ndim − 2). An older PEFT raises on
# the target module instead of loading the adapter.
CONV_SINCE: dict[int, tuple[str, str]] = {1: ("0.15", "0.16"), 2: ("0.6", "0.10"), 3: ("0.14", "0.14")}


def conv_requirements(spatial_dims, dora: bool, experts: bool = False) -> list[tuple[str, str]]:
    """(what, first PEFT release that has it) for an adapter's conv layers (``spatial_dims``: 1, 2, 3) and its
    LoRA on raw parameters (``experts``: target_parameters, 0.17 #2638)."""
    out = [("LoRA on raw parameters (target_parameters, MoE experts)", "0.17")] if experts else []
    for nd in sorted(set(spatial_dims)):
        lora, with_dora = CONV_SINCE[nd]
        out.append((f"LoRA on nn.Conv{nd}d", lora))
        if dora:
            out.append((f"DoRA on nn.Conv{nd}d", with_dora))
    return out


# Defaults (peft.md §4.4). A field at its default changes nothing, so it may be dropped for an older target.
DEFAULTS: dict[str, object] = {
    "task_type": None, "base_model_name_or_path": None, "inference_mode": True, "r": 8, "lora_alpha": 8,
    "lora_dropout": 0.0, "target_modules": None, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "init_lora_weights": True, "auto_mapping": None, "revision": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "loftq_config": {}, "megatron_config": None,
    "megatron_core": "megatron.core", "use_rslora": False, "use_dora": False, "layer_replication": None,
    "exclude_modules": None, "lora_bias": False, "eva_config": None, "trainable_token_indices": None,
    "corda_config": None, "use_qalora": False, "qalora_group_size": 16, "target_parameters": None,
    "alora_invocation_tokens": None, "arrow_config": None, "ensure_weight_tying": False, "lora_ga_config": None,
    "use_bdlora": None, "velora_config": None, "monteclora_config": None, "kasa_config": None,
}

# init_lora_weights values whose init rewrites the base weight (peft.md §5.1): such an adapter is relative to a
# residual base, and becomes plain LoRA only through the rank-2r re-expression (rules/shape.py pissa_to_lora).
# Matched as LoraLayer.update_layer matches them (peft 0.21.2 tuners/lora/layer.py): startswith("pissa"),
# startswith("corda"), lower() == "olora", == "loftq", == "lora_ga".
MUTATING_INITS = (r"pissa.*", r"corda.*", r"(?i:olora)", r"loftq", r"lora_ga")
# Of those, the inits whose initial adapter is a deterministic function of the original weight W alone, so that
# --base-model can rebuild it (peft.md §5.2): full-SVD PiSSA and OLoRA's QR. Value: the rule that rebuilds it.
# The others need the saved initial adapter, for the reason given.
REBUILDABLE_INITS = {r"pissa": "rebuild_pissa_init", r"(?i:olora)": "rebuild_olora_init"}
NOT_REBUILDABLE = {
    r"pissa_niter_\d+": "its SVD is the randomized torch.svd_lowrank",
    r"corda.*": "CorDA decomposes W with the covariance of calibration data",
    r"loftq": "LoftQ quantizes W with bitsandbytes",
    r"lora_ga": "LoRA-GA decomposes gradients of training data",
}


def mutating_init(init: object) -> bool:
    """Whether PEFT's init_lora_weights=``init`` rewrote the base weight when the adapter was created."""
    return isinstance(init, str) and any(re.fullmatch(p, init) for p in MUTATING_INITS)


def rebuild_rule(init: object) -> str | None:
    """The name of the rule that rebuilds this init's initial adapter from W, or None if it cannot be."""
    if not isinstance(init, str):
        return None
    return next((r for p, r in REBUILDABLE_INITS.items() if re.fullmatch(p, init)), None)


def not_rebuildable_reason(init: str) -> str:
    """Why the initial adapter of a mutating ``init`` cannot be computed from W alone."""
    return next((w for p, w in NOT_REBUILDABLE.items() if re.fullmatch(p, init)), "it is not a function of W alone")


def saved_by_modules_to_save(path: str, names) -> bool:
    """Whether the tensor of module ``path`` (``model.layers.0.input_layernorm``, or a submodule of a saved module:
    ``classifier.dense``) belongs to a module that a ``modules_to_save`` entry wraps. Every era matches the same
    way, a plain string suffix with no dot boundary, so "norm" also takes ``input_layernorm``: ``_set_trainable``
    (utils/other.py) tests ``key.endswith(target_key)`` over ``model.named_modules()`` in 0.6–0.14, and over
    ``named_modules(remove_duplicate=False)`` from 0.15 (tied modules counted under each name) through 0.21.2."""
    parts = path.split(".")
    return any(".".join(parts[:i]).endswith(n) for i in range(1, len(parts) + 1) for n in names)


class EmbedScale(BaseModel):
    """An embedding module whose forward multiplies its output by ``embed_scale = √dim`` (transformers 4.57.6
    ``*ScaledWordEmbedding``). ``dim``: the config field (with its default) giving dim, or None for the
    embedding's own width (lora_embedding_B's rows); ``flag``: the bool config field that turns it on (with its
    class default, as config.json leaves defaults out), or None when always on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str  # regex searched in the module path
    dim: str | None = None
    dim_default: int | None = None
    flag: str | None = None
    flag_default: bool = False


_TOKENS = r"(^|\.)(embed_tokens|shared)$"
_SCALE_EMBEDDING = {t: (EmbedScale(module=_TOKENS, flag="scale_embedding", flag_default=d),)
                    for t, d in (("bart", False), ("mbart", False), ("blenderbot", False), ("trocr", False),
                                 ("plbart", True), ("m2m_100", True), ("nllb-moe", True), ("bigbird_pegasus", True),
                                 ("pegasus_x", True), ("xglm", True), ("biogpt", True), ("seamless_m4t", True),
                                 ("seamless_m4t_v2", True))}
# model_type → its scaled embedding modules. A model type not listed has none: its embeddings are nn.Embedding,
# and Gemma / Gemma2 multiply the hidden states by √d after the embedding module (so every era scales the LoRA
# output alike).
SCALED_EMBEDDINGS: dict[str, tuple[EmbedScale, ...]] = {
    "gemma3_text": (EmbedScale(module=r"(^|\.)embed_tokens$"),),
    "gemma3": (EmbedScale(module=r"(^|\.)embed_tokens$"),),
    "gemma3n_text": (EmbedScale(module=r"(^|\.)embed_tokens_per_layer$", dim="hidden_size_per_layer_input",
                                dim_default=256), EmbedScale(module=r"(^|\.)embed_tokens$")),
    **_SCALE_EMBEDDING,
}


def embed_scale(model_config: dict | None, module: str, width: int, type_only: bool = False) -> float | None:
    """The factor the base layer at ``module`` multiplies its output by (1.0 for a plain embedding), from the base
    model's config.json; None when there is no config to tell. ``width``: the embedding's output size.
    ``type_only``: ``model_config`` holds only the model type (--model-type), so a factor that depends on a config
    flag is unknown."""
    if not model_config:  # no model type: only a path that some scaled embedding has leaves it open
        scaled_path = any(re.search(x.module, module) for rules in SCALED_EMBEDDINGS.values() for x in rules)
        return None if scaled_path else 1.0
    mt = model_config.get("model_type")
    rules = SCALED_EMBEDDINGS.get(mt, ()) if mt != "gemma3n" else SCALED_EMBEDDINGS["gemma3n_text"]
    cfg = model_config.get("text_config") or model_config if mt in ("gemma3", "gemma3n") else model_config
    rule = next((x for x in rules if re.search(x.module, module)), None)
    if rule is not None and type_only and (rule.flag or rule.dim):
        return None
    if rule is None or not (rule.flag is None or cfg.get(rule.flag, rule.flag_default)):
        return 1.0
    return math.sqrt(cfg.get(rule.dim, rule.dim_default) if rule.dim else width)


def fields_of(version: str) -> tuple[str, ...]:
    """The LoraConfig fields a PEFT release knows."""
    from packaging.version import Version

    v = Version(version)
    return tuple(f for f, since in FIELDS_SINCE.items() if Version(since) <= v)


class PeftLoraConfig(BaseModel):
    """``adapter_config.json`` of a PEFT LoRA adapter. Types are checked; fields of releases we do not know are
    kept (PEFT ≥ 0.14 itself ignores them with a warning) and reported."""

    model_config = ConfigDict(extra="allow")

    peft_type: str
    r: int = Field(8, gt=0)
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    peft_version: str | None = None
    trainable_token_indices: list[int] | dict | None = None
    target_parameters: list[str] | None = None

    @field_validator("lora_alpha")
    @classmethod
    def _alpha_finite_positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {v}")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r <= 0}
        if bad:
            raise ValueError(f"ranks must be positive: {bad}")
        return v

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: a for k, a in v.items() if not (math.isfinite(a) and a > 0)}
        if bad:
            raise ValueError(f"alphas must be positive numbers: {bad}")
        return v


# experts: LoRA on raw (E, …) parameters (target_parameters, ParamWrapper), from 0.17 (#2638): conv_requirements
_LORA = {"linear": Scaling.ALPHA_OVER_R, "embedding": Scaling.ALPHA_OVER_R, "conv": Scaling.ALPHA_OVER_R,
         "experts": Scaling.ALPHA_OVER_R}
_COMMON = dict(
    family=FAMILY, library="peft", keys=PEFT_KEYS, scaling=_LORA, config_model=PeftLoraConfig,
    config_defaults=DEFAULTS, weights_read=("adapter_model.safetensors", "adapter_model.bin"),
    weights_write="adapter_model.safetensors", version_patterns=(),
)
_FEATURES = {"lora", "embedding", "conv", "rslora", "dora", "patterns", "modules_to_save"}


def _peft(name: str, versions: str, first: str, matching: str, **kw) -> Convention:
    feats = set(_FEATURES) | set(kw.pop("extra_features", ()))
    return Convention(name=name, versions=versions, pattern_matching=matching, fields_checked_on_write=True,
                      config_write_fields=fields_of(first), features=frozenset(feats), **_COMMON, **kw)


PEFT_0_13 = _peft(
    "peft-0.13", ">=0.6,<0.14", "0.6", "combined",
    aliases=tuple(f"peft-0.{m}" for m in range(6, 13)),
    summary="PEFT 0.6–0.13: unknown adapter_config.json fields raise TypeError; rank/alpha patterns in one list",
    scaling_notes="alpha/r, alpha/√r with use_rslora (≥0.8, #1244); rank_pattern and alpha_pattern keys are "
                  "chained into one list, first suffix match wins for both (#873, bug fixed in 0.14 #2195)",
    version_to_write="0.13.2", strict_config_fields=True, lora_embedding_scaled=False,
)
PEFT_0_14 = _peft(
    "peft-0.14", ">=0.14,<0.15", "0.14", "split",
    summary="PEFT 0.14: lora_bias (#2237); separate rank/alpha suffix lookups; merges lora_B.bias unscaled",
    scaling_notes="alpha/r or alpha/√r; lora_B.bias scaled in the forward pass but merged unscaled (#2486)",
    version_to_write="0.14.0", extra_features={"lora_bias"}, lora_embedding_scaled=False, merges_bias_unscaled=True,
)
PEFT_0_15 = _peft(
    "peft-0.15", ">=0.15,<0.16", "0.15", "regex",
    summary="PEFT 0.15.x: regex rank/alpha patterns (#2419); still merges lora_B.bias unscaled",
    scaling_notes="alpha/r or alpha/√r; lora_B.bias merged as b+l instead of b+s·l up to 0.15.2 (#2486, #2489)",
    version_to_write="0.15.2", extra_features={"lora_bias"}, lora_embedding_scaled=False, merges_bias_unscaled=True,
)
PEFT_0_16 = _peft(
    "peft-0.16", ">=0.16,<0.18", "0.16", "regex", aliases=("peft-0.17",),
    summary="PEFT 0.16–0.17: lora_B.bias merge fixed (#2489)",
    scaling_notes="alpha/r or alpha/√r, per module from the regex patterns",
    version_to_write="0.17.1", extra_features={"lora_bias"}, lora_embedding_scaled=False,
)
PEFT_LATEST = _peft(
    "peft", ">=0.18", "0.18", "regex",
    aliases=("peft-0.18", "peft-0.19", "peft-0.20", "peft-0.21"),
    summary="PEFT ≥ 0.18 (checked with 0.21.2): writes peft_version",
    scaling_notes="alpha/r or alpha/√r, per module from the regex patterns",
    version_to_write="0.21.2", extra_features={"lora_bias"}, lora_embedding_scaled=True,
)
# peft ≥ 0.19 (utils/transformers_weight_conversion.py ``_convert_peft_config_moe``; 0.18.1 has no such module), on
# the model types transformers 5 converts like qwen2_moe (qwen2_moe itself is no key there; list read from peft
# 0.21.2 ``_MODEL_TO_CONVERSION_PATTERN``), rewrites every target_modules entry equal to or ending in
# ``.gate_proj``/``.up_proj``/``.down_proj`` into target_parameters ``gate_up_proj``/``down_proj`` (its v4 → v5 expert
# renaming), at get_peft_model and at from_pretrained. A dense block's or a shared expert's Linear so named then gets
# the routed experts wrapped instead (measured with peft 0.21.2 on glm4_moe: golden mlx glm4moe_switch,
# "peft_target_probe"; gate_proj without up_proj: a ValueError).
V4_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")
V4_EXPERT_RENAMED_TYPES = (
    "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe",
    "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text",
    "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open")

# Serving targets: PEFT files, read by servers with one global scale (peft.md §7, §8).
# Messages the serving targets give for what they cannot hold (peft.md §8.1, §7.4).
VLLM_REFUSALS = {
    "dora": "vLLM does not yet support DoRA.",
    "modules_to_save": "vLLM only supports modules_to_save being None.",
    "bias": "Adapter bias is not supported.",
    "lora_bias": "lora_B.bias is unsupported LoRA weight",
    "conv": "conv LoRA is unsupported LoRA weight",
}
LORAX_DROPS = {
    "dora": "LoRAX applies the plain LoRA delta and ignores lora_magnitude_vector (DoRA), which is wrong",
    "lora_bias": "LoRAX only reads lora_A/lora_B weights and drops lora_B.bias",
    "embedding": "LoRAX drops lora_embedding_A/B",
    "modules_to_save": "LoRAX drops modules_to_save tensors",
    "bias": "LoRAX drops trained base biases (bias != \"none\")",
    "conv": "LoRAX has no conv LoRA",
}

LORAX = Convention(
    name="lorax", versions=">=0.9", pattern_matching="regex", config_write_fields=fields_of("0.6"),
    summary="LoRAX (predibase): PEFT files; applies alpha/r whatever use_rslora says, one r and alpha per "
            "adapter, silently drops DoRA, lora_B.bias, embeddings and modules_to_save",
    scaling_notes="alpha/r from the global r and lora_alpha (its peft 0.4.0 config parser has no use_rslora; "
                  "§7.2); ranks padded per layer type; config.r mutated to the padded rank (§7.3)",
    version_to_write="0.6.0", features=frozenset({"lora"}),
    serving=Serving(server="LoRAX", honours_rslora=False, pads_rank=True, drops_partial_layer_types=True,
                    drops=LORAX_DROPS),
    **{**_COMMON, "library": "lorax", "scaling": {"linear": Scaling.ALPHA_OVER_R}},
)
VLLM = Convention(
    name="vllm", versions=">=0.6", pattern_matching="regex", config_write_fields=fields_of("0.6"),
    summary="vLLM: PEFT files; one scale per adapter from the global r and lora_alpha; rejects DoRA, "
            "modules_to_save and LoRA bias",
    scaling_notes="alpha/r (alpha/√r with use_rslora only after PR #6909); rank_pattern/alpha_pattern ignored "
                  "(§8.1)",
    version_to_write="0.6.0", features=frozenset({"lora", "embedding"}),
    serving=Serving(server="vLLM", honours_rslora=False, rslora_note="vLLM before PR #6909 ",
                    skips_frozen_base_copies=True, refuses=VLLM_REFUSALS),
    **{**_COMMON, "library": "vllm",
       "scaling": {"linear": Scaling.ALPHA_OVER_R, "embedding": Scaling.ALPHA_OVER_R}},
)

PEFT_ERAS = (PEFT_0_13, PEFT_0_14, PEFT_0_15, PEFT_0_16, PEFT_LATEST)

CONVENTIONS = (*PEFT_ERAS, LORAX, VLLM)
