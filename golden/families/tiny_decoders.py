"""Data the gguf, mlx and torchtune families share (stdlib only, no code): the tiny Llama and Qwen2 they build
from configs (and gguf's Mistral and Qwen3), the seeds and the token ids. 4 heads of 16, 2 kv heads (GQA, so a
q/k permutation uses n_kv_head), 2 blocks, vocab 128. A family takes a copy and overrides what its runtime fixes
(torchtune: norm eps, rope base)."""

MODEL_SEED = 0
LORA_SEED = 1234
LORA_STD = 0.2
INPUT_IDS = [1, 7, 33, 90, 12, 64, 5, 101, 77, 3, 45, 120]

_HEAD = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
_TAIL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.1}

LLAMA = {"model_class": "LlamaForCausalLM", "config_class": "LlamaConfig",
         "config": {**_HEAD, "attention_bias": False, **_TAIL}}
QWEN2 = {"model_class": "Qwen2ForCausalLM", "config_class": "Qwen2Config",
         "config": {**_HEAD, "use_sliding_window": False, **_TAIL}}

# the same dims (gguf's Mistral and Qwen3 rows): Mistral without sliding window; Qwen3's head_dim is its own key
# (default 128), q_norm/k_norm per head
MISTRAL = {"model_class": "MistralForCausalLM", "config_class": "MistralConfig",
           "config": {**_HEAD, "sliding_window": None, **_TAIL}}
QWEN3 = {"model_class": "Qwen3ForCausalLM", "config_class": "Qwen3Config",
         "config": {**_HEAD, "head_dim": 16, "attention_bias": False, "use_sliding_window": False, **_TAIL}}
