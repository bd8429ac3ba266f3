"""kohya-ss/sd-scripts (``networks/lora.py``, ``networks/lora_flux.py``): the LoRA files A1111, Forge and ComfyUI
load. DATA only: the convention, key templates, metadata keys, the name maps and grammars, LyCORIS refusals.

Read from sd-scripts at commit 48d368fa (2026-02-16); facts in shared/reference/ecosystem.md §1, §2, §15.

- One ``.safetensors`` file, no config. Per module ``<name>.lora_down.weight`` (A, (r, in) or (r, in, kh, kw)),
  ``<name>.lora_up.weight`` (B, (out, r) or (out, r, 1, 1)) and ``<name>.alpha`` (0-d). ``<name>`` is a prefix
  (``lora_unet``, ``lora_te``, ``lora_te1`` …) and the module path joined by ``_`` (every ``.`` replaced).
- Scale = alpha / r with r = ``lora_down.shape[0]``; a missing alpha, or alpha 0, means alpha = r: scale 1
  (``LoRAModule.__init__``: "if alpha == 0 or None, alpha is rank"; ``create_network_from_weights``: "support old
  LoRA without alpha").
- ``save_weights`` casts every tensor, ``.alpha`` included, to the save dtype, and writes ``sshs_model_hash`` /
  ``sshs_legacy_hash`` (``library/train_util.precalculate_safetensors_hashes``: sha256 of the tensor bytes of
  ``safetensors.torch.save(tensors, ss_* metadata)``, and sha256 of its bytes [0x100000, 0x110000), 8 hex digits).

The ``_`` → ``.`` inverse is resolved by GRAMMARS: per component, a regular expression over the dotted module
path (only ``(?:…)`` groups). The reader compiles it with each literal ``\\.`` turned into a captured ``_``, so a
match says exactly which underscores were dots; a name no grammar matches is refused, never guessed.
"""

from __future__ import annotations

from .base import Convention, KeyTemplates, Scaling

FAMILY = "kohya"  # the codec that reads and writes this convention
KEYS = KeyTemplates(a="{module}.lora_down.weight", b="{module}.lora_up.weight")
ALPHA_KEY = "{module}.alpha"
SUFFIXES = {"a": ".lora_down.weight", "b": ".lora_up.weight", "alpha": ".alpha"}

CONVENTIONS = (
    Convention(
        name="kohya",
        family=FAMILY,
        library="sd-scripts",
        # sd-scripts has no releases; the format has not changed since per-module .alpha arrived (Jan 2023): older
        # files without .alpha read as alpha = r, which is what sd-scripts itself does with them
        versions=">=0",
        aliases=("sd-scripts", "a1111", "comfyui-lora"),
        summary="kohya-ss/sd-scripts LoRA (A1111/Forge/ComfyUI): one .safetensors, lora_down/lora_up/.alpha per "
                "module, names <prefix>_<module path with . → _>",
        keys=KEYS,
        scaling={"linear": Scaling.ALPHA_OVER_R, "conv": Scaling.ALPHA_OVER_R},
        scaling_notes="alpha/r per module from its 0-d .alpha tensor; no .alpha (or 0) = scale 1 "
                      "(sd-scripts networks/lora.py LoRAModule, 48d368fa)",
        config_file="",
        weights_read=("*.safetensors",),
        weights_write="<OUT>.safetensors",
        version_to_write="48d368fa",
    ),
)

# ------------------------------------------------------------------------------------------------ model families
# Per model type: the kohya prefix of each component, how U-Net names are written, widths that tell the family
# apart (real models; tiny test models may match none), and the metadata sd-scripts writes for it.
FAMILIES: dict[str, dict] = {
    "sd1": {"denoiser": "unet", "unet_names": "diffusers", "te": {"lora_te": "text_encoder"},
            "te_width": {"text_encoder": 768}, "context_dim": 768, "base_model_version": "sd_v1",
            "network_module": "networks.lora", "v2": False, "up_blocks_with_attentions": (1, 2, 3)},
    "sd2": {"denoiser": "unet", "unet_names": "diffusers", "te": {"lora_te": "text_encoder"},
            "te_width": {"text_encoder": 1024}, "context_dim": 1024, "base_model_version": "sd_v2",
            "network_module": "networks.lora", "v2": True, "up_blocks_with_attentions": (1, 2, 3)},
    "sdxl": {"denoiser": "unet", "unet_names": "sai", "te": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
             "te_width": {"text_encoder": 768, "text_encoder_2": 1280}, "context_dim": 2048,
             "base_model_version": "sdxl_base_v1-0", "network_module": "networks.lora", "v2": False,
             "up_blocks_with_attentions": (0, 1)},
    "flux": {"denoiser": "transformer", "unet_names": "bfl",
             "te": {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
             "te_width": {"text_encoder": 768, "text_encoder_2": 4096}, "base_model_version": "flux1",
             "network_module": "networks.lora_flux", "v2": False},
}
UNET_PREFIX = "lora_unet"
# SAI (sgm) U-Net numbering: each down block has LAYERS_PER_BLOCK layers plus one downsampler slot, each up block
# LAYERS_PER_BLOCK + 1 layers (SD1, SD2 and SDXL all have 2); input_blocks.0 is conv_in.
LAYERS_PER_BLOCK = 2

# ------------------------------------------------------------------------------------------------ grammars
_CLIP = r"(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
_T5 = (r"encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.(?:q|k|v|o)|"
       r"DenseReluDense\.(?:wi_0|wi_1|wi|wo))")
_ATTN = (r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|"
         r"ff\.net\.(?:0\.proj|2)))")
_RES_DIFFUSERS = r"(?:conv1|conv2|conv_shortcut|time_emb_proj)"
_RES_SAI = r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
GRAMMARS: dict[str, str] = {
    "clip": _CLIP,
    "t5": _T5,
    "unet_diffusers": (rf"(?:(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(?:attentions\.\d+\.{_ATTN}|"
                       rf"resnets\.\d+\.{_RES_DIFFUSERS}|(?:downsamplers|upsamplers)\.0\.conv)|conv_in|conv_out|"
                       r"time_embedding\.linear_[12]|add_embedding\.linear_[12])"),
    "unet_sai": (rf"(?:input_blocks\.\d+\.(?:0\.(?:{_RES_SAI}|op)|1\.{_ATTN})|input_blocks\.0\.0|"
                 rf"middle_block\.(?:[02]\.{_RES_SAI}|1\.{_ATTN})|"
                 rf"output_blocks\.\d+\.(?:0\.{_RES_SAI}|1\.{_ATTN}|[12]\.conv)|out\.2|time_embed\.[02]|"
                 r"label_emb\.0\.[02])"),
    "flux_bfl": (r"(?:double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02]|mod\.lin)|"
                 r"single_blocks\.\d+\.(?:linear1|linear2|modulation\.lin)|img_in|txt_in|"
                 r"(?:time_in|vector_in|guidance_in)\.(?:in_layer|out_layer)|final_layer\.(?:linear|adaLN_modulation\.1))"),
}
# the grammar each component's kohya names are read with, by what the U-Net names look like
TE_GRAMMAR = {"text_encoder": "clip", "text_encoder_2": "clip"}
FLUX_TE_GRAMMAR = {"text_encoder": "clip", "text_encoder_2": "t5"}

# ------------------------------------------------------------------------------------------------ SAI ↔ diffusers
# U-Net names, structural (sd-scripts library/sdxl_model_util.make_unet_conversion_map and model_util's SD1 map;
# diffusers _maybe_map_sgm_blocks_to_diffusers): with L = LAYERS_PER_BLOCK,
#   down_blocks.i.{resnets|attentions}.j  ↔ input_blocks.{(L+1)i + j + 1}.{0|1}
#   down_blocks.i.downsamplers.0.conv     ↔ input_blocks.{(L+1)(i+1)}.0.op
#   up_blocks.i.{resnets|attentions}.j    ↔ output_blocks.{(L+1)i + j}.{0|1}
#   up_blocks.i.upsamplers.0.conv         ↔ output_blocks.{(L+1)i + L}.{2 if block i has attentions else 1}.conv
#   mid_block.resnets.j / attentions.0    ↔ middle_block.{2j} / middle_block.1
# resnet internals, and the U-Net's own top-level layers:
SAI_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
              "skip_connection": "conv_shortcut"}
SAI_TOP = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1",
           "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
           "label_emb.0.2": "add_embedding.linear_2"}

# ------------------------------------------------------------------------------------------------ Flux BFL ↔ diffusers
# (BFL module path, diffusers module paths under ``transformer.``, how the fused rows split). Splits: "equal" =
# n equal row blocks; "qkv_mlp" = hidden, hidden, hidden, rest with hidden = the layer's in-features (never a fixed
# size); "swap" = one module whose B rows are (shift, scale) in BFL's LastLayer and (scale, shift) in diffusers'
# AdaLayerNormContinuous (a row permutation: exact). {i} is the block index.
FLUX_MAP: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v"), "equal"),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj"), "equal"),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), None),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), None),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), None),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), None),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), None),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), None),
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), None),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), None),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v",
                                   "single_transformer_blocks.{i}.proj_mlp"), "qkv_mlp"),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), None),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), None),
    ("img_in", ("x_embedder",), None),
    ("txt_in", ("context_embedder",), None),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), None),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), None),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), None),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), None),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), None),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), None),
    ("final_layer.linear", ("proj_out",), None),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)
# Flux's MLP width when a fused linear1 is written from parts that lack proj_mlp (FluxSingleTransformerBlock's
# mlp_ratio; diffusers does not put it in the config)
FLUX_MLP_RATIO = 4.0

# Flux layers diffusers' kohya loader (_convert_kohya_flux_lora_to_diffusers, 0.42.1) converts to keys without the
# ``transformer.`` prefix and then skips with nothing logged (measured: off by 0.14; ecosystem.md §15)
DIFFUSERS_SKIPS_FLUX = ("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
# SD1/SDXL U-Net attention projections whose per-module alpha diffusers' kohya loader (0.42.1) loses when it differs
# from the file's most common U-Net alpha: _get_alpha_name keeps the "processor.to_q_lora.down.weight" form in the
# alpha_pattern keys, which match no PEFT module (measured on the golden conversions: off by 0.077 and 1.74, while
# sd-scripts' own loader reads the same files exactly)
DIFFUSERS_ALPHA_LOST = (".to_q", ".to_k", ".to_v", ".to_out.0")
# what sd-scripts' own Flux network never builds (create_network_from_weights: blocks and in_dims layers only):
# read from a kohya file (ComfyUI applies them), refused when writing one unless --drop names them
SDSCRIPTS_SKIPS_FLUX = ("final_layer.",)

# ------------------------------------------------------------------------------------------------ metadata
# what train_network.py writes that this convention can derive from the canonical form (the rest — datasets,
# learning rates, seeds — is training history: carried from a kohya source, never made up)
METADATA_DERIVED = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                    "ss_base_model_version", "ss_v2")
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
# lora-migrate's own header key (loaders ignore it): {kohya module: [rank of each part]} for a fused module written
# block-diagonally, so that reading it back gives each part its own block (when the up is zero outside them)
FUSED_RANKS_KEY = "lora_migrate_fused_ranks"
LEGACY_HASH_WINDOW = (0x100000, 0x10000)  # addnet_hash_legacy: sha256 of 64 KiB at 1 MiB, first 8 hex digits

# ------------------------------------------------------------------------------------------------ LyCORIS
# (key suffix after the module name, feature, why it is refused); LyCORIS writes these in the kohya key space
# (ss_network_module "lycoris.kohya"). None of them is an A/B pair: converting needs an SVD, never done here.
LYCORIS: tuple[tuple[str, str, str], ...] = (
    (".hada_w1_a", "LoHa", "ΔW = (w1a@w1b)⊙(w2a@w2b)·α/r is a Hadamard product of two LoRA pairs, not one B@A"),
    (".hada_w1_b", "LoHa", "ΔW = (w1a@w1b)⊙(w2a@w2b)·α/r is a Hadamard product of two LoRA pairs, not one B@A"),
    (".lokr_w1", "LoKr", "ΔW = kron(w1, w2)·α/r is a Kronecker product, not one B@A"),
    (".lokr_w1_a", "LoKr", "ΔW = kron(w1, w2)·α/r is a Kronecker product, not one B@A"),
    (".lokr_w2", "LoKr", "ΔW = kron(w1, w2)·α/r is a Kronecker product, not one B@A"),
    (".lokr_w2_a", "LoKr", "ΔW = kron(w1, w2)·α/r is a Kronecker product, not one B@A"),
    (".dora_scale", "LyCORIS DoRA", "dora_scale renormalises W+ΔW by a per-column magnitude whose axis changed "
                                    "over LyCORIS versions; it needs the base weight"),
    (".a1.weight", "GLoRA", "GLoRA's a1/a2/b1/b2 update depends on the base weight"),
    (".b1.weight", "GLoRA", "GLoRA's a1/a2/b1/b2 update depends on the base weight"),
    (".on_input", "(IA)³", "(IA)³ multiplies activations; it is no low-rank ΔW"),
    (".oft_blocks", "OFT", "OFT rotates W; its alpha is a constraint, not a scale"),
    (".oft_diag", "OFT", "OFT rotates W; its alpha is a constraint, not a scale"),
    (".lora_mid.weight", "LoCon Tucker", "a Tucker core between lora_down and lora_up is a three-factor product"),
    (".diff", "full weight diff", "a full ΔW, not a low-rank pair"),
    (".diff_b", "bias diff", "a full bias delta, not a low-rank pair"),
    (".w_norm", "norm diff", "a norm-layer delta, not a low-rank pair"),
    (".b_norm", "norm diff", "a norm-layer delta, not a low-rank pair"),
)
