"""kohya names ↔ canonical module paths: the ``_`` → ``.`` grammars, SAI ↔ diffusers U-Net rules, Flux BFL ↔
diffusers, both ways, checked against sd-scripts' own map (pairs quoted from library/sdxl_model_util.py
make_unet_conversion_map at 48d368fa) and against the files sd-scripts wrote for the goldens."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_migrate.codecs.kohya import CODEC
from lora_migrate.codecs.kohya.names import (diffusers_to_flux, diffusers_to_sai, dotted, flux_to_diffusers,
                                             sai_to_diffusers)
from lora_migrate.codecs.kohya.read import canonical
from lora_migrate.codecs.kohya.write import locate

GOLDEN = Path(__file__).resolve().parents[3] / "golden/diffusers/sdscripts"
SDXL_ATTN = (0, 1)  # SDXL's up blocks with attentions (schemas.kohya FAMILIES)


@pytest.mark.parametrize("name, grammar, path", [
    ("down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0", "unet_diffusers",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("up_blocks_1_resnets_2_conv_shortcut", "unet_diffusers", "up_blocks.1.resnets.2.conv_shortcut"),
    ("mid_block_attentions_0_proj_in", "unet_diffusers", "mid_block.attentions.0.proj_in"),
    ("down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet_diffusers",
     "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("input_blocks_4_1_transformer_blocks_1_attn2_to_k", "unet_sai", "input_blocks.4.1.transformer_blocks.1.attn2.to_k"),
    ("output_blocks_2_2_conv", "unet_sai", "output_blocks.2.2.conv"),
    ("middle_block_2_emb_layers_1", "unet_sai", "middle_block.2.emb_layers.1"),
    ("text_model_encoder_layers_11_self_attn_out_proj", "clip", "text_model.encoder.layers.11.self_attn.out_proj"),
    ("encoder_layers_0_mlp_fc2", "clip", "encoder.layers.0.mlp.fc2"),
    ("encoder_block_3_layer_1_DenseReluDense_wi_0", "t5", "encoder.block.3.layer.1.DenseReluDense.wi_0"),
    ("double_blocks_18_txt_attn_qkv", "flux_bfl", "double_blocks.18.txt_attn.qkv"),
    ("double_blocks_0_img_mod_lin", "flux_bfl", "double_blocks.0.img_mod.lin"),
    ("single_blocks_37_modulation_lin", "flux_bfl", "single_blocks.37.modulation.lin"),
    ("time_in_in_layer", "flux_bfl", "time_in.in_layer"),
    ("final_layer_adaLN_modulation_1", "flux_bfl", "final_layer.adaLN_modulation.1"),
])
def test_underscores_resolve_by_structure(name, grammar, path):
    assert dotted(name, grammar) == path
    assert path.replace(".", "_") == name


@pytest.mark.parametrize("name", ["down_blocks_0_attentions_0_to_q", "double_blocks_0_img_attn_qkvx",
                                  "text_model_encoder_layers_0_self_attn_q", "lora_magic"])
def test_names_no_grammar_reads_are_refused(name):
    assert all(dotted(name, g) is None for g in ("unet_diffusers", "unet_sai", "clip", "flux_bfl"))
    with pytest.raises(Exception, match="not a module path sd-scripts writes"):
        canonical("lora_unet_" + name)


# (SAI, diffusers) pairs of sd-scripts' make_unet_conversion_map (SDXL) and model_util's SD1 map
SD_SCRIPTS_PAIRS = [
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.2.1.proj_in", "down_blocks.0.attentions.1.proj_in"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.5.0.skip_connection", "down_blocks.1.resnets.1.conv_shortcut"),
    ("input_blocks.7.1.transformer_blocks.9.attn1.to_q", "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q"),
    ("middle_block.0.emb_layers.1", "mid_block.resnets.0.time_emb_proj"),
    ("middle_block.1.transformer_blocks.0.ff.net.2", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
    ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
    ("output_blocks.0.0.out_layers.3", "up_blocks.0.resnets.0.conv2"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),  # "change for sdxl": sub-block 2
    ("output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
]


@pytest.mark.parametrize("sai, hf", SD_SCRIPTS_PAIRS)
def test_sai_diffusers_both_ways(sai, hf):
    assert sai_to_diffusers(sai) == hf
    assert diffusers_to_sai(hf, SDXL_ATTN) == sai


def test_sd1_upsampler_without_attention_is_sub_block_1():
    # SD1's up_blocks.0 is an UpBlock2D (model_util: output_blocks.{3i+2}.{1 if i == 0 else 2})
    assert diffusers_to_sai("up_blocks.0.upsamplers.0.conv", (1, 2, 3)) == "output_blocks.2.1.conv"
    assert sai_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert diffusers_to_sai("up_blocks.1.upsamplers.0.conv", (1, 2, 3)) == "output_blocks.5.2.conv"


def test_flux_map_both_ways():
    parts, split = flux_to_diffusers("double_blocks.3.img_attn.qkv")
    assert parts == tuple(f"transformer_blocks.3.attn.to_{x}" for x in "qkv") and split == "equal"
    assert flux_to_diffusers("single_blocks.0.linear1")[1] == "qkv_mlp"
    assert flux_to_diffusers("final_layer.adaLN_modulation.1") == (("norm_out.linear",), "swap")
    fp = diffusers_to_flux("single_transformer_blocks.7.proj_mlp")
    assert (fp.bfl, fp.index, len(fp.parts)) == ("single_blocks.7.linear1", 3, 4)
    assert locate("transformer.transformer_blocks.1.attn.add_v_proj", "flux") == (
        "lora_unet_double_blocks_1_txt_attn_qkv", 2, 3, "equal")
    assert locate("transformer.time_text_embed.guidance_embedder.linear_2", None)[0] == \
        "lora_unet_guidance_in_out_layer"
    assert locate("transformer.pos_embed.proj", "flux") == "no Flux BFL module holds it"
    assert locate("model.layers.0.self_attn.q_proj", None).startswith("not an image-model layer")


def test_unet_names_follow_the_family():
    m = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    assert locate(m, "sdxl")[0] == "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert locate(m, "sd1")[0] == "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"
    # family unknown: diffusers names, which sd-scripts, diffusers and ComfyUI read for SD1 and SDXL alike
    assert locate(m, None)[0] == locate(m, "sd1")[0]
    assert "pass --model-type" in locate("text_encoder.text_model.encoder.layers.0.mlp.fc1", None)
    te = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"
    assert locate(te, "sdxl")[0] == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert "no component" in locate(te, "sd1")


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="golden files not present")
def test_sai_and_diffusers_named_sdxl_files_read_to_the_same_modules():
    """sd-scripts wrote sdxl_kohya with SAI names and sdxl_kohya_locon_dfnames with diffusers names over the same
    tiny U-Net: every module of the first is a module of the second."""
    sai = CODEC.open(GOLDEN / "sdxl_kohya" / "lora.safetensors").adapters[0]
    dfn = CODEC.open(GOLDEN / "sdxl_kohya_locon_dfnames" / "lora.safetensors").adapters[0]
    assert sai.naming["unet"] == "sai" and dfn.naming["unet"] == "diffusers"
    a, b = {e.module for e in sai.modules}, {e.module for e in dfn.modules}
    assert len(a) == 156 and a < b


def test_flux_t5_text_encoder_both_ways(tmp_path):
    """lora_te3_ (T5-XXL in sd-scripts' Flux network) ↔ text_encoder_2 with T5 module paths."""
    comp, paths, _, naming = canonical("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1")
    assert (comp, paths, naming) == ("text_encoder_2", ("text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_1",),
                                     "t5")
    assert locate(paths[0], "flux")[0] == "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1"
    assert locate("text_encoder.text_model.encoder.layers.3.self_attn.v_proj", "flux")[0] == \
        "lora_te1_text_model_encoder_layers_3_self_attn_v_proj"
