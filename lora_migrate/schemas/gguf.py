"""The gguf family: llama.cpp LoRA adapters, one ``.gguf`` file (data only; the codec is codecs/gguf).

Sources: ../shared/reference/ecosystem.md §7 and §15, read from llama.cpp 0c1e57098 as vendored by
llama-cpp-python 0.3.36 (``src/llama-adapter.{h,cpp}``, ``convert_lora_to_gguf.py``, ``conversion/llama.py``,
``conversion/qwen.py``) and gguf 0.19.0; measured in golden/results/FINDINGS_GGUF.md.

- Metadata: ``general.type = "adapter"``, ``general.architecture`` (must equal the base model's, else the runtime
  says "model arch and LoRA arch mismatch"), ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32). No rank
  key: ``llama_adapter_lora_weight::get_scale`` reads the rank of each pair from its tensor,
  ``rank = lora_b->ne[0]``, and applies ``scale = alpha ? adapter_scale·alpha/rank : adapter_scale``
  (``adapter_scale`` is the user's ``--lora-scaled`` value, 1 by default). So alpha = 0 means scale 1, rank
  patterns hold by themselves, and one alpha serves every module.
- Tensors: ``<base GGUF tensor name>.lora_a`` / ``.lora_b`` with the base names from gguf's own tables
  (``gguf.get_tensor_name_map``), e.g. ``blk.0.attn_q.weight.lora_a``. ``lora_a`` ne=[in, r], ``lora_b``
  ne=[r, out]: PEFT's row-major A (r, in) and B (out, r) bytes unchanged, except (a) ``token_embd.weight.lora_a``
  holds Aᵀ (vocab, r) (``llm_build_inp_embd`` gathers rows of it), and (b) for the architectures whose base GGUF
  permutes the q/k rows for RoPE (``LlamaModel.permute``, ``undo_permute = True``), the rows of the ``attn_q``
  (n_head) and ``attn_k`` (n_kv_head) ``lora_b``.
"""

from __future__ import annotations

import math

from .base import Convention, Frozen, KeyTemplates, Scaling

FAMILY = "gguf"


class GgufArch(Frozen):
    """How llama.cpp's ``convert_hf_to_gguf.py`` converts one transformers ``model_type``."""

    arch: str  # general.architecture (gguf.MODEL_ARCH_NAMES)
    permutes_qk: bool  # its model class permutes q/k rows per head (LlamaModel.undo_permute)
    converter_class: str  # the class in convert_hf_to_gguf's conversion/ package
    measured: bool  # run in the real llama.cpp by golden/families/gguf (FINDINGS_GGUF.md)
    block_prefix: str = "model.layers.{bid}."  # the transformers module path of block bid (to name modules back)


# transformers model_type → how llama.cpp converts it. Only decoders whose LoRA targets map 1:1 onto base GGUF
# tensors (no fused or split projections, no expert stacking) are listed; others are refused.
ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch(arch="llama", permutes_qk=True, converter_class="LlamaModel", measured=True),
    # MistralForCausalLM is registered to LlamaModel (conversion/llama.py): arch "llama", q/k permuted
    "mistral": GgufArch(arch="llama", permutes_qk=True, converter_class="LlamaModel", measured=True),
    "qwen2": GgufArch(arch="qwen2", permutes_qk=False, converter_class="Qwen2Model", measured=True),
    "qwen3": GgufArch(arch="qwen3", permutes_qk=False, converter_class="Qwen3Model(Qwen2Model)", measured=True),
}
# general.architecture → the model_type a GGUF adapter is read back as (its modules' transformers names)
MODEL_TYPE_OF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# --outtype → (GGML tensor type name, torch dtype name of the values read back, what it costs). q8_0 quantizes
# along ne[0] in blocks of 32: a tensor whose ne[0] is not a multiple of 32 (lora_b's ne[0] is r) is written f16,
# as convert_lora_to_gguf does (gguf.QuantError → "falling back to F16").
OUTTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "float32"),
    "f16": ("F16", "float16"),
    "bf16": ("BF16", "bfloat16"),
    "q8_0": ("Q8_0", "float32"),
}
Q8_0_BLOCK = 32
# One q8_0 block of 32 values x stores d = fp16(max|x|/127) and q = round(x·127/max|x|) (gguf.quants.Q8_0, bit-exact
# with ggml-quants.c); x̂ = q·d. Per element |x̂ − x| ≤ max|x|·(1/254 + 2⁻¹¹) (half a step, plus |q| ≤ 127 times
# d's fp16 rounding), so per block ‖x̂ − x‖₂ ≤ √32·(1/254 + 2⁻¹¹)·max|x| ≤ √32·(1/254 + 2⁻¹¹)·‖x‖₂, and summed over
# blocks ‖x̂ − x‖_F ≤ Q8_0_ERROR·‖x‖_F for the whole factor. Deterministic; Gaussian factors measure ≈ 0.005.
# It assumes d is a normal fp16 (max|x| ≥ 127·2⁻¹⁴ ≈ 0.0078 in the block); below that d's rounding is absolute
# (≤ 2⁻²⁵). Measured on Gaussian factors: ‖x̂ − x‖/‖x‖ = 0.0054 at std 1e-2 … 1e-3, 0.011 at 1e-4, 0.032 at 3e-5
# (over the bound), 0.097 at 1e-5, 1.0 at 1e-6 (all blocks round to 0). The check then fails the conversion (exit
# 1, nothing written) rather than pass it; --outtype f16 or f32 serves such adapters.
Q8_0_ERROR = math.sqrt(Q8_0_BLOCK) * (1 / 254 + 2.0**-11)

# Refusals, with the reason (one line each; {name} is the adapter).
REFUSALS: dict[str, str] = {
    "dora": "DoRA (lora_magnitude_vector) needs the base weights to renormalise every row; llama.cpp's LoRA "
            "applies only scale·B·A (convert_lora_to_gguf.py exits 'Not a lora_A or lora_B tensor')",
    "lora_bias": "lora_B.bias (lora_bias=true) adds a trained output bias; a llama.cpp adapter holds only "
                 "lora_a/lora_b pairs (convert_lora_to_gguf.py exits 'Not a lora_A or lora_B tensor')",
    "modules_to_save": "modules_to_save holds full trained copies of modules; a llama.cpp adapter holds only "
                       "lora_a/lora_b pairs (llama.cpp PR #9948)",
    "saved_embeddings": "full embedding/lm_head weights saved beside the adapter; a llama.cpp adapter holds only "
                        "lora_a/lora_b pairs (llama.cpp PR #9948)",
    "tied_lm_head": "a LoRA on lm_head, but the base model ties lm_head to embed_tokens (tie_word_embeddings): "
                    "its GGUF has no output.weight for the pair to attach to (convert_lora_to_gguf.py: 'lm_head is "
                    "present in adapter, but is ignored in base model')",
    "lm_head_unknown_tie": "a LoRA on lm_head, and without the base model's config.json it cannot be known whether "
                           "lm_head is tied to embed_tokens (then the GGUF has no output.weight); pass --base-model",
    "unknown_heads": "the base GGUF of model_type {model_type} permutes the q/k rows per head, so the attn_q/attn_k "
                     "lora_b rows must be permuted with the base model's num_attention_heads / num_key_value_heads; "
                     "none is known: pass --base-model (a folder or cached hub id with config.json)",
    "unknown_type": "the GGUF architecture comes from the base model's model_type, which is not known: pass "
                    "--base-model or --model-type",
}

# A frozen copy of a base layer's weight saved beside the adapter (PEFT's save_embedding_layers on a LoRA'd
# embed_tokens/lm_head): not trained, the runtime takes it from the base GGUF; convert_lora_to_gguf.py skips keys
# containing ".base_layer.weight" too. Left out with a note; other full tensors are refused.
FROZEN_BASE_COPY_SUFFIX = ".base_layer.weight"

GGUF = Convention(
    name="gguf",
    family=FAMILY,
    library="llama-cpp-python",
    versions=">=0.3",
    aliases=("llama.cpp", "llama-cpp", "gguf-lora"),
    summary="llama.cpp LoRA adapter: one .gguf file (general.type=adapter, adapter.lora.alpha, "
            "<base tensor>.lora_a/.lora_b), loaded with --lora / Llama(lora_path=…)",
    keys=KeyTemplates(a="{module}.lora_a", b="{module}.lora_b"),  # {module}: the base GGUF tensor name
    scaling={"linear": Scaling.ALPHA_OVER_R, "embedding": Scaling.ALPHA_OVER_R},
    scaling_notes="alpha/r per pair, r = lora_b ne[0] (llama-adapter.h get_scale); alpha 0 means scale 1; "
                  "no rsLoRA and no alpha patterns (rewritten exactly: one alpha, or folded into B)",
    config_file="",
    weights_write="OUT.gguf (one file: metadata + lora_a/lora_b tensors)",
    # saved_embeddings: the codec leaves frozen base-layer copies out and refuses other full tensors
    features=frozenset({"lora", "embedding", "rslora", "patterns", "saved_embeddings"}),
)

CONVENTIONS = (GGUF,)

