"""AdapterHub goldens: adapter-transformers 3.1.0, adapters 1.0.1, adapters 1.3.0 (DATA ONLY: stdlib, no torch).

Read by golden/harness.py (host) and by worker.py (inside each env's venv). What the worker writes per case is in
worker.py's docstring; how the harness uses ENVS / CASES / ACCEPTANCE is in golden/README.md.

Envs (torch==2.13.0 CPU wheel first, then everything constrained to it):

    at31   adapter-transformers==3.1.0 (a fork of transformers 4.21.3, installed --no-deps in ``setup``: its pinned
           tokenizers<0.13 does not build on Python 3.11 and is not needed, token ids are given directly)
    ad101  adapters==1.0.1 + transformers==4.45.2
    ad13   adapters==1.3.0 (pins transformers~=4.57.6)
"""

DATA_DIR = ""   # the cases live in golden/<env>/<case> (golden/at31/t5_qv, ...)
TOL = 1e-5      # max |Δlogit| that counts as "same"

# --------------------------------------------------------------------------------------------------
# Environments: exact install recipes.
# --------------------------------------------------------------------------------------------------
ENVS = {
    "at31": {
        "library": "adapter-transformers",
        "library_version": "3.1.0",
        # adapter-transformers's other runtime deps, by hand. huggingface-hub 0.16.4 still has every name
        # transformers 4.21.3 imports; numpy<2 because 4.21.3 predates numpy 2.
        "deps": ["numpy==1.26.4", "filelock", "huggingface-hub==0.16.4", "packaging", "pyyaml", "regex",
                 "requests", "tqdm"],
        # --no-deps: adapter-transformers pins tokenizers<0.13, which has no cp311 wheel and fails to build.
        "setup": ["{pip} --no-deps adapter-transformers==3.1.0"],
        "check": "import transformers.adapters",
    },
    "ad101": {
        "library": "adapters",
        "library_version": "1.0.1",
        "deps": ["adapters==1.0.1", "transformers==4.45.2", "safetensors"],
        "check": "import transformers, adapters",
    },
    "ad13": {
        "library": "adapters",
        "library_version": "1.3.0",
        "deps": ["adapters==1.3.0", "safetensors"],
        "check": "import transformers, adapters",
    },
}

# --------------------------------------------------------------------------------------------------
# Models and inputs.
# --------------------------------------------------------------------------------------------------
ARCHS = {
    "t5": {
        "model_class": "T5ForConditionalGeneration",
        "config_class": "T5Config",
        "config": dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                       num_decoder_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        "inputs": {"input_ids": [[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]],
                   "decoder_input_ids": [[0, 11, 42, 9], [0, 3, 100, 77]]},
    },
    "gpt2": {
        "model_class": "GPT2LMHeadModel",
        "config_class": "GPT2Config",
        "config": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0),
        "inputs": {"input_ids": [[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]]},
    },
    "llama": {
        "model_class": "LlamaForCausalLM",
        "config_class": "LlamaConfig",
        "config": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "inputs": {"input_ids": [[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]]},
    },
}

MODEL_SEED = 0          # torch.manual_seed before building every base model
ADAPTER_SEED = 1000     # torch.Generator seed for adapter #i is ADAPTER_SEED + i
LORA_STD = 0.2          # lora_A, lora_B, gate.* ~ N(0, 0.2^2);  (IA)^3 lora_B ~ 1 + N(0, 0.2^2)

# --------------------------------------------------------------------------------------------------
# Cases.  adapters: list of (name, config class name, kwargs).
# --------------------------------------------------------------------------------------------------
LORA_QV = ("LoRAConfig", dict(r=8, alpha=16))
CASES = {
    "at31/t5_qv": dict(arch="t5", adapters=[("m1", *LORA_QV)],
                       description="adapter-transformers 3.1.0 T5, LoRAConfig(r=8, alpha=16): default q,v on every "
                                   "T5Attention (encoder self, decoder self, decoder cross). Scale alpha/r = 2."),
    "at31/t5_ffn": dict(arch="t5", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=16, attn_matrices=["q", "k", "v"],
                                                                       intermediate_lora=True, output_lora=True))],
                        description="adapter-transformers 3.1.0 T5, LoRA on q,k,v + DenseReluDense.wi_1 "
                                    "(intermediate) + DenseReluDense.wo (output). Scale alpha/r = 2."),
    "at31/t5_multi": dict(arch="t5", full=True,
                          adapters=[("m1", "LoRAConfig", dict(r=8, alpha=16)),
                                    ("m2", "LoRAConfig", dict(r=4, alpha=32, intermediate_lora=True))],
                          description="adapter-transformers 3.1.0 T5 with two LoRA adapters side by side, saved as a "
                                      "FULL model with save_pretrained (config.json holds 'adapters'). logits_m1: m1 "
                                      "alone active; logits_m2: m2 alone active (scale 8)."),
    "at31/t5_ia3": dict(arch="t5", adapters=[("m1", "IA3Config", dict(alpha=2))],
                        description="adapter-transformers 3.1.0 T5, IA3Config(alpha=2) (defaults r=1, k,v + "
                                    "intermediate wi_1, composition_mode='scale'). lora_B ~ 1+N(0,0.2). "
                                    "y = (Wx+b) * (alpha/r * l) = (Wx+b) * 2l."),
    "at31/t5_gated": dict(arch="t5", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=16, use_gating=True))],
                          description="adapter-transformers 3.1.0 T5, gated LoRA (use_gating=True): the gate replaces "
                                      "alpha/r. A converter must REFUSE this source; logits recorded anyway."),
    "at31/t5_odd_scale": dict(arch="t5", adapters=[("m1", "LoRAConfig", dict(r=6, alpha=16,
                                                                             attn_matrices=["q", "k", "v"]))],
                              description="adapter-transformers 3.1.0 T5, LoRAConfig(r=6, alpha=16, q,k,v): scale "
                                          "alpha/r = 2.667 is not a power of two, so folding it into B is not "
                                          "bit-exact (every other case uses 2, 4 or 8, which fold exactly)."),
    "ad101/t5_qv": dict(arch="t5", adapters=[("m1", *LORA_QV)],
                        description="adapters 1.0.1 T5, LoRAConfig(r=8, alpha=16). This version applies scale 1.0 in "
                                    "the unmerged LoRALinear path (alpha ignored); logits are as the library computes "
                                    "them. logits_merged uses alpha/r."),
    "ad101/gpt2_mixed": dict(arch="gpt2", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=32, attn_matrices=["q", "v"],
                                                                              intermediate_lora=True,
                                                                              output_lora=True))],
                             description="adapters 1.0.1 GPT-2, LoRA on c_attn (LoRAMergedLinear, scale alpha/r=4) and "
                                         "mlp.c_fc / mlp.c_proj (LoRALinear, scale 1.0 in 1.0.1): mixed scaling in "
                                         "one adapter."),
    "ad101/llama_ffn": dict(arch="llama", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=16, intermediate_lora=True,
                                                                              output_lora=True,
                                                                              attn_matrices=["q", "k", "v"]))],
                            description="adapters 1.0.1 Llama (GQA 4 heads / 2 kv heads), LoRA on q,k,v_proj + "
                                        "mlp.down_proj (intermediate!) + mlp.up_proj (output!). Scale 1.0 in 1.0.1."),
    "ad13/t5_qv": dict(arch="t5", adapters=[("m1", *LORA_QV)], same_as="ad101/t5_qv",
                       description="adapters 1.3.0 T5, LoRAConfig(r=8, alpha=16). Scale alpha/r = 2."),
    "ad13/t5_qv_safetensors": dict(arch="t5", adapters=[("m1", *LORA_QV)], save_kwargs=dict(use_safetensors=True),
                                   description="adapters 1.3.0 T5, LoRAConfig(r=8, alpha=16), saved with "
                                               "save_adapter(..., use_safetensors=True)."),
    "ad13/gpt2_mixed": dict(arch="gpt2", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=32, attn_matrices=["q", "v"],
                                                                             intermediate_lora=True,
                                                                             output_lora=True))],
                            same_as="ad101/gpt2_mixed",
                            description="adapters 1.3.0 GPT-2, LoRA on c_attn (merged) + c_fc + c_proj; every layer "
                                        "uses alpha/r = 4."),
    "ad13/llama_ffn": dict(arch="llama", adapters=[("m1", "LoRAConfig", dict(r=8, alpha=16, intermediate_lora=True,
                                                                             output_lora=True,
                                                                             attn_matrices=["q", "k", "v"]))],
                           same_as="ad101/llama_ffn",
                           description="adapters 1.3.0 Llama, LoRA on q,k,v_proj + mlp.down_proj + mlp.up_proj. "
                                       "Scale alpha/r = 2."),
}

# Environments that can build each architecture (Llama is not in transformers 4.21.3).
ENV_ARCHS = {"at31": {"t5", "gpt2"}, "ad101": {"t5", "gpt2", "llama"}, "ad13": {"t5", "gpt2", "llama"}}

# --------------------------------------------------------------------------------------------------
# Acceptance: (case, target). Every row must convert, load in the target's env with load_adapter and match the
# golden logits (<= TOL); at31/t5_gated must be refused (exit 2, one line).
# --------------------------------------------------------------------------------------------------
TARGET_ENV = {"adapters-1.0": "ad101", "adapter-transformers-3.1": "at31", "adapters-1.1": "ad13"}
_ROWS = [
    ("at31/t5_qv", "adapters-1.0"),
    ("at31/t5_ffn", "adapters-1.0"),
    ("at31/t5_multi", "adapters-1.0"),
    ("at31/t5_ia3", "adapters-1.0"),
    ("at31/t5_gated", "adapters-1.0"),
    ("at31/t5_odd_scale", "adapters-1.0"),
    ("ad13/gpt2_mixed", "adapters-1.0"),
    ("ad13/llama_ffn", "adapters-1.0"),
    ("ad13/t5_qv", "adapters-1.0"),
    ("ad13/t5_qv_safetensors", "adapters-1.0"),
    ("at31/t5_qv", "adapter-transformers-3.1"),
    ("ad101/t5_qv", "adapter-transformers-3.1"),
    ("ad101/t5_qv", "adapters-1.1"),
    ("ad101/gpt2_mixed", "adapters-1.1"),
    ("ad101/llama_ffn", "adapters-1.1"),
]
ACCEPTANCE = [{"case": case, "target": target, "env": TARGET_ENV[target],
               "expect": "refused" if CASES[case]["adapters"][0][2].get("use_gating") else "ok",
               "source": "full" if CASES[case].get("full") else "adapter"} for case, target in _ROWS]
