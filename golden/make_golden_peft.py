#!/usr/bin/env python3
"""Golden checkpoints for lora-migrate, written by the REAL peft (three releases).

Run with the system python3 (this file is stdlib-only at top level; everything that needs torch runs
inside the per-library virtual envs as ``<venv>/bin/python make_golden_peft.py _worker ...``)::

    python3 golden/make_golden_peft.py envs      # create/refresh golden/.venvs/{pf21,pf152,pf013} (idempotent);
                                                 # ad13/ad101 (AdapterHub targets of `accept`) via make_golden.py
    python3 golden/make_golden_peft.py generate  # (re)write every case, checks_peft.json, FINDINGS_PEFT.md
    python3 golden/make_golden_peft.py generate --case pf21/conv   # only these cases; merged into checks_peft.json
    python3 golden/make_golden_peft.py accept [--converter "CMD PREFIX"] [--out FILE]
                                                 # convert goldens with lora-migrate, load them with the real libs
    python3 golden/make_golden_peft.py all       # envs + generate + accept

Envs (torch==2.13.0 CPU wheel is installed FIRST in each, and is a constraint for everything after it):

    pf21   peft==0.21.2 + transformers==4.57.6   (current)
    pf152  peft==0.15.2 + transformers==4.51.3   (last release whose merge adds lora_B.bias unscaled, #2486)
    pf013  peft==0.13.2 + transformers==4.46.3   (TypeError on unknown adapter_config fields; one combined
                                                  rank/alpha pattern list, #2195)

What ``generate`` writes (cases under golden/peft/, one level below make_golden.py's, so that
tests/test_golden.py's glob over the AdapterHub goldens does not see them):

    peft/<env>/_base/<arch>/{model.safetensors,config.json,arch.json}   base weights, once per env and architecture
    peft/<env>/<case>/adapter/     exactly what ``PeftModel.save_pretrained(dir)`` wrote (non-default adapters in
                                   adapter/<name>/, as peft does)
    peft/<env>/<case>/input.json   token ids
    peft/<env>/<case>/logits.safetensors  ``logits`` (adapter active, unmerged, fp32), ``base_logits`` (no adapter),
                                   ``logits_merged`` (after ``merge_and_unload``, where allowed); multi-adapter case:
                                   ``logits_<name>`` per adapter instead of ``logits``
    peft/<env>/<case>/meta.json    versions, LoraConfig kwargs, measured facts; ``base`` is the path of the base
                                   folder relative to the case folder
    PiSSA/OLoRA cases also:  pissa_init/ (the untouched initial adapter), converted_by_peft/ (save_pretrained with
                             path_initial_model_for_weight_conversion: rank 2r, relative to the ORIGINAL base),
                             residual_base/ (the base after init mutated it; ``logits`` = adapter/ on it)
    merged cases also:       merged/, merged_sharded/ (``merge_and_unload().save_pretrained``; the sharded one
                             with a small max_shard_size, so it has model.safetensors.index.json)
    checks_peft.json, FINDINGS_PEFT.md   (in golden/) every measured fact (FINDINGS_PEFT.md is generated; do not edit by hand)
    peft/<env>/pip-freeze.txt      the exact package set the cases were made with

Rebuilding a base: ``Cls(Cls.config_class(**config.json))`` with ``Cls`` = transformers.<arch.json model_class>,
then ``load_state_dict(load_file(model.safetensors), strict=False)``; ``generate`` checks this in every env. The
conv cases' base (model_class TinyConvNet, not from transformers) is ``conv_model_class()(**config.json)``, its
input.json holds ``pixel_values``.

Every adapter tensor is overwritten with seeded noise after ``get_peft_model`` (peft starts with B = 0, or
embedding A = 0, which would test nothing): lora_A/B/bias/embedding ~ N(0, 0.2²); DoRA magnitude m ← m·(1 +
N(0, 0.2²)); modules_to_save copies ← copy + N(0, 0.2²); PiSSA/OLoRA A, B ← A, B + N(0, 0.1²) ("training").
``generate`` twice gives byte-identical files (except the date in checks_peft.json / FINDINGS_PEFT.md).

``accept`` runs the converter on every row of ACCEPTANCE (and FIX_MERGED) and loads the outputs with the
real libraries' public API; it writes golden/acceptance_peft.json with one status per row: ``ok``,
``failed``, or ``pending`` (converter missing, or it said the feature/target/option is not there yet).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the host-side basics shared with the AdapterHub goldens (make_golden.py is stdlib-only at top level too)
from make_golden import (DEFAULT_CONVERTER, GOLDEN, MODEL_SEED, TOL, _fmt, _maxdiff,  # noqa: E402
                         build_envs, env_python, imports_ok)
from make_golden import run_private, serve_worker  # noqa: E402
from make_golden import run_worker as _run_worker  # noqa: E402

# cases live one level down, in golden/peft/<env>/<case>, so tests/test_golden.py's glob("*/*/meta.json") over the
# AdapterHub goldens does not pick them up
PEFT_GOLDEN = GOLDEN / "peft"

# --------------------------------------------------------------------------------------------------
# Environments: exact install recipes.
# --------------------------------------------------------------------------------------------------
ENVS = {
    "pf21": {"library": "peft", "library_version": "0.21.2",
             "deps": ["peft==0.21.2", "transformers==4.57.6", "safetensors"]},
    "pf152": {"library": "peft", "library_version": "0.15.2",
              "deps": ["peft==0.15.2", "transformers==4.51.3", "safetensors"]},
    "pf013": {"library": "peft", "library_version": "0.13.2",
              "deps": ["peft==0.13.2", "transformers==4.46.3", "safetensors"]},
}
# AdapterHub envs made by make_golden.py (used by `accept` for the adapters-* targets)
ADAPTERHUB_ENVS = ("ad13", "ad101")

# --------------------------------------------------------------------------------------------------
# Models and inputs (the configs of tests/models.py).
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

def conv_model_class():
    """arch "conv", a tiny model that is not from transformers, for Conv LoRA (torch only, imported when called).

    conv1 (nn.Conv2d 3→8, 3×3, stride 2, padding 1) → conv2 (nn.Conv2d 8→8, 3×3, padding 1) → conv3d (nn.Conv3d
    8→8, kernel (1, 3, 3), padding (0, 1, 1), on the map with a depth of 1) → conv1d (nn.Conv1d 8→8, kernel 3,
    stride 2, padding 1, over the flattened 4×4 map) → mean → head (nn.Linear 8→num_labels), ReLU in between. All
    groups=1, dilation 1. ``forward(pixel_values)`` takes (N, in_channels, 8, 8) and returns an object with
    ``.logits``, as transformers models do. Rebuilt as ``cls(**config.json)``; tests/models.py imports it from
    here, so the tests and the goldens build the same module.
    """
    import types

    import torch
    from torch import nn

    class TinyConvNet(nn.Module):
        def __init__(self, in_channels: int = 3, channels: int = 8, num_labels: int = 5):
            super().__init__()
            self.kwargs = dict(in_channels=in_channels, channels=channels, num_labels=num_labels)
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
            self.conv3d = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))
            self.conv1d = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
            self.head = nn.Linear(channels, num_labels)

        def forward(self, pixel_values):
            h = torch.relu(self.conv1(pixel_values))
            h = torch.relu(self.conv2(h))
            h = torch.relu(self.conv3d(h.unsqueeze(2))).squeeze(2)
            h = torch.relu(self.conv1d(h.flatten(2)))
            return types.SimpleNamespace(logits=self.head(h.mean(-1)))

    return TinyConvNet


def conv_inputs() -> dict:
    """pixel_values (2, 3, 8, 8) for arch "conv": fixed values in [-1, 1], exact in JSON and in float32."""
    return {"pixel_values": [[[[((7 * n + 5 * c + 3 * i + j) % 17 - 8) / 8 for j in range(8)] for i in range(8)]
                              for c in range(3)] for n in range(2)]}
ADAPTER_SEED = 2000     # torch.Generator seed for adapter #i of a case is ADAPTER_SEED + i
LORA_STD = 0.2
TRAIN_STD = 0.1         # PiSSA/OLoRA "training" perturbation

# --------------------------------------------------------------------------------------------------
# Cases: arch, adapters [(name, LoraConfig kwargs)], options. All kwargs are passed to the env's LoraConfig.
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
    "pf21/llama_embed": dict(arch="llama", base_model=True, adapters=[("default", dict(CLM, target_modules=["embed_tokens", "q_proj"],
                                                                      r=8, lora_alpha=16))],
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
ACCEPTANCE = [
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
    # reverse direction: AdapterHub goldens of make_golden.py, loaded with PeftModel on their own base
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
# converter output that means "not built yet" rather than a wrong answer
PENDING_PATTERNS = [r"not supported yet", r"unknown convention", r"no such option", r"no such command",
                    r"not implemented"]






def case_dir(case: str) -> Path:
    """golden/peft/<env>/<case> for this script's cases, golden/<env>/<case> for make_golden.py's."""
    return (PEFT_GOLDEN if case in CASES else GOLDEN) / case


def adapter_names(case: str) -> list:
    return [n for n, _ in CASES[case]["adapters"]]


def ref_key(case: str, name: str) -> str:
    return "logits" if len(CASES[case]["adapters"]) == 1 else f"logits_{name}"


def case_inputs(case: str) -> dict:
    """input.json of a case: token ids, or pixel values for the conv model."""
    return conv_inputs() if CASES[case]["arch"] == "conv" else CASES[case].get("inputs", INPUTS)


# ==================================================================================================
# Host side: envs
# ==================================================================================================
def cmd_envs(args) -> None:
    build_envs(ENVS, args.only, _env_imports_ok)
    missing = [e for e in ADAPTERHUB_ENVS if not env_python(e).exists() and not (args.only and e not in args.only)]
    if missing:
        subprocess.run([sys.executable, str(GOLDEN / "make_golden.py"), "envs", "--only", *missing], check=True)


def _env_imports_ok(env: str) -> bool:
    return imports_ok(env, "import torch, transformers, peft; assert torch.__version__.startswith('2.13.0'); "
                           f"assert peft.__version__ == {ENVS[env]['library_version']!r}")


def run_worker(env: str, task: str, job: dict) -> dict:
    """Run ``task`` in ``env``'s venv with this script's worker (``make_golden.run_worker``)."""
    return _run_worker(env, task, job, Path(__file__))


# ==================================================================================================
# Host side: generate
# ==================================================================================================
def case_envs() -> list:
    return [e for e in ENVS if any(c.startswith(e + "/") for c in CASES)]


def cmd_generate(args) -> None:
    """Every case, or only ``--case`` ones: then nothing else under golden/peft/ is touched (the envs' folders are
    not wiped, pip-freeze.txt is only checked), and the new measurements are merged into checks_peft.json."""
    only = args.case or None
    unknown = sorted(set(only or ()) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    chosen = [c for c in CASES if only is None or c in only]
    for env in case_envs():
        cases = [c for c in chosen if c.startswith(env + "/")]
        if not cases:
            continue
        edir = PEFT_GOLDEN / env
        freeze = subprocess.run([str(env_python(env)), "-m", "pip", "freeze", "--all"], capture_output=True,
                                text=True, check=True).stdout
        if only is None:
            if edir.exists():
                shutil.rmtree(edir)
        else:
            if (edir / "pip-freeze.txt").read_text() != freeze:
                raise SystemExit(f"{env}: the env's packages differ from {edir / 'pip-freeze.txt'}; regenerate "
                                 "every case (without --case) so that all of them are made with the same set")
            for c in cases:
                shutil.rmtree(case_dir(c), ignore_errors=True)
        edir.mkdir(parents=True, exist_ok=True)
        print(f"[generate] {env}: writing {len(cases)} case(s)", flush=True)
        run_worker(env, "generate", {"cases": cases})
        (edir / "pip-freeze.txt").write_text(freeze)

    today = datetime.date.today().isoformat()
    if only is None:
        checks = {"date": today, "tolerance": TOL, "env_versions": {}, "base_rebuild": {}, "crossload": {},
                  "probes": {}}
    else:
        checks = json.loads((GOLDEN / "checks_peft.json").read_text())
        checks.setdefault("added", {}).update({c: today for c in chosen})
    for env in ENVS:
        print(f"[generate] {env}: base rebuild + cross-load checks + probes", flush=True)
        res = run_worker(env, "check", {"cases": chosen, "probes": [p for p in PROBES if p[1] == env and
                                                                    p[2] in chosen]})
        for k in ("base_rebuild", "crossload"):
            checks[k].setdefault(env, {}).update(res[k])
        checks["env_versions"][env] = res["versions"]
        checks["probes"].update(res["probes"])
    measured = {c: json.loads((case_dir(c) / "meta.json").read_text())["measured"] for c in chosen}
    checks["cases"] = {c: measured.get(c, checks.get("cases", {}).get(c)) for c in CASES
                       if c in measured or c in checks.get("cases", {})}
    (GOLDEN / "checks_peft.json").write_text(json.dumps(checks, indent=2, sort_keys=True) + "\n")
    write_findings(checks)
    total = sum(p.stat().st_size for e in case_envs() for p in (PEFT_GOLDEN / e).rglob("*") if p.is_file())
    print(f"[generate] done; golden/peft/ is {total / 1e6:.2f} MB")


def _cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r.get("error"):
        return "error: " + r["error"][:90].replace("|", "/").replace("\n", " ")
    return ("same" if r["ok"] else "DIFFERS") + f" ({_fmt(r['max_abs_diff'])})"


def write_findings(checks: dict) -> None:
    """FINDINGS_PEFT.md: generated from checks_peft.json, so every number in it was measured by ``generate``."""
    L = []
    a = L.append
    a("# Measured facts about peft (generated by `make_golden_peft.py generate`; do not edit)\n")
    a(f"Date: {checks['date']}. \"same\": max |Δlogit| <= {TOL:g}. Tiny random models (seed {MODEL_SEED}); adapter "
      f"tensors ~ N(0, {LORA_STD}²) (see make_golden_peft.py's docstring). fp32 on CPU.\n")
    if checks.get("added"):
        a("Added later with `generate --case` (the other cases untouched): " + ", ".join(
            f"{c} ({d})" for c, d in sorted(checks["added"].items())) + ".\n")
    a("| env | peft | transformers | torch |")
    a("|---|---|---|---|")
    for env in ENVS:  # in ENVS order (a checks_peft.json read back has its keys sorted)
        v = checks["env_versions"][env]
        a(f"| {env} | {v['peft']} | {v['transformers']} | {v['torch']} |")
    a("")

    a("## 1. Effective scale per module, measured inside the forward pass\n")
    a("A forward hook on every LoRA layer captured x and y with only that adapter active (unmerged); with y0 = "
      "base_layer(x) and d = lora_B(lora_A(x)) (embedding: emb(x, Aᵀ)·Bᵀ), s = <y−y0, d>/<d, d>. `scaling` is "
      "the layer's own `scaling[adapter]`. Modules with the same (r, alpha, scaling, measured s) are grouped.\n")
    a("| case | adapter | modules | r | lora_alpha | scaling attr | measured s | max residual |")
    a("|---|---|---|---|---|---|---|---|")
    for case, m in checks["cases"].items():
        for name, mods in m.get("modules", {}).items():
            groups: dict = {}
            for mod, info in mods.items():
                key = (info["r"], info["alpha"], info["scaling"], info.get("measured_scale"))
                groups.setdefault(key, []).append(mod)
            for (r, al, sc, ms), names in groups.items():
                resid = max(mods[n].get("residual") or 0.0 for n in names)
                short = sorted({".".join(n.split(".")[-3:]) for n in names})
                label = ", ".join(short) if len(short) <= 3 else f"{len(names)} modules"
                a(f"| {case} | {name} | {label} | {r} | {_fmt(al)} | {_fmt(sc)} | {_fmt(ms)} | {_fmt(resid)} |")
    a("")

    a("## 2. merge_and_unload vs unmerged, in the producing peft\n")
    a("| case | max abs diff merged vs unmerged | note |")
    a("|---|---|---|")
    for case, m in checks["cases"].items():
        mg = m.get("merged_vs_unmerged")
        if mg is not None:
            a(f"| {case} | {_fmt(mg.get('max_abs_diff'))} | {mg.get('error', '')} |")
    a("")
    for case, m in checks["cases"].items():
        bb = m.get("merged_bias")
        if bb:
            a(f"**Bias merge in `{case}`** (peft {checks['cases'][case]['peft_version']}, s = {_fmt(bb['scale'])}): "
              f"over {bb['layers']} layers, max |b_merged − (b + l)| = {_fmt(bb['max_abs_vs_b_plus_l'])}, "
              f"max |b_merged − (b + s·l)| = {_fmt(bb['max_abs_vs_b_plus_s_l'])}, max |(1−s)·l| = "
              f"{_fmt(bb['max_abs_one_minus_s_l'])}, and b_merged − (b + s·l) equals (1−s)·l to "
              f"{_fmt(bb['max_abs_err_vs_one_minus_s_l'])}. The merged model's logits differ from the unmerged ones "
              f"by {_fmt(m['merged_vs_unmerged']['max_abs_diff'])}.\n")

    a("## 3. Loading each saved adapter with PeftModel.from_pretrained in each peft\n")
    a("The case's base rebuilt in that env, `PeftModel.from_pretrained(base, <case>/adapter)` (plus "
      "`load_adapter(adapter/<name>, name)` for other adapters), each adapter alone active, compared with the "
      "golden logits of the producing env. PiSSA/OLoRA: on the ORIGINAL base (peft re-runs the init).\n")
    envs = list(ENVS)
    a("| case | adapter | " + " | ".join(f"load in {e}" for e in envs) + " |")
    a("|---|---|" + "---|" * len(envs))
    for case in CASES:
        for name in adapter_names(case):
            key = f"{case}:{name}"
            a(f"| {case} | {name} | " + " | ".join(_cell(checks["crossload"][e].get(key)) for e in envs) + " |")
    a("")

    a("## 4. Probes: an edited adapter_config.json loaded in one env\n")
    a("| probe | env | result | warnings / error |")
    a("|---|---|---|---|")
    for pname, env, *_ in PROBES:
        r = checks["probes"].get(pname)
        warn = "; ".join(w[:160] for w in (r or {}).get("warnings", [])[:2]).replace("|", "/").replace("\n", " ")
        err = ((r or {}).get("error") or "").replace("|", "/").replace("\n", " ")
        a(f"| {pname} | {env} | {_cell(r) if not err else 'error'} | {err[:300] or warn} |")
    a("")

    a("## 5. PiSSA / OLoRA\n")
    for case, m in checks["cases"].items():
        p = m.get("init_conversion")
        if p:
            a(f"- `{case}`: initial adapter on residual_base vs original base logits: "
              f"{_fmt(p['init_on_residual_vs_base'])}; trained adapter/ on residual_base vs base: "
              f"{_fmt(p['trained_vs_base'])}; converted_by_peft/ (rank {p['converted_r']}, lora_alpha "
              f"{_fmt(p['converted_alpha'])}) on the ORIGINAL base vs `logits`: {_fmt(p['converted_on_original'])}; "
              f"adapter/ as written loaded on the original base (peft re-runs the init): "
              f"{_fmt(p['adapter_on_original'])}; max |residual W − original W| over targeted layers: "
              f"{_fmt(p['max_abs_residual_minus_original'])}.")
    a("")

    a("## 6. Base rebuild check: `Cls(Config(**config.json))` + `load_state_dict(strict=False)`\n")
    a("Max |Δ| against the producing env's `base_logits`, per consuming env.\n")
    a("| base | " + " | ".join(envs) + " |")
    a("|---|" + "---|" * len(envs))
    first_use = [f"{c.split('/')[0]}/_base/{spec['arch']}" for c, spec in CASES.items()]
    for b in dict.fromkeys([*first_use, *(k for e in envs for k in checks["base_rebuild"][e])]):
        cells = []
        for e in envs:
            r = checks["base_rebuild"][e].get(b)
            cells.append("n/a" if r is None else ("error: " + r["error"][:60]) if r.get("error") else
                         _fmt(r["max_abs_diff"]) + (f" missing={r['missing_keys']}" if r["missing_keys"] else ""))
        a(f"| {b} | " + " | ".join(cells) + " |")
    a("")

    a("## 7. What save_pretrained wrote\n")
    a("| case | files (adapter/) | tensor keys (first adapter) | config fields |")
    a("|---|---|---|---|")
    for case, m in checks["cases"].items():
        s = m.get("saved", {})
        a(f"| {case} | {', '.join(s.get('files', []))} | {s.get('n_keys')} ({', '.join(s.get('key_suffixes', []))})"
          f" | {s.get('n_config_fields')} |")
    a("")
    (GOLDEN / "FINDINGS_PEFT.md").write_text("\n".join(L) + "\n")


# ==================================================================================================
# Host side: accept
# ==================================================================================================
def _case_meta(case: str) -> dict:
    return json.loads((case_dir(case) / "meta.json").read_text())


def _case_adapters(case: str) -> list:
    """Adapter names of any golden case (this script's or make_golden.py's)."""
    if case in CASES:
        return adapter_names(case)
    meta = _case_meta(case)
    return list(meta["adapters"]) if meta.get("layout") == "full" else [None]


def _ref_for(case: str, name) -> str:
    if case in CASES:
        return ref_key(case, name)
    return "logits" if name is None else f"logits_{name}"


def _pending(text: str) -> bool:
    return any(re.search(p, text, re.I) for p in PENDING_PATTERNS)


def _converter_ok(conv: list) -> bool:
    return bool(conv) and (Path(conv[0]).exists() or shutil.which(conv[0]) is not None)


def _run_converter(conv: list, argv: list) -> tuple:
    p = subprocess.run(conv + argv, capture_output=True, text=True, check=False)
    text = (p.stderr or "").strip() or (p.stdout or "").strip()
    msg = [ln for ln in text.splitlines() if ln.strip()]
    return p.returncode, msg


def cmd_accept(args) -> None:
    conv = shlex.split(args.converter)
    work = Path(tempfile.mkdtemp(prefix="golden-peft-accept-"))
    records, jobs = [], {}
    rows = [("convert", case, target, expect, note) for case, target, expect, *note in ACCEPTANCE] + \
           [("fix-merged", case, folder, env, []) for case, folder, env in FIX_MERGED]
    for i, (verb, case, tgt, extra, note) in enumerate(rows):
        cdir = case_dir(case)
        out = work / f"{i:02d}" / "out"
        out.parent.mkdir(parents=True)
        rel = cdir.relative_to(GOLDEN.parent)
        if verb == "convert":
            target, expect, env = tgt, extra, TARGET_ENV[tgt]
            argv = ["convert", str(cdir / "adapter"), str(out), "--to", target, "--json"]
            shown = f"convert {rel}/adapter <tmp>/out --to {target} --json"
            if CASES.get(case, {}).get("base_model"):  # the base config.json (scaled embeddings' factor)
                argv += ["--base-model", str((cdir / _case_meta(case)["base"]).resolve())]
                shown += f" --base-model {rel}/{_case_meta(case)['base']}"
            if (cdir / "pissa_init").exists():
                argv += ["--initial-adapter", str(cdir / "pissa_init")]
                shown += f" --initial-adapter {rel}/pissa_init"
        else:
            target, expect, env = "fix-merged", "ok", extra
            argv = ["fix-merged", str(cdir / tgt), str(out), "--adapter", str(cdir / "adapter"),
                    "--merged-with", "peft-0.15"]
            shown = f"fix-merged {rel}/{tgt} <tmp>/out --adapter {rel}/adapter --merged-with peft-0.15"
        rec = {"case": case, "source": tgt if verb == "fix-merged" else "adapter", "target": target, "env": env,
               "expect": expect, "command": " ".join([args.converter, shown]), "exit_code": None,
               "message": None, "max_abs_diff": None, "status": "pending"}
        if note:
            rec["note"] = note[0]
        records.append(rec)
        if not _converter_ok(conv):
            rec["message"] = f"converter {args.converter!r} not found"
            continue
        code, msg = _run_converter(conv, argv)
        rec["exit_code"] = code
        if code != 0:
            rec["message"] = msg[0] if msg else ""
            rec["message_lines"] = len(msg)
            if len(msg) > 1:
                rec["output"] = "\n".join(msg)[:1500]
            if _pending(" ".join(msg)):
                rec["status"] = "pending"
            elif expect == "refused":  # a clean refusal: exit 2, one line, not a crash
                clean = code == 2 and len(msg) == 1 and not re.search(r"internal error|traceback", msg[0], re.I)
                rec["status"] = "ok" if clean else "failed"
            else:
                rec["status"] = "failed"
            continue
        if expect == "refused":
            rec["status"], rec["message"] = "failed", "converter accepted a case it must refuse"
            continue
        kind = "hf" if verb == "fix-merged" else ("adapters" if env in ADAPTERHUB_ENVS else "peft")
        base = (cdir / _case_meta(case)["base"]).resolve()
        items = [{"kind": kind, "out": str(out), "name": name, "base": str(base), "case_dir": str(cdir),
                  "ref": "logits" if verb == "fix-merged" else _ref_for(case, name)}
                 for name in (["-"] if verb == "fix-merged" else _case_adapters(case))]
        rec["_items"] = items
        jobs.setdefault(env, []).append(rec)
    for env, recs in jobs.items():
        res = run_worker(env, "load_check", {"items": [it for r in recs for it in r["_items"]]})["items"]
        for r in recs:
            got, res = res[:len(r["_items"])], res[len(r["_items"]):]
            errs = [g["error"] for g in got if g.get("error")]
            diffs = [g["max_abs_diff"] for g in got if g.get("max_abs_diff") is not None]
            r["max_abs_diff"] = max(diffs) if diffs and not errs else None
            r["per_adapter"] = {str(it["name"]): g for it, g in zip(r["_items"], got)} if len(got) > 1 else None
            if errs:
                r["status"], r["message"] = "failed", errs[0][:500]
            else:
                r["status"] = "ok" if r["max_abs_diff"] <= TOL else "failed"
    for r in records:
        r.pop("_items", None)
        if r.get("per_adapter") is None:
            r.pop("per_adapter", None)
    summary = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "pending")}
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "converter": args.converter,
              "tolerance": TOL, "summary": summary, "records": records}
    out_path = Path(args.out) if args.out else GOLDEN / "acceptance_peft.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':30} {'source':14} {'target':12} {'env':6} {'expect':8} {'exit':>4} {'max|Δ|':>9}  status")
    for r in records:
        print(f"{r['case']:30} {r['source']:14} {r['target']:12} {r['env']:6} {r['expect']:8} "
              f"{_fmt(r['exit_code']):>4} {_fmt(r['max_abs_diff']):>9}  {r['status']}"
              + (f"  ({r['message'][:100]})" if r.get("message") else ""))
    print(f"{summary} -> {out_path}")


def cmd_fake_converter(argv) -> int:
    """A stand-in converter to test ``accept``'s plumbing: copies PEFT sources for peft targets, refuses DoRA,
    and says "not supported yet" for everything else."""
    p = argparse.ArgumentParser(prog="fake-converter")
    p.add_argument("verb")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to")
    p.add_argument("--json", action="store_true")
    p.add_argument("--initial-adapter")
    p.add_argument("--adapter")
    p.add_argument("--merged-with")
    a = p.parse_args(argv)
    src = Path(a.src)
    if "dora" in str(src):
        print("error: DoRA cannot be expressed as plain LoRA (fake)", file=sys.stderr)
        return 2
    if a.verb == "convert" and a.to == "peft" and (src / "adapter_config.json").exists() and not a.initial_adapter:
        shutil.copytree(src, a.out)
        print(json.dumps({"ok": True, "to": a.to}))
        return 0
    print(f"error: {a.verb} --to {a.to} is not supported yet (fake)", file=sys.stderr)
    return 2


# ==================================================================================================
# Worker side (runs inside a venv; may import torch/transformers/peft)
# ==================================================================================================
class _Capture:
    """Collects warnings.warn and logging warnings (peft reports dropped config keys either way)."""

    def __enter__(self):
        import logging
        import warnings
        self.records = []
        self._w = warnings.catch_warnings(record=True)
        self._wl = self._w.__enter__()
        warnings.simplefilter("always")
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                outer.records.append(record.getMessage())

        self.h = H(level=logging.WARNING)
        self.loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
        self.saved = [(lg.level, lg.propagate) for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.WARNING)
            lg.propagate = False
            lg.addHandler(self.h)
        return self

    def __exit__(self, *exc):
        for lg, (lvl, prop) in zip(self.loggers, self.saved):
            lg.removeHandler(self.h)
            lg.setLevel(lvl)
            lg.propagate = prop
        self._w.__exit__(*exc)
        self.records += [str(w.message) for w in self._wl]

    def messages(self) -> list:
        keep = ("unexpected", "missing", "ignored", "upgrade", "pissa", "olora", "found", "not", "keyword")
        return list(dict.fromkeys(m.strip()[:400] for m in self.records if any(k in m.lower() for k in keep)))


class W:
    """Worker context: torch/transformers, model building and forward, shared by all tasks."""

    def __init__(self, env: str):
        import torch
        import transformers
        self.env = env
        self.torch = torch
        self.tf = transformers
        try:
            import peft
            self.peft = peft
        except ImportError:
            self.peft = None

    def versions(self) -> dict:
        return {"peft": getattr(self.peft, "__version__", None), "transformers": self.tf.__version__,
                "torch": self.torch.__version__}

    def build(self, model_class: str, config: dict):
        self.torch.manual_seed(MODEL_SEED)
        if model_class == "TinyConvNet":
            return conv_model_class()(**config).eval()
        cls = getattr(self.tf, model_class)
        model = cls(cls.config_class(**config))
        return model.eval()

    def rebuild_base(self, base_dir: Path):
        """The consumer recipe: Cls(Cls.config_class(**config.json)) + load_state_dict(strict=False)."""
        from safetensors.torch import load_file
        config = json.loads((base_dir / "config.json").read_text())
        model_class = json.loads((base_dir / "arch.json").read_text())["model_class"]
        model = self.build(model_class, config)
        res = model.load_state_dict(load_file(str(base_dir / "model.safetensors")), strict=False)
        return model.eval(), sorted(res.missing_keys), sorted(res.unexpected_keys)

    def logits(self, model, inputs: dict):
        torch = self.torch
        kw = {k: torch.tensor(v) for k, v in inputs.items()}  # ints → int64 (token ids), floats → float32
        with torch.no_grad():
            out = model(**kw)
        return out.logits.detach().float().clone()

    def save_base(self, model, sd: dict, arch_name: str, base_dir: Path) -> None:
        from safetensors.torch import save_file
        base_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(base_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict() if hasattr(model, "config") else model.kwargs  # the conv model: its kwargs
        (base_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (base_dir / "arch.json").write_text(json.dumps(
            {"arch": arch_name, "model_class": type(model).__name__,
             "config_class": type(model.config).__name__ if hasattr(model, "config") else None, "seed": MODEL_SEED, **self.versions()},
            indent=2, sort_keys=True) + "\n")




def _randomize(w: W, model, name: str, seed: int, train: bool) -> list:
    """Overwrite every tensor of adapter ``name`` with seeded noise (see the module docstring)."""
    torch = w.torch
    g = torch.Generator().manual_seed(seed)
    touched = []
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            parts = pname.split(".")
            if name not in parts:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_magnitude_vector" in parts:
                p.mul_(1 + LORA_STD * noise)
            elif "modules_to_save" in parts or train:
                p.add_((TRAIN_STD if train else LORA_STD) * noise)
            elif any(x.startswith("lora_") for x in parts):
                p.copy_(LORA_STD * noise)
            else:
                continue
            touched.append(pname)
    if not touched:
        raise RuntimeError(f"no parameters found for adapter {name}")
    return touched


def _measure_modules(w: W, peft_model, name: str, inputs: dict) -> dict:
    """Per LoRA layer of adapter ``name`` (active): r, alpha, the layer's ``scaling`` and the scale measured
    in the forward pass (module docstring of FINDINGS section 1). DoRA layers get no measured scale."""
    torch = w.torch
    F = torch.nn.functional
    captured, hooks, out = [], [], {}
    for mname, mod in peft_model.named_modules():
        if not isinstance(getattr(mod, "scaling", None), dict) or name not in mod.scaling:
            continue
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, mname=mname: captured.append((mname, m, i[0].detach(), o.detach()))))
    try:
        w.logits(peft_model, inputs)
    finally:
        for h in hooks:
            h.remove()
    for mname, mod, x, y in captured:
        key = mname.replace("base_model.model.", "", 1)
        info = {"r": int(mod.r[name]), "alpha": float(mod.lora_alpha[name]), "scaling": float(mod.scaling[name]),
                "layer": type(mod).__name__, "measured_scale": None, "residual": None}
        with torch.no_grad():
            if getattr(mod, "use_dora", {}).get(name, False):
                info["dora"] = True
            else:
                y0 = mod.base_layer(x)
                if name in getattr(mod, "lora_embedding_A", {}):
                    d = F.embedding(x, mod.lora_embedding_A[name].T) @ mod.lora_embedding_B[name].T
                else:
                    d = mod.lora_B[name](mod.lora_A[name](x))
                diff = y - y0
                s = ((diff * d).sum() / (d * d).sum()).item()
                info["measured_scale"] = round(s, 5)
                info["residual"] = ((diff - s * d).norm() / diff.norm()).item()
        out[key] = info
    return out


def _saved_facts(adir: Path) -> dict:
    from safetensors import safe_open
    files = sorted(p.name for p in adir.iterdir())
    with safe_open(str(adir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    suffixes = sorted({".".join(k.split(".")[-2:]) if k.endswith((".weight", ".bias")) else k.split(".")[-1]
                       for k in keys})
    cfg = json.loads((adir / "adapter_config.json").read_text())
    return {"files": files, "n_keys": len(keys), "key_suffixes": suffixes, "n_config_fields": len(cfg)}


def _base_state(peft_model) -> dict:
    """The base weights as they are now inside a PeftModel (after PiSSA/OLoRA mutated them)."""
    sd = {}
    for k, v in peft_model.base_model.model.state_dict().items():
        if "lora_" in k or "modules_to_save" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v
    return sd


def w_generate(w: W, job: dict) -> dict:
    torch, peft = w.torch, w.peft
    for case in job["cases"]:
        spec = CASES[case]
        env = case.split("/")[0]
        arch = ARCHS[spec["arch"]]
        cdir = case_dir(case)
        cdir.mkdir(parents=True, exist_ok=True)
        model = w.build(arch["model_class"], arch["config"])
        base_dir = PEFT_GOLDEN / env / "_base" / spec["arch"]
        if not base_dir.exists():
            w.save_base(model, model.state_dict(), spec["arch"], base_dir)
        else:  # shared base: must be bit-identical to what this case built
            from safetensors.torch import load_file
            saved = load_file(str(base_dir / "model.safetensors"))
            for k, v in model.state_dict().items():
                if not torch.equal(saved[k], v):
                    raise RuntimeError(f"{case}: base differs from shared {base_dir} at {k}")
        inputs = case_inputs(case)
        (cdir / "input.json").write_text(json.dumps(inputs) + "\n")
        base_logits = w.logits(model, inputs)
        orig_sd = {k: v.clone() for k, v in model.state_dict().items()}
        measured, setup = {"peft_version": peft.__version__}, {}
        tensors = {"base_logits": base_logits}

        (first, kw0), *rest = spec["adapters"]
        pm = peft.get_peft_model(model, peft.LoraConfig(**kw0))
        for name, kw in rest:
            pm.add_adapter(name, peft.LoraConfig(**kw))
        pm.eval()
        init = spec.get("init")
        if init:
            measured["init_conversion"] = {"init_on_residual_vs_base": _maxdiff(w.logits(pm, inputs), base_logits)}
            pm.peft_config[first].init_lora_weights = True   # as peft's PiSSA example does before this save
            pm.save_pretrained(str(cdir / "pissa_init"))
            pm.peft_config[first].init_lora_weights = init
        for i, (name, kw) in enumerate(spec["adapters"]):
            touched = _randomize(w, pm, name, ADAPTER_SEED + i, train=bool(init))
            setup[name] = {"config_kwargs": kw, "seed": ADAPTER_SEED + i, "randomized_parameters": len(touched)}
        measured["modules"] = {}
        for name in adapter_names(case):
            pm.set_adapter(name)
            lg = w.logits(pm, inputs)
            tensors[ref_key(case, name)] = lg
            measured.setdefault("adapter_vs_base_max_abs_diff", {})[name] = _maxdiff(lg, base_logits)
            measured["modules"][name] = _measure_modules(w, pm, name, inputs)
        pm.set_adapter(first)
        pm.save_pretrained(str(cdir / "adapter"))
        measured["saved"] = _saved_facts(cdir / "adapter")
        if init:
            res_dir = cdir / "residual_base"
            w.save_base(pm.base_model.model, _base_state(pm), spec["arch"] + "_residual", res_dir)
            (res_dir / "arch.json").write_text(json.dumps(
                {**json.loads((res_dir / "arch.json").read_text()), "model_class": arch["model_class"]},
                indent=2, sort_keys=True) + "\n")
            pm.save_pretrained(str(cdir / "converted_by_peft"),
                               path_initial_model_for_weight_conversion=str(cdir / "pissa_init"))
            ic = measured["init_conversion"]
            ic["trained_vs_base"] = measured["adapter_vs_base_max_abs_diff"][first]
            ccfg = json.loads((cdir / "converted_by_peft" / "adapter_config.json").read_text())
            ic["converted_r"], ic["converted_alpha"] = ccfg["r"], ccfg["lora_alpha"]
            res_sd = _base_state(pm)
            ic["max_abs_residual_minus_original"] = max(
                _maxdiff(res_sd[k], orig_sd[k]) for k in orig_sd if any(t in k for t in kw0["target_modules"]))
            for label, adir in (("converted_on_original", "converted_by_peft"), ("adapter_on_original", "adapter")):
                fresh = w.build(arch["model_class"], arch["config"])
                fresh.load_state_dict(orig_sd)
                lm = peft.PeftModel.from_pretrained(fresh, str(cdir / adir)).eval()
                ic[label] = _maxdiff(w.logits(lm, inputs), tensors["logits"])
        if spec.get("merge") or len(spec["adapters"]) == 1:
            try:
                merged = pm.merge_and_unload()
                lm = w.logits(merged, inputs)
                tensors["logits_merged"] = lm
                measured["merged_vs_unmerged"] = {"max_abs_diff": _maxdiff(lm, tensors["logits"])}
                if spec.get("save_merged"):
                    merged.save_pretrained(str(cdir / "merged"))
                    merged.save_pretrained(str(cdir / "merged_sharded"), max_shard_size="40KB")
                    measured["merged_bias"] = _bias_facts(w, merged, cdir, orig_sd)
            except Exception as e:  # noqa: BLE001 - recorded
                measured["merged_vs_unmerged"] = {"max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:300]}
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(cdir / "logits.safetensors"),
                  metadata={"format": "pt"})
        meta = {"library": "peft", "library_version": peft.__version__, **w.versions(),
                "model_class": arch["model_class"], "arch": spec["arch"], "base": f"../_base/{spec['arch']}",
                "description": spec["description"], "adapters": adapter_names(case), "adapter_setup": setup,
                "logits_tensors": sorted(tensors), "model_seed": MODEL_SEED,
                "randomization": "see golden/make_golden_peft.py docstring", "measured": measured}
        if init:
            meta["residual_base"] = "residual_base"
            meta["initial_adapter"] = "pissa_init"
        (cdir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"  {case}: ok", flush=True)
    return {}


def _bias_facts(w: W, merged, cdir: Path, orig_sd: dict) -> dict:
    """Compare the merged biases with b + l and b + s·l (l = lora_B.bias from the saved adapter)."""
    from safetensors.torch import load_file
    ad = load_file(str(cdir / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((cdir / "adapter" / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    msd = merged.state_dict()
    r = {"scale": s, "layers": 0, "max_abs_vs_b_plus_l": 0.0, "max_abs_vs_b_plus_s_l": 0.0,
         "max_abs_one_minus_s_l": 0.0, "max_abs_err_vs_one_minus_s_l": 0.0}
    for k, lb in ad.items():
        if not k.endswith("lora_B.bias"):
            continue
        mod = k[len("base_model.model."):-len(".lora_B.bias")]
        b0, bm = orig_sd[mod + ".bias"], msd[mod + ".bias"]
        r["layers"] += 1
        r["max_abs_vs_b_plus_l"] = max(r["max_abs_vs_b_plus_l"], _maxdiff(bm, b0 + lb))
        r["max_abs_vs_b_plus_s_l"] = max(r["max_abs_vs_b_plus_s_l"], _maxdiff(bm, b0 + s * lb))
        r["max_abs_one_minus_s_l"] = max(r["max_abs_one_minus_s_l"], float(((1 - s) * lb).abs().max()))
        r["max_abs_err_vs_one_minus_s_l"] = max(r["max_abs_err_vs_one_minus_s_l"],
                                                _maxdiff(bm - (b0 + s * lb), (1 - s) * lb))
    return r


def _load_peft(w: W, base, adir: Path, names: list):
    """PeftModel.from_pretrained for the first adapter, load_adapter(adir/<name>) for the others."""
    first, *rest = names
    pm = w.peft.PeftModel.from_pretrained(base, str(adir), adapter_name=first)
    for n in rest:
        pm.load_adapter(str(adir / n), adapter_name=n)
    return pm.eval()


def w_check(w: W, job: dict) -> dict:
    from safetensors.torch import load_file
    res = {"versions": w.versions(), "base_rebuild": {}, "crossload": {}, "probes": {}}
    bases = {}
    for case in job["cases"]:
        cdir = case_dir(case)
        base_dir = (cdir / _case_meta(case)["base"]).resolve()
        key = str(base_dir.relative_to(PEFT_GOLDEN))
        refs = load_file(str(cdir / "logits.safetensors"))
        inputs = case_inputs(case)
        if key not in bases:
            try:
                model, missing, unexpected = w.rebuild_base(base_dir)
                bases[key] = w.logits(model, inputs)
                res["base_rebuild"][key] = {"max_abs_diff": 0.0, "missing_keys": missing,
                                            "unexpected_keys": unexpected, "cases": []}
            except Exception as e:  # noqa: BLE001
                res["base_rebuild"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                bases[key] = None
        if bases[key] is not None:
            rec = res["base_rebuild"][key]
            rec["max_abs_diff"] = max(rec["max_abs_diff"], _maxdiff(bases[key], refs["base_logits"]))
            rec["cases"].append(case)
        names = adapter_names(case)
        try:
            with _Capture() as cap:
                pm = _load_peft(w, w.rebuild_base(base_dir)[0], cdir / "adapter", names)
            for name in names:
                pm.set_adapter(name)
                d = _maxdiff(w.logits(pm, inputs), refs[ref_key(case, name)])
                res["crossload"][f"{case}:{name}"] = {"max_abs_diff": d, "ok": d <= TOL, "warnings": cap.messages()}
        except Exception as e:  # noqa: BLE001
            for name in names:
                res["crossload"][f"{case}:{name}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    for pname, _env, case, edit, base_key in job["probes"]:
        cdir = case_dir(case)
        inputs = case_inputs(case)
        meta = _case_meta(case)
        base_dir = (cdir / (meta["base"] if base_key == "base" else meta["residual_base"])).resolve()
        with tempfile.TemporaryDirectory() as td:
            adir = Path(td) / "adapter"
            shutil.copytree(cdir / "adapter", adir)
            cfg = json.loads((adir / "adapter_config.json").read_text())
            for k in edit.get("drop", []):
                cfg.pop(k, None)
            cfg.update(edit.get("set", {}))
            (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            try:
                with _Capture() as cap:
                    pm = _load_peft(w, w.rebuild_base(base_dir)[0], adir, ["default"])
                d = _maxdiff(w.logits(pm, inputs), load_file(str(cdir / "logits.safetensors"))["logits"])
                scal = sorted({round(float(m.scaling["default"]), 5) for m in pm.modules()
                               if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling})
                res["probes"][pname] = {"max_abs_diff": d, "ok": d <= TOL, "warnings": cap.messages(),
                                        "scalings_after_load": scal}
            except Exception as e:  # noqa: BLE001
                res["probes"][pname] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return res


def w_load_check(w: W, job: dict) -> dict:
    """Each item: load ``out`` (a converted adapter, or a repaired full model) and compare with the golden ref."""
    from safetensors.torch import load_file
    items = []
    for it in job["items"]:
        try:
            out, cdir, name = Path(it["out"]), Path(it["case_dir"]), it["name"]
            inputs = json.loads((cdir / "input.json").read_text())
            ref = load_file(str(cdir / "logits.safetensors"))[it["ref"]]
            if it["kind"] == "hf":
                model = w.tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
                extra = {}
            else:
                base, _, _ = w.rebuild_base(Path(it["base"]))
                adir = out
                if name not in (None, "default") and (out / name / "adapter_config.json").exists():
                    adir = out / name
                elif name is not None and not (out / "adapter_config.json").exists() \
                        and (out / name / "adapter_config.json").exists():
                    adir = out / name
                if it["kind"] == "peft":
                    model = w.peft.PeftModel.from_pretrained(base, str(adir)).eval()
                    extra = {"loaded_from": str(adir.relative_to(out))}
                else:
                    import adapters
                    adapters.init(base)
                    kw = {"use_safetensors": True} if (adir / "adapter.safetensors").exists() and \
                        not (adir / "pytorch_adapter.bin").exists() else {}
                    loaded = base.load_adapter(str(adir), **kw)
                    base.set_active_adapters(loaded)
                    model = base.eval()
                    extra = {"loaded_name": loaded, "load_kwargs": kw}
            d = _maxdiff(w.logits(model, inputs), ref)
            items.append({"max_abs_diff": d, **extra})
        except Exception as e:  # noqa: BLE001
            items.append({"max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:500]})
    return {"items": items}


def worker_main(argv) -> None:
    serve_worker(argv, W, {"generate": w_generate, "check": w_check, "load_check": w_load_check})


# ==================================================================================================
def main() -> None:
    if run_private(sys.argv, worker_main, cmd_fake_converter):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("envs", help="create/refresh the virtual envs (idempotent)")
    e.add_argument("--only", nargs="*", choices=list(ENVS) + list(ADAPTERHUB_ENVS))
    g = sub.add_parser("generate", help="write all golden cases (or --case ones), checks_peft.json, FINDINGS_PEFT.md")
    g.add_argument("--case", nargs="+", help="only these cases (e.g. pf21/conv); the others are left as they are")
    ac = sub.add_parser("accept", help="convert goldens with the converter and check them with the real libs")
    ac.add_argument("--converter", default=DEFAULT_CONVERTER, help="command prefix (default: %(default)s)")
    ac.add_argument("--out", help="where to write the JSON (default: golden/acceptance_peft.json)")
    al = sub.add_parser("all", help="envs + generate + accept")
    al.add_argument("--converter", default=DEFAULT_CONVERTER)
    al.add_argument("--out")
    args = ap.parse_args()
    if args.cmd in ("envs", "all"):
        args.only = getattr(args, "only", None)
        cmd_envs(args)
    if args.cmd in ("generate", "all"):
        args.case = getattr(args, "case", None)
        cmd_generate(args)
    if args.cmd in ("accept", "all"):
        cmd_accept(args)


if __name__ == "__main__":
    main()
