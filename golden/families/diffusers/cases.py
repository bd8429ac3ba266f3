"""Image-model LoRA goldens (issue 14): DATA ONLY, stdlib-only (see GOLDEN_SHAPE.md).

Two envs: ``diffusers`` (the loader and the diffusers-format writer) and ``sdscripts`` (kohya-ss/sd-scripts at a
pinned commit, with the package pins of its own requirements.txt where they matter: transformers 4.x keeps
``CLIPTextModel.text_model``, so sd-scripts writes ``lora_te_text_model_encoder_…`` as it does for its users; with
transformers 5 it would write ``lora_te_encoder_…``). Kohya cases are written and run through sd-scripts' own
network in ``sdscripts``, then loaded with ``pipe.load_lora_weights`` in ``diffusers``: each case lists its
``stages`` as (step, env) pairs, which golden/harness.py runs stage by stage (a trap after its ``source`` case, which
comes first in CASES).

Layout: a case id is <env of its first step>/<name>, its folder golden/diffusers/<case id>/; the bases are made
first (stage BASE), once per family, in golden/diffusers/_base/<family>/.
"""

BASE = ("base", "diffusers")
# one worker process per case for the sd-scripts steps: its networks keep state between cases in one process
# (sdxl_kohya got 175 modules instead of 156 when written after sd1_kohya_locon)
ISOLATE_TASKS = ["kohya_write", "kohya_trap"]
SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
SD_SCRIPTS_MIRROR = "/work/.mirror/kohya-ss+sd-scripts/repo"    # what the fetch tool brought (github:kohya-ss/sd-scripts)
SD_SCRIPTS = "sd-scripts-48d368fa"     # its networks/ and library/, unpacked in GOLDEN_WORK (outside the repo)

ENVS = {
    "diffusers": {
        "library": "diffusers", "library_version": "0.42.1",
        "deps": ["diffusers==0.42.1", "peft==0.21.2", "transformers==5.23.0", "huggingface-hub>=1.32,<3",
                 "safetensors>=0.8"],
    },
    "sdscripts": {
        "library": "sd-scripts", "library_version": SD_SCRIPTS_COMMIT,
        # sd-scripts' requirements.txt pins (torch stays 2.13.0); only what networks/lora.py, lora_flux.py and
        # library/train_util.py (save_weights' hashes) import. torchvision is NOT installable here: PyPI's
        # 0.28.0 (the one for torch 2.13.0) links libtorch_cuda, and there is no sdist; see worker._import_sd_scripts.
        "deps": ["transformers==4.54.1", "diffusers==0.32.1", "accelerate==1.6.0", "safetensors==0.4.5",
                 "huggingface-hub==0.34.3", "einops==0.7.0", "toml==0.10.2", "imagesize==1.4.1",
                 "opencv-python-headless", "pillow", "numpy"],
        # run after the deps ({work} = GOLDEN_WORK, {venv} = the env's venv folder); needs the fetch tool's mirror
        "setup": [
            f"test -f {{work}}/{SD_SCRIPTS}/COMMIT || (mkdir -p {{work}}/{SD_SCRIPTS} && "
            f"git --git-dir={SD_SCRIPTS_MIRROR} archive {SD_SCRIPTS_COMMIT} networks library | "
            f"tar x -C {{work}}/{SD_SCRIPTS} && "
            f"echo {SD_SCRIPTS_COMMIT} > {{work}}/{SD_SCRIPTS}/COMMIT)",
            # on the worker's sys.path through a .pth file in the venv
            f"for d in {{venv}}/lib/python3*/site-packages; do echo {{work}}/{SD_SCRIPTS} > \"$d/sd_scripts.pth\"; "
            "done",
        ],
        "check": ("import os, sys\nassert os.path.isfile(os.path.join(os.environ['GOLDEN_WORK'], "
                  f"'{SD_SCRIPTS}', 'COMMIT'))\nassert any(p.endswith('{SD_SCRIPTS}') for p in sys.path)"),
    },
}

MODEL_SEED = 0      # torch.manual_seed before building each base component
INPUT_SEED = 1      # latents, timestep, encoder states, token ids
LORA_SEED = 2       # LoRA weights (kohya and PEFT both start with B = 0: overwritten with N(0, 0.2²) noise)
LORA_STD = 0.2
TOKENS = 8          # token ids per prompt

CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 1000, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

FAMILIES = {
    "sd1": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [8, 16], "norm_num_groups": 4, "cross_attention_dim": 32,
                 "attention_head_dim": 4,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        "text_encoders": {"text_encoder": ["CLIPTextModel", CLIP]},
        "latent": [1, 4, 8, 8], "timestep": 500, "ctx": [1, TOKENS, 32],
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [8, 16], "norm_num_groups": 4, "cross_attention_dim": 64,
                 "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 2],
                 "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 32 + 6 * 4,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
        "text_encoders": {"text_encoder": ["CLIPTextModel", CLIP],
                          "text_encoder_2": ["CLIPTextModelWithProjection", {**CLIP, "projection_dim": 32}]},
        "latent": [1, 4, 8, 8], "timestep": 500, "ctx": [1, TOKENS, 64], "pooled": [1, 32], "time_ids": [1, 6],
    },
    "flux": {
        "pipeline": "FluxPipeline",
        # Flux-dev's structure at toy size: 2 double + 2 single blocks, 2 heads of 16, rope axes 4+6+6
        "transformer": {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24,
                        "pooled_projection_dim": 32, "guidance_embeds": False, "axes_dims_rope": [4, 6, 6]},
        "text_encoders": {"text_encoder": ["CLIPTextModel", CLIP]},
        "img_seq": 16, "timestep": 0.5, "ctx": [1, TOKENS, 24], "pooled": [1, 32],
    },
}

# kohya (sd-scripts) networks: create_network(multiplier=1, network_dim, network_alpha, vae=None, te, unet, **kwargs)
# diffusers: LoraConfig per component (PEFT), written by <Pipeline>.save_lora_weights with *_lora_adapter_metadata
_TE_T = ["q_proj", "k_proj", "v_proj", "out_proj"]
_UNET_T = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
_FLUX_T = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
           "norm1.linear", "norm1_context.linear", "norm.linear"]

_CASES = {
    # ---- diffusers format, written by diffusers' save_lora_weights (with lora_adapter_metadata) ----
    "sd1_diffusers": {"family": "sd1", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
                      "lora": {"unet": {"r": 4, "lora_alpha": 4, "target_modules": _UNET_T},
                               "text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": _TE_T}}},
    "sd1_diffusers_alpha": {"family": "sd1", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
                            "lora": {"unet": {"r": 4, "lora_alpha": 8, "target_modules": _UNET_T},
                                     "text_encoder": {"r": 2, "lora_alpha": 1, "target_modules": _TE_T}}},
    "sd1_diffusers_patterns": {
        "family": "sd1", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
        "lora": {"unet": {"r": 4, "lora_alpha": 8, "target_modules": _UNET_T + ["conv1", "conv2"],
                          "rank_pattern": {"attn2.to_k": 2, "conv1": 3}, "alpha_pattern": {"to_v": 1, "proj_in": 16}},
                 "text_encoder": {"r": 4, "lora_alpha": 2, "target_modules": _TE_T, "rank_pattern": {"q_proj": 2},
                                  "alpha_pattern": {"out_proj": 8, "v_proj": 6}}}},
    "sdxl_diffusers": {"family": "sdxl", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
                       "lora": {"unet": {"r": 4, "lora_alpha": 2, "target_modules": _UNET_T,
                                         "alpha_pattern": {"attn2.to_k": 8}},
                                "text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": _TE_T},
                                "text_encoder_2": {"r": 2, "lora_alpha": 3, "target_modules": _TE_T}}},
    "flux_diffusers": {"family": "flux", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
                       "lora": {"transformer": {"r": 4, "lora_alpha": 8, "target_modules": _FLUX_T,
                                                "rank_pattern": {"proj_mlp": 2}, "alpha_pattern": {"to_k": 1}},
                                "text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": _TE_T}}},
    # kohya's fuse from separate parts (the kohya helper's acceptance source): q/k/v with different alphas, add_q/k/v
    # with different ranks and alphas, proj_mlp at another rank; no top-level proj_out (sd-scripts has no place
    # for final_layer), the single blocks' proj_out (linear2) by full path
    "flux_diffusers_fuse": {
        "family": "flux", "kind": "diffusers", "stages": [BASE, ("diffusers_write", "diffusers")],
        "lora": {"transformer": {"r": 4, "lora_alpha": 8,
                                 "target_modules": [t for t in _FLUX_T if t != "proj_out"] + [
                                     "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"],
                                 "rank_pattern": {"proj_mlp": 2, "add_v_proj": 3},
                                 "alpha_pattern": {"to_k": 1, "add_q_proj": 6}},
                 "text_encoder": {"r": 4, "lora_alpha": 4, "target_modules": _TE_T}}},
    # ---- PEFT on ONE pipeline component (get_peft_model(unet, LoraConfig).save_pretrained): keys without the
    # component prefix (base_model.model.down_blocks…); adapter/ holds what PEFT wrote ----
    "sd1_peft_unet": {"family": "sd1", "kind": "peft_component", "component": "unet",
                      "stages": [BASE, ("peft_write", "diffusers")],
                      "lora": {"r": 4, "lora_alpha": 8, "target_modules": _UNET_T + ["conv1", "conv2"],
                               "rank_pattern": {"attn2.to_k": 2, "conv1": 2}}},
    "sd1_peft_text_encoder": {"family": "sd1", "kind": "peft_component", "component": "text_encoder",
                              "stages": [BASE, ("peft_write", "diffusers")],
                              "lora": {"r": 4, "lora_alpha": 2, "target_modules": _TE_T + ["fc1", "fc2"]}},
    # ---- diffusers traps ----
    "sd1_diffusers_nometa": {"family": "sd1", "kind": "diffusers_trap", "source": "sd1_diffusers_patterns",
                             "edit": "drop_metadata", "stages": [BASE, ("diffusers_trap", "diffusers")]},
    "flux_diffusers_nometa": {"family": "flux", "kind": "diffusers_trap", "source": "flux_diffusers",
                              "edit": "drop_metadata", "stages": [BASE, ("diffusers_trap", "diffusers")]},
    "sd1_diffusers_mixed": {"family": "sd1", "kind": "diffusers_trap", "source": "sd1_diffusers_patterns",
                            "edit": "convert_state_dict_to_diffusers",
                            "stages": [BASE, ("diffusers_trap", "diffusers")]},
    # ---- kohya format, written by sd-scripts' networks/lora.py / lora_flux.py ----
    "sd1_kohya": {"family": "sd1", "kind": "kohya", "module": "networks.lora", "dim": 4, "alpha": 2,
                  "kwargs": {}, "base_model_version": "sd_v1",
                  "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    "sd1_kohya_locon": {"family": "sd1", "kind": "kohya", "module": "networks.lora", "dim": 4, "alpha": 1,
                        "kwargs": {"conv_dim": "2", "conv_alpha": "3"}, "base_model_version": "sd_v1",
                        "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    "sdxl_kohya": {"family": "sdxl", "kind": "kohya", "module": "networks.lora", "dim": 4, "alpha": 1,
                   "kwargs": {}, "base_model_version": "sdxl_base_v1-0", "sai_names": True,
                   "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    "sdxl_kohya_locon_dfnames": {"family": "sdxl", "kind": "kohya", "module": "networks.lora", "dim": 2,
                                 "alpha": 4, "kwargs": {"conv_dim": "2", "conv_alpha": "1"},
                                 "base_model_version": "sdxl_base_v1-0", "sai_names": False,
                                 "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    # single_dim=0: no single_blocks_N_linear1/2 (diffusers splits linear1 at Flux-dev's sizes only: see below)
    "flux_kohya": {"family": "flux", "kind": "kohya", "module": "networks.lora_flux", "dim": 4, "alpha": 2,
                   "kwargs": {"single_dim": "0", "single_mod_dim": "4"}, "base_model_version": "flux1",
                   "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    # ---- kohya traps (edits of the files above, or sd-scripts options that diffusers cannot follow) ----
    "sd1_kohya_noalpha": {"family": "sd1", "kind": "kohya_trap", "source": "sd1_kohya", "edit": "drop_alpha",
                          "stages": [BASE, ("kohya_trap", "sdscripts"), ("kohya_load", "diffusers")]},
    "sdxl_kohya_noalpha": {"family": "sdxl", "kind": "kohya_trap", "source": "sdxl_kohya", "edit": "drop_alpha",
                           "stages": [BASE, ("kohya_trap", "sdscripts"), ("kohya_load", "diffusers")]},
    "flux_kohya_noalpha": {"family": "flux", "kind": "kohya_trap", "source": "flux_kohya", "edit": "drop_alpha",
                           "stages": [BASE, ("kohya_trap", "sdscripts"), ("kohya_load", "diffusers")]},
    "sd1_kohya_sai": {"family": "sd1", "kind": "kohya_trap", "source": "sd1_kohya", "edit": "sd1_sai_names",
                      "stages": [BASE, ("kohya_trap", "sdscripts"), ("kohya_load", "diffusers")]},
    "sdxl_kohya_te_swap": {"family": "sdxl", "kind": "kohya_trap", "source": "sdxl_kohya", "edit": "swap_te",
                           "stages": [BASE, ("kohya_trap", "sdscripts"), ("kohya_load", "diffusers")]},
    # in_dims: LoRA on the global layers img_in, time_in, vector_in, txt_in (guidance_in: 0, no guidance embed)
    "flux_kohya_globals": {"family": "flux", "kind": "kohya", "module": "networks.lora_flux", "dim": 4, "alpha": 2,
                           "kwargs": {"single_dim": "0", "single_mod_dim": "4", "in_dims": "[4,4,4,0,4]"},
                           "base_model_version": "flux1",
                           "note": "TRAP: the global layers (img_in, time_in, vector_in, txt_in) are converted by "
                                   "diffusers to keys without the transformer. prefix and skipped; the diff is theirs",
                           "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
    "flux_kohya_linear1": {"family": "flux", "kind": "kohya", "module": "networks.lora_flux", "dim": 4, "alpha": 2,
                           "kwargs": {}, "base_model_version": "flux1",
                           "note": "TRAP: single_blocks_N_linear1 is split at Flux-dev's sizes [3072, 3072, 3072, "
                                   "12288] only",
                           "stages": [BASE, ("kohya_write", "sdscripts"), ("kohya_load", "diffusers")]},
}
# case id = <env of its first step>/<name>
CASES = {f"{c['stages'][1][1]}/{name}": c for name, c in _CASES.items()}

# ---- acceptance: conversions by the CLI, loaded back in the real libraries (worker task load_check) ----
# The converter writes OUT + ".safetensors" (kohya's OUT is one file); the worker loads it in the row's env:
# ``diffusers`` = pipe.load_lora_weights, ``sdscripts`` = sd-scripts' own create_network_from_weights (where
# diffusers' kohya loader skips layers or cannot split them). ``reference`` = the outputs the converted file must
# reproduce: ``live`` (the network as trained), ``kohya`` (the source file as sd-scripts reads it) or ``loaded``
# (as diffusers reads it) — for traps whose file means something other than what was trained (dropped .alpha,
# swapped text encoders), the conversion keeps what the FILE says. The worker applies tests/tolerance.py's model
# per output; TOL is the harness's flat backstop above it.
TOL = 1e-4
_KOHYA_ARGS = ["convert", "{src}", "{out}.safetensors", "--to", "{target}", "--json"]
_FOLDER_ARGS = ["convert", "{src}", "{out}", "--to", "{target}", "--json"]


def _row(case, target, env, reference="live", extra=(), note=None, expect="ok"):
    kind = _CASES[case]["kind"] if case in _CASES else ""
    src = "lora.safetensors" if kind.startswith("kohya") else "adapter" if kind == "peft_component" else \
        "pytorch_lora_weights.safetensors"
    cid = next(c for c in CASES if c.rsplit("/", 1)[1] == case)
    one_file = target == "kohya"  # kohya's OUT is one file; diffusers' a folder
    r = {"case": cid, "source": src, "target": target, "env": env, "expect": expect,
         "args": (_KOHYA_ARGS if one_file else _FOLDER_ARGS) + list(extra),
         "out_suffix": ".safetensors" if one_file else "", "reference": reference}
    return {**r, "note": note} if note else r


ACCEPTANCE = [
    *[_row(c, "kohya", env) for c in ("sd1_kohya", "sd1_kohya_locon", "sdxl_kohya", "sdxl_kohya_locon_dfnames",
                                      "flux_kohya") for env in ("diffusers", "sdscripts")],
    _row("flux_kohya_globals", "kohya", "sdscripts",
         note="diffusers' kohya loader skips the global layers (finding layers-diffusers-skips); sd-scripts loads them"),
    _row("flux_kohya_linear1", "kohya", "sdscripts",
         note="diffusers' kohya loader splits linear1 at Flux-dev's sizes only (finding linear1-not-flux-dev)"),
    *[_row(c, "kohya", env, "kohya", note="the file's own meaning: no .alpha = scale 1 (finding missing-alpha)")
      for c in ("sd1_kohya_noalpha", "sdxl_kohya_noalpha") for env in ("diffusers", "sdscripts")],
    _row("flux_kohya_noalpha", "kohya", "diffusers", "loaded",
         note="sd-scripts' own reader raises KeyError on this file; diffusers reads it at scale 1"),
    _row("sd1_kohya_sai", "kohya", "diffusers", extra=["--model-type", "sd1"],
         note="SAI-named SD1 U-Net: written with diffusers names, StableDiffusionPipeline loads it (it refused the source)"),
    _row("sdxl_kohya_te_swap", "kohya", "diffusers", "kohya",
         note="te1/te2 of equal width cannot be told apart: the file's own (swapped) meaning is kept"),
]
# diffusers format → kohya (per-module alphas from lora_adapter_metadata's patterns; LoCon conv; SAI names for
# SDXL; Flux q/k/v and linear1 parts fused block-diagonally with one common scale per fused module)
ACCEPTANCE += [
    # Loaded with sd-scripts; with diffusers too where its kohya loader can read them. It cannot for three, whose
    # outputs sd-scripts reads exactly: sd1_diffusers_patterns and sdxl_diffusers keep per-module alphas on
    # attention layers that diffusers' kohya loader replaces by the most common one (measured: off by 1.74 and
    # 0.077; finding alpha-diffusers-ignores), and flux_diffusers_fuse's linear1 is not at Flux-dev's sizes
    # (AssertionError; finding linear1-not-flux-dev).
    *[_row(c, "kohya", env, extra=mt) for c, mt in (("sd1_diffusers", ["--model-type", "sd1"]),
                                                    ("sd1_diffusers_alpha", ["--model-type", "sd1"]))
      for env in ("diffusers", "sdscripts")],
    *[_row(c, "kohya", "sdscripts", extra=mt) for c, mt in (("sd1_diffusers_patterns", ["--model-type", "sd1"]),
                                                            ("sdxl_diffusers", []), ("flux_diffusers_fuse", []))],
    _row("flux_diffusers", "kohya", "diffusers", expect="refused",
         note="transformer.proj_out is Flux's final_layer.linear: sd-scripts never builds it, diffusers' kohya "
              "loader skips it; refused unless --drop names it"),
]
# kohya → diffusers format, loaded with pipe.load_lora_weights: every sd-scripts case and trap, including the ones
# diffusers' own kohya loader gets wrong (global Flux layers skipped, linear1 at other sizes asserted, SAI-named
# SD1 refused): in its own format diffusers loads them whole
ACCEPTANCE += [
    *[_row(c, "diffusers", "diffusers") for c in ("sd1_kohya", "sd1_kohya_locon", "sdxl_kohya",
                                                  "sdxl_kohya_locon_dfnames", "flux_kohya", "flux_kohya_globals",
                                                  "flux_kohya_linear1")],
    *[_row(c, "diffusers", "diffusers", "kohya", note="the file's own meaning: no .alpha = scale 1")
      for c in ("sd1_kohya_noalpha", "sdxl_kohya_noalpha")],
    _row("flux_kohya_noalpha", "diffusers", "diffusers", "loaded"),
    _row("sd1_kohya_sai", "diffusers", "diffusers", extra=["--model-type", "sd1"]),
    _row("sdxl_kohya_te_swap", "diffusers", "diffusers", "kohya",
         note="te1/te2 of equal width cannot be told apart: the file's own (swapped) meaning is kept"),
]
# PEFT adapters of one component (no prefix) → diffusers / kohya with --component, loaded by diffusers'
# pipe.load_lora_weights and by sd-scripts' own network (one alpha per module: diffusers' kohya loader reads them too)
ACCEPTANCE += [
    *[_row(c, "diffusers", "diffusers", extra=["--component", comp])
      for c, comp in (("sd1_peft_unet", "unet"), ("sd1_peft_text_encoder", "text_encoder"))],
    *[_row(c, "kohya", env, extra=["--component", comp, "--model-type", "sd1"])
      for c, comp in (("sd1_peft_unet", "unet"), ("sd1_peft_text_encoder", "text_encoder"))
      for env in ("diffusers", "sdscripts")],
]
