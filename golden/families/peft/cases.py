"""PEFT goldens: peft 0.21.2, 0.15.2, 0.13.2 (DATA ONLY: stdlib, no torch).

Read by golden/harness.py (host) and by worker.py (inside each env's venv). What the worker writes per case is in
worker.py's docstring; how the harness uses ENVS / CASES / ACCEPTANCE is in golden/README.md.

Envs (torch==2.13.0 CPU wheel first, then everything constrained to it):

    pf21   peft==0.21.2 + transformers==4.57.6   (current)
    pf152  peft==0.15.2 + transformers==4.51.3   (last release whose merge adds lora_B.bias unscaled, #2486)
    pf013  peft==0.13.2 + transformers==4.46.3   (TypeError on unknown adapter_config fields; one combined
                                                  rank/alpha pattern list, #2195)
"""

# cases live one level down, in golden/peft/<env>/<case>, so tests/test_golden.py's glob("*/*/meta.json") over the
# AdapterHub goldens does not pick them up
DATA_DIR = "peft"
TOL = 1e-5
MODEL_SEED = 0          # torch.manual_seed before building every base model

# --------------------------------------------------------------------------------------------------
# Environments: exact install recipes.
# --------------------------------------------------------------------------------------------------
ENVS = {
    "pf21": {"library": "peft", "library_version": "0.21.2",
             "deps": ["peft==0.21.2", "transformers==4.57.6", "safetensors"],
             "check": "import transformers, peft; assert peft.__version__ == '0.21.2'"},
    "pf152": {"library": "peft", "library_version": "0.15.2",
              "deps": ["peft==0.15.2", "transformers==4.51.3", "safetensors"],
              "check": "import transformers, peft; assert peft.__version__ == '0.15.2'"},
    "pf013": {"library": "peft", "library_version": "0.13.2",
              "deps": ["peft==0.13.2", "transformers==4.46.3", "safetensors"],
              "check": "import transformers, peft; assert peft.__version__ == '0.13.2'"},
}
# AdapterHub envs (family adapterhub) that `accept` loads the adapters-* targets in
ADAPTERHUB_ENVS = ("ad13", "ad101")

# --------------------------------------------------------------------------------------------------
# Models and inputs (the configs of tests/models.py). Arch "conv" is the tiny torch model of tiny_conv.py.
# --------------------------------------------------------------------------------------------------
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": {"model_class": "LlamaForCausalLM", "config": LLAMA},
    "llama_bias": {"model_class": "LlamaForCausalLM", "config": dict(LLAMA, attention_bias=True, mlp_bias=True)},
    "llama_seqcls": {"model_class": "LlamaForSequenceClassification",
                     "config": dict(LLAMA, num_labels=3, pad_token_id=0)},
    "conv": {"model_class": "TinyConvNet", "config": dict(in_channels=3, channels=8, num_labels=5)},  # not transformers
    "gpt2": {"model_class": "GPT2LMHeadModel",
             "config": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)},
    # scaled embeddings (issue 12): Gemma3's embed_scale √64 = 8, BART's with scale_embedding √32
    "gemma3_text": {"model_class": "Gemma3ForCausalLM",
                    "config": dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                   max_position_embeddings=64)},
    "bart_scaled": {"model_class": "BartForConditionalGeneration",
                    "config": dict(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64, scale_embedding=True,
                                   dropout=0.0)},
}
INPUTS = {"input_ids": [[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]]}
ADAPTER_SEED = 2000     # torch.Generator seed for adapter #i of a case is ADAPTER_SEED + i
LORA_STD = 0.2
TRAIN_STD = 0.1         # PiSSA/OLoRA "training" perturbation

# --------------------------------------------------------------------------------------------------
# Cases: arch, adapters [(name, LoraConfig kwargs)], options. All kwargs are passed to the env's LoraConfig.
# Options: "inputs" (the case's own model inputs instead of INPUTS), "base_model" (accept passes
# --base-model <the case's base folder>: the base config.json gives a scaled embedding's factor), "init", "merge",
# "save_merged".
# --------------------------------------------------------------------------------------------------
QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLM = {"task_type": "CAUSAL_LM"}
PATTERNS = dict(rank_pattern={"layers.0.self_attn.q_proj": 8, r"layers\.1\.self_attn\.(k|v)_proj": 2},
                alpha_pattern={"v_proj": 32, "q_proj": 4})
CASES = {
    "pf21/llama_plain": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=16))],
                             description="q_proj, v_proj; r=8, alpha=16: s = 2."),
    "pf21/llama_rslora": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=ALL_LINEAR, r=8,
                                                                       lora_alpha=16, use_rslora=True))],
                              description="all 7 linear layers; r=8, alpha=16, use_rslora: s = 16/sqrt(8) = 5.657."),
    "pf21/llama_patterns": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=["q_proj", "k_proj",
                                                                                              "v_proj"],
                                                                         r=4, lora_alpha=8, **PATTERNS))],
                                description="q,k,v; r=4, alpha=8 with regex rank_pattern/alpha_pattern: ranks 8/4/2, "
                                            "alphas 4/8/32 by module (see meta measured.modules)."),
    "pf21/llama_rslora_patterns": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=["q_proj", "k_proj",
                                                                                                     "v_proj"],
                                                                                r=4, lora_alpha=8, use_rslora=True,
                                                                                **PATTERNS))],
                                       description="llama_patterns with use_rslora: s = alpha_k/sqrt(r_k) per module."),
    "pf21/llama_lora_bias": dict(arch="llama_bias", merge=True,
                                 adapters=[("default", dict(CLM, target_modules=QV + ["down_proj"], r=8, lora_alpha=32,
                                                            lora_bias=True))],
                                 description="attention_bias + mlp_bias base; lora_bias=True on q,v,down; r=8, "
                                             "alpha=32: s = 4, forward adds s*(BAx + l). peft 0.21 merges b + s*l."),
    "pf21/llama_embed": dict(arch="llama", base_model=True,
                             adapters=[("default", dict(CLM, target_modules=["embed_tokens", "q_proj"], r=8,
                                                        lora_alpha=16))],
                             description="LoRA on embed_tokens (lora_embedding_A (r, vocab) / lora_embedding_B "
                                         "(dim, r)) and q_proj; s = 2. save_embedding_layers='auto' also saves the "
                                         "full embedding matrix."),
    "pf21/llama_dora": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=16,
                                                                     use_dora=True))],
                            description="DoRA on q,v; r=8, alpha=16; lora_magnitude_vector randomised around ||W||."),
    "pf21/llama_modules_to_save": dict(arch="llama_seqcls",
                                       adapters=[("default", dict(task_type="SEQ_CLS", target_modules=QV, r=8,
                                                                  lora_alpha=16))],
                                       description="LlamaForSequenceClassification(num_labels=3), task_type SEQ_CLS: "
                                                   "peft adds 'score' to modules_to_save; its trained copy is "
                                                   "randomised and saved as base_model.model.score.weight."),
    "pf21/llama_multi": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=16)),
                                                     ("m2", dict(CLM, target_modules=["k_proj", "o_proj"], r=4,
                                                                 lora_alpha=8, use_rslora=True))],
                             description="two adapters saved by one save_pretrained: default (q,v, r=8, alpha=16, "
                                         "s=2) at adapter/, m2 (k,o, r=4, alpha=8, rsLoRA, s=4) at adapter/m2/. "
                                         "logits_default / logits_m2: that adapter alone active."),
    "pf21/gpt2_c_attn": dict(arch="gpt2", adapters=[("default", dict(CLM, target_modules=["c_attn", "c_proj", "c_fc"],
                                                                     r=4, lora_alpha=8, fan_in_fan_out=True))],
                             description="GPT-2 Conv1D layers c_attn (fused qkv, one LoRA over all 96 outputs), "
                                         "attn.c_proj, mlp.c_proj, mlp.c_fc; fan_in_fan_out=True; r=4, alpha=8: s=2."),
    "pf21/llama_pissa": dict(arch="llama", init="pissa", merge=True,
                             adapters=[("default", dict(CLM, target_modules=QV, r=4, lora_alpha=8,
                                                        init_lora_weights="pissa"))],
                             description="PiSSA (full SVD) on q,v, r=4, alpha=8. pissa_init/: the initial adapter; "
                                         "adapter/: after 'training' (A, B + noise), relative to residual_base/; "
                                         "converted_by_peft/: peft's own rank-8 conversion relative to the original "
                                         "base. logits = adapter/ on residual_base."),
    "pf21/llama_olora": dict(arch="llama", init="olora", merge=True,
                             adapters=[("default", dict(CLM, target_modules=QV, r=4, lora_alpha=8,
                                                        init_lora_weights="olora"))],
                             description="OLoRA (QR) on q,v, r=4, alpha=8; same layout as llama_pissa."),
    "pf21/conv": dict(arch="conv", adapters=[("default", dict(target_modules=["conv1", "conv2", "conv3d", "conv1d",
                                                                               "head"],
                                                              r=4, lora_alpha=8, lora_bias=True,
                                                              rank_pattern={"conv3d": 8}, alpha_pattern={"conv1d": 16}))],
                      description="the tiny conv model (conv_model_class, not transformers): LoRA on nn.Conv2d conv1 "
                                  "(3x3, stride 2, padding 1) and conv2, nn.Conv3d conv3d, nn.Conv1d conv1d (kernel 3, "
                                  "stride 2) and the Linear head; r=4 (conv3d 8), alpha=8 (conv1d 16), lora_bias: "
                                  "lora_A (r, in, *k), lora_B (out, r, 1, ...) + bias."),
    "pf21/conv2d_dora": dict(arch="conv", adapters=[("default", dict(target_modules=["conv1", "conv2", "head"], r=4,
                                                                     lora_alpha=8, use_dora=True, use_rslora=True))],
                             description="the conv model, DoRA + rsLoRA on the two nn.Conv2d and the head (what "
                                         "PEFT 0.13 can load: Conv2d DoRA since 0.10); s = 8/sqrt(4) = 4; "
                                         "lora_magnitude_vector (1, out, 1, 1) on the convs."),
    "pf21/gemma3_embed": dict(arch="gemma3_text", base_model=True,
                              adapters=[("default", dict(CLM, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                         r=4, lora_alpha=8))],
                              description="Gemma3 (hidden 64): LoRA on the scaled embed_tokens (embed_scale 8) and "
                                          "q,v; r=4, alpha=8. peft 0.21.2 multiplies the LoRA embedding output by "
                                          "8 (#2825, 0.18.0), 0.15.2 does not."),
    "pf21/bart_scaled_embed": dict(arch="bart_scaled", base_model=True,
                                   inputs=dict(INPUTS, decoder_input_ids=[[5, 17, 33, 2], [7, 7, 64, 120]]),
                                   adapters=[("default", dict(target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                              r=4, lora_alpha=8))],
                                   description="BART scale_embedding=True (d_model 32: embed_scale √32) with LoRA on "
                                               "encoder/decoder embed_tokens and q,v; r=4, alpha=8."),
    "pf152/gemma3_embed": dict(arch="gemma3_text", base_model=True,
                               adapters=[("default", dict(CLM, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                          r=4, lora_alpha=8))],
                               description="pf21/gemma3_embed written by peft 0.15.2 (no embed_scale on LoRA)."),
    "pf152/llama_plain": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=16))],
                              description="peft 0.15.2: q_proj, v_proj; r=8, alpha=16: s = 2."),
    "pf152/llama_lora_bias_merged": dict(arch="llama_bias", merge=True, save_merged=True,
                                         adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=32,
                                                                    lora_bias=True))],
                                         description="peft 0.15.2, lora_bias on q,v; r=8, alpha=32: s = 4. merged/ "
                                                     "and merged_sharded/ are what merge_and_unload().save_pretrained "
                                                     "wrote: biases b + l instead of b + s*l (#2486)."),
    "pf013/llama_plain": dict(arch="llama", adapters=[("default", dict(CLM, target_modules=QV, r=8, lora_alpha=16))],
                              description="peft 0.13.2: q_proj, v_proj; r=8, alpha=16: s = 2."),
    "pf013/llama_patterns": dict(arch="llama", adapters=[("default", dict(
        CLM, target_modules=QV, r=4, lora_alpha=8, rank_pattern={"q_proj": 8},
        alpha_pattern={"layers.0.self_attn.q_proj": 32, "v_proj": 16}))],
        description="peft 0.13.2 patterns, r=4, alpha=8, rank_pattern {q_proj: 8}, alpha_pattern "
                    "{layers.0.self_attn.q_proj: 32, v_proj: 16}. 0.13 looks both up with ONE key, the first "
                    "match in rank keys + alpha keys: layer-0 q_proj matches 'q_proj' first, so its alpha "
                    "stays 8 (0.14+ gives 32)."),
}

# --------------------------------------------------------------------------------------------------
# Probes: an adapter_config.json edited as named, loaded in one env (measured facts for FINDINGS_PEFT.md).
# (name, env, source case, edit {"drop": [...], "set": {...}}, base: "base" | "residual_base")
# --------------------------------------------------------------------------------------------------
PROBES = [
    ("pf013 loads a config with one field it does not know (lora_bias: false)", "pf013", "pf013/llama_plain",
     {"set": {"lora_bias": False}}, "base"),
    ("pf013 loads a 0.21.2 adapter_config.json as written", "pf013", "pf21/llama_plain", {}, "base"),
    ("pf152 loads a 0.21.2 adapter_config.json as written", "pf152", "pf21/llama_plain", {}, "base"),
    ("pf21 loads an rsLoRA adapter whose use_rslora is dropped", "pf21", "pf21/llama_rslora",
     {"drop": ["use_rslora"]}, "base"),
    ("pf21 loads a lora_bias adapter whose lora_bias is dropped", "pf21", "pf21/llama_lora_bias",
     {"drop": ["lora_bias"]}, "base"),
    ("pf21 loads a DoRA adapter whose use_dora is dropped", "pf21", "pf21/llama_dora", {"drop": ["use_dora"]}, "base"),
    ("pf21 loads a patterns adapter whose alpha_pattern is dropped", "pf21", "pf21/llama_patterns",
     {"drop": ["alpha_pattern"]}, "base"),
    ("pf21 loads the trained PiSSA adapter on residual_base with init_lora_weights=true", "pf21",
     "pf21/llama_pissa", {"set": {"init_lora_weights": True}}, "residual_base"),
    ("pf21 loads the trained PiSSA adapter as written (init 'pissa') on residual_base", "pf21",
     "pf21/llama_pissa", {}, "residual_base"),
    ("pf21 loads the trained OLoRA adapter on residual_base with init_lora_weights=true", "pf21",
     "pf21/llama_olora", {"set": {"init_lora_weights": True}}, "residual_base"),
]

# --------------------------------------------------------------------------------------------------
# Acceptance: (case, target, expectation[, note]). "ok": the output loads in the target's env and matches the golden
# logits (<= TOL); "refused": the converter exits 2 with a one-line message.
# --------------------------------------------------------------------------------------------------
TARGET_ENV = {"peft": "pf21", "peft-0.15": "pf152", "peft-0.13": "pf013", "vllm": "pf21", "lorax": "pf21",
              "adapters-1.1": "ad13", "adapters-1.0": "ad101"}
_ROWS = [
    ("pf21/llama_plain", "peft", "ok"),
    ("pf21/llama_plain", "peft-0.15", "ok"),
    ("pf21/llama_plain", "peft-0.13", "ok"),
    ("pf21/llama_plain", "adapters-1.1", "ok"),
    ("pf21/llama_plain", "adapters-1.0", "ok"),
    ("pf21/llama_plain", "vllm", "ok"),
    ("pf21/llama_plain", "lorax", "ok"),
    ("pf21/llama_rslora", "peft-0.13", "ok"),
    ("pf21/llama_rslora", "vllm", "ok"),
    ("pf21/llama_rslora", "lorax", "ok"),
    ("pf21/llama_patterns", "peft-0.13", "ok"),
    ("pf21/llama_patterns", "vllm", "ok"),
    ("pf21/llama_patterns", "lorax", "ok"),
    ("pf21/llama_patterns", "adapters-1.1", "ok"),
    ("pf21/llama_rslora_patterns", "peft-0.13", "ok"),
    ("pf21/llama_rslora_patterns", "lorax", "ok"),
    ("pf21/llama_lora_bias", "peft-0.15", "ok"),
    ("pf21/llama_lora_bias", "peft-0.13", "refused"),
    ("pf21/llama_lora_bias", "vllm", "refused"),
    ("pf21/llama_lora_bias", "lorax", "refused"),
    ("pf21/llama_embed", "peft-0.13", "ok"),
    ("pf21/llama_embed", "vllm", "ok", "the frozen embed_tokens.base_layer.weight copy is left out (older vLLM "
                                       "rejects it as 'unsupported LoRA weight', newer ones skip it); peft reloads "
                                       "the output identically without it"),
    ("pf21/llama_embed", "lorax", "refused"),
    ("pf21/llama_dora", "peft-0.13", "ok"),
    ("pf21/llama_dora", "adapters-1.1", "refused"),
    ("pf21/llama_dora", "vllm", "refused"),
    ("pf21/llama_dora", "lorax", "refused"),
    ("pf21/llama_modules_to_save", "peft-0.13", "ok"),
    ("pf21/llama_modules_to_save", "vllm", "refused"),
    ("pf21/llama_multi", "peft-0.13", "ok"),
    ("pf21/llama_multi", "vllm", "ok"),
    ("pf21/gpt2_c_attn", "peft-0.13", "ok"),
    ("pf21/gpt2_c_attn", "vllm", "ok"),
    ("pf21/llama_pissa", "peft", "ok"),
    ("pf21/llama_pissa", "peft-0.13", "ok"),
    ("pf21/llama_pissa", "vllm", "ok"),
    ("pf21/llama_olora", "peft", "ok"),
    ("pf21/llama_olora", "lorax", "ok"),
    ("pf21/conv", "peft", "ok"),
    ("pf21/conv", "peft-0.15", "ok"),
    ("pf21/conv", "peft-0.13", "refused"),
    ("pf21/conv", "lorax", "refused"),
    ("pf21/conv", "vllm", "refused"),
    ("pf21/conv", "adapters-1.1", "refused"),
    ("pf21/conv2d_dora", "peft-0.13", "ok"),
    ("pf21/conv2d_dora", "peft-0.15", "ok"),
    ("pf21/gemma3_embed", "peft-0.15", "ok"),
    ("pf21/bart_scaled_embed", "peft-0.15", "ok"),
    ("pf152/gemma3_embed", "peft", "ok"),
    ("pf152/llama_plain", "peft", "ok"),
    ("pf152/llama_plain", "peft-0.13", "ok"),
    ("pf152/llama_lora_bias_merged", "peft", "ok"),
    ("pf013/llama_plain", "peft", "ok"),
    ("pf013/llama_patterns", "peft", "ok"),
    ("pf013/llama_patterns", "vllm", "ok"),
    # reverse direction: AdapterHub goldens (family adapterhub), loaded with PeftModel on their own base
    ("ad13/llama_ffn", "peft", "ok"),
    ("ad13/gpt2_mixed", "peft", "ok"),
    ("at31/t5_qv", "peft", "ok"),
    ("ad101/llama_ffn", "peft", "ok"),
]
# fix-merged: (case, merged folder, env that loads the repaired model with transformers from_pretrained)
FIX_MERGED = [
    ("pf152/llama_lora_bias_merged", "merged", "pf21"),
    ("pf152/llama_lora_bias_merged", "merged_sharded", "pf21"),
    ("pf152/llama_lora_bias_merged", "merged", "pf152"),
]


def _extra_args(case: str) -> list:
    """base_model cases pass their base folder (worker.py writes it at <case>/../_base/<arch>; meta.json "base"),
    PiSSA/OLoRA sources their initial adapter."""
    spec = CASES.get(case, {})
    return ((["--base-model", "{case}/../_base/" + spec["arch"]] if spec.get("base_model") else [])
            + (["--initial-adapter", "{case}/pissa_init"] if spec.get("init") else []))


# the harness's rows
ACCEPTANCE = [{"case": case, "target": target, "env": TARGET_ENV[target], "expect": expect,
               **({"note": note[0]} if note else {}),
               **({"extra_args": _extra_args(case)} if _extra_args(case) else {})}
              for case, target, expect, *note in _ROWS] + \
             [{"case": case, "source": folder, "target": "fix-merged", "env": env, "expect": "ok",
               "args": ["fix-merged", "{src}", "{out}", "--adapter", "{case}/adapter", "--merged-with", "peft-0.15"]}
              for case, folder, env in FIX_MERGED]
