"""gguf family (llama.cpp LoRA adapters): data only, stdlib-only.

Ground truth for the llama.cpp conventions of issue 15, written and run by the real runtime:
base models built from the configs below -> ``convert_hf_to_gguf.py`` (f32); PEFT adapters written by real peft
0.21.2 -> llama.cpp's own ``convert_lora_to_gguf.py`` -> ``llama_cpp.Llama(base, lora_path=...)`` logits on fixed
token ids, against PEFT's logits. Each case also gets a hand-written adapter (``gguf.GGUFWriter``, PEFT's bytes, the
q/k lora_b row permutation done here) with the exact scale: the target a converter must hit.
"""

import importlib.util as _iu
from pathlib import Path as _Path

_spec = _iu.spec_from_file_location("golden_tiny_decoders", _Path(__file__).resolve().parent.parent / "tiny_decoders.py")
TINY = _iu.module_from_spec(_spec)
_spec.loader.exec_module(TINY)  # shared data: the tiny Llama/Qwen2, seeds, token ids


# unpacked in GOLDEN_WORK (outside the repo); its vendor/llama.cpp/*.py scripts are used, not committed
SDIST = "llama_cpp_python-0.3.36"
# llama-cpp-python is compiled from its sdist (~50 min on 2 cores) with
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF")

ENVS = {
    "llamacpp": {
        "library": "llama-cpp-python",
        "library_version": "0.3.36",
        "deps": ["gguf==0.19.0", "transformers==4.57.6", "peft==0.21.2", "safetensors", "numpy", "sentencepiece",
                 "llama-cpp-python==0.3.36"],
        "pip_args": ["--no-binary", "llama-cpp-python"],
        "env": {"CMAKE_ARGS": CMAKE_ARGS},
        "setup": [  # the conversion scripts travel in the sdist only: unpacked in {work}, outside the repo
            "{python} -m pip download -q --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d {work}",
            "tar xzf {work}/" + SDIST + ".tar.gz -C {work}",
        ],
        "check": ("import os, gguf, llama_cpp\nassert os.path.isfile(os.path.join(os.environ['GOLDEN_WORK'], "
                  f"'{SDIST}/vendor/llama.cpp/convert_lora_to_gguf.py'))"),
    },
}

MODEL_SEED, LORA_SEED, LORA_STD, INPUT_IDS = TINY.MODEL_SEED, TINY.LORA_SEED, TINY.LORA_STD, TINY.INPUT_IDS


# tiny models: 4 heads of 16, 2 kv heads (GQA, so k's permutation uses n_kv_head), 2 blocks, vocab 128.
# gguf_arch: general.architecture as convert_hf_to_gguf writes it (MistralForCausalLM → LlamaModel, arch llama)
ARCHS = {name: {"model_class": a["model_class"], "config_class": a["config_class"], "gguf_arch": gguf_arch,
                "config": a["config"]}
         for name, gguf_arch, a in (("llama", "llama", TINY.LLAMA), ("qwen2", "qwen2", TINY.QWEN2),
                                    ("mistral", "llama", TINY.MISTRAL), ("qwen3", "qwen3", TINY.QWEN3))}
# head_dim 32 with hidden 64 and 4 heads: q_proj has 128 rows, not hidden_size (as Mistral-Nemo 32·128 ≠ 5120 and
# Qwen3-0.6B 16·128 ≠ 1024); the base folder is _base/<key>, its config.json says model_type mistral / qwen3
for _name, _mt in (("mistral_hd32", "mistral"), ("qwen3_hd32", "qwen3")):
    ARCHS[_name] = dict(ARCHS[_mt], model_type=_mt, config=dict(ARCHS[_mt]["config"], head_dim=32))

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _case(arch, lora, *, outtype="f32", expect="ok", note="", lora_std=LORA_STD):
    # the bases the cases use (once per arch), then the cases
    return {"stages": [("base", "llamacpp"), ("generate", "llamacpp")], "arch": arch, "lora": lora,
            "outtype": outtype, "expect": expect, "note": note, "lora_std": lora_std}


PATTERNS = {"r": 8, "lora_alpha": 16, "target_modules": ATTN + MLP,
            "rank_pattern": {"k_proj": 4, "down_proj": 2}, "alpha_pattern": {"v_proj": 32, "up_proj": 4}}

# case ids are <env>/<name>: the folders golden/gguf/llamacpp/<name>
CASES = {f"llamacpp/{name}": case for name, case in {
    "llama_plain": _case("llama", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "llama_rslora": _case("llama", {"r": 8, "lora_alpha": 16, "target_modules": ATTN, "use_rslora": True},
                          note="convert_lora_to_gguf writes alpha=16: runtime applies a/r, PEFT a/sqrt(r)"),
    "llama_patterns": _case("llama", PATTERNS, note="alpha_pattern is lost (one global alpha)"),
    # the same two with factors ~N(0, 0.05²): LoRA effects ~1, the size of ecosystem.md §15's runs
    "llama_rslora_small": _case("llama", {"r": 8, "lora_alpha": 16, "target_modules": ATTN, "use_rslora": True},
                                lora_std=0.05),
    "llama_patterns_small": _case("llama", PATTERNS, lora_std=0.05),
    "llama_all_linear": _case("llama", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    "llama_embed": _case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "llama_f16": _case("llama", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, outtype="f16"),
    "llama_dora": _case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
                        expect="refused"),
    "llama_lora_bias": _case("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                       "lora_bias": True}, expect="refused"),
    "qwen2_plain": _case("qwen2", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}),
    "qwen2_rslora": _case("qwen2", {"r": 8, "lora_alpha": 16, "target_modules": ATTN, "use_rslora": True}),
    "qwen2_patterns": _case("qwen2", PATTERNS),
    "qwen2_all_linear": _case("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    # issue 15: the archs the codec's ARCHS table had from convert_hf_to_gguf.py's code only. The tiny Mistral (no
    # sliding window) gets the tiny Llama's weights (same init order) and computes the same: its rows prove the
    # model_type mistral route (arch llama, q/k permuted with its config's heads), not other arithmetic
    **{f"{arch}_{name}": _case(arch, lora) for arch in ("mistral", "qwen3") for name, lora in (
        ("plain", {"r": 8, "lora_alpha": 16, "target_modules": ATTN + MLP}),
        ("rslora", {"r": 8, "lora_alpha": 16, "target_modules": ATTN, "use_rslora": True}),
        ("patterns", PATTERNS))},
    **{f"{arch}_hd32_plain": _case(f"{arch}_hd32", {"r": 8, "lora_alpha": 16, "target_modules": ATTN + MLP})
       for arch in ("mistral", "qwen3")},
}.items()}

# Acceptance (golden/harness.py accept): PEFT goldens converted by the CLI into a .gguf (OUT = <out>.gguf) and run
# in the real llama.cpp on the case's base GGUF; GGUFs (llama.cpp's converter's, and the hand-written exact ones)
# converted back into PEFT and loaded with PeftModel. ok: logits within the worker's tolerance of PEFT's.
def _to_gguf(case, outtype="f32", expect="ok", note=""):
    arch = CASES[case]["arch"]
    return {"case": case, "target": "gguf", "env": "llamacpp", "expect": expect, "outtype": outtype,
            **({"note": note} if note else {}),
            "args": ["convert", "{src}", "{out}.gguf", "--to", "gguf", "--json", "--base-model",
                     "{case}/../_base/" + arch] + (["--outtype", outtype] if outtype != "f32" else [])}


def _to_peft(case, source, note=""):
    arch = CASES[case]["arch"]
    return {"case": case, "source": source, "target": "peft", "env": "llamacpp", "expect": "ok",
            **({"note": note} if note else {}),
            "args": ["convert", "{src}", "{out}", "--to", "peft", "--json", "--base-model", "{case}/../_base/" + arch]}


ACCEPTANCE = [
    *(_to_gguf(f"llamacpp/{n}") for n in ("llama_plain", "llama_rslora", "llama_rslora_small", "llama_patterns",
                                          "llama_patterns_small", "llama_all_linear", "llama_embed", "qwen2_plain",
                                          "qwen2_rslora", "qwen2_patterns", "qwen2_all_linear")),
    _to_gguf("llamacpp/llama_plain", "f16"),
    _to_gguf("llamacpp/llama_plain", "bf16"),
    _to_gguf("llamacpp/llama_all_linear", "q8_0", note="lora_a Q8_0, lora_b F16 (ne[0] = r = 4 is not a multiple "
                                                       "of 32)"),
    _to_gguf("llamacpp/qwen2_all_linear", "q8_0"),
    _to_gguf("llamacpp/llama_dora", expect="refused"),
    _to_gguf("llamacpp/llama_lora_bias", expect="refused"),
    _to_peft("llamacpp/llama_rslora", "handwritten-f32.gguf", note="alpha = 16·√8, q/k rows un-permuted"),
    _to_peft("llamacpp/llama_patterns", "handwritten-f32.gguf", note="alpha = 0, scales folded into B"),
    _to_peft("llamacpp/qwen2_patterns", "handwritten-f32.gguf"),
    _to_peft("llamacpp/llama_all_linear", "llamacpp-f32.gguf", note="convert_lora_to_gguf's own file"),
    _to_peft("llamacpp/llama_embed", "llamacpp-f32.gguf", note="token_embd lora_a transposed back"),
    *(_to_gguf(f"llamacpp/{a}_{n}") for a in ("mistral", "qwen3") for n in ("plain", "rslora", "patterns")),
    _to_peft("llamacpp/mistral_plain", "llamacpp-f32.gguf", note="general.architecture llama, q/k rows un-permuted "
                                                                 "with the Mistral base's heads"),
    *(_to_peft(f"llamacpp/{a}_{n}", "handwritten-f32.gguf") for a in ("mistral", "qwen3")
      for n in ("rslora", "patterns")),
    _to_peft("llamacpp/qwen3_plain", "llamacpp-f32.gguf"),
    *(_to_gguf(f"llamacpp/{a}_hd32_plain") for a in ("mistral", "qwen3")),
    *(_to_peft(f"llamacpp/{a}_hd32_plain", "llamacpp-f32.gguf") for a in ("mistral", "qwen3")),
]
# tests/tolerance.py's model for float32 logits (the worker runs without lora_migrate): 192·u·max|ref| + 4·noise
ULPS, NOISE_FACTOR = 192, 4
# lora_migrate.schemas.gguf.Q8_0_ERROR: ‖x̂ − x‖_F ≤ √32·(1/254 + 2⁻¹¹)·‖x‖_F per q8_0 factor
Q8_0_ERROR = 32 ** 0.5 * (1 / 254 + 2.0 ** -11)

# "matches PEFT" when max |logit diff| <= REL_TOL[GGUF tensor dtype] * max |PEFT logit| (f32: ~80 ulps of the
# largest logit; f16/bf16/q8_0: the factors' own rounding, 2^-11 / 2^-8 / ~2^-8 relative, through 2 blocks)
REL_TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 1.5e-2}
