#!/usr/bin/env python3
"""Golden checkpoints for lora-migrate, written by the REAL AdapterHub libraries.

Run with the system python3 (this file is stdlib-only at top level; everything that needs torch runs
inside the per-library virtual envs as ``<venv>/bin/python make_golden.py _worker ...``)::

    python3 golden/make_golden.py envs       # create/refresh golden/.venvs/{at31,ad101,ad13} (idempotent)
    python3 golden/make_golden.py generate   # (re)write every case, the checks, FINDINGS.md
    python3 golden/make_golden.py accept [--converter "CMD PREFIX"] [--out FILE]
                                             # convert goldens with lora-migrate, check them in the old libs
    python3 golden/make_golden.py all        # envs + generate + accept (accept only if the converter exists)

Envs (torch==2.13.0 CPU wheel is installed FIRST in each, and is a constraint for everything after it):

    at31   adapter-transformers==3.1.0 (a fork of transformers 4.21.3, installed --no-deps; its pinned
           tokenizers<0.13 does not build on Python 3.11 and is not needed: token ids are given directly)
    ad101  adapters==1.0.1 + transformers==4.45.2
    ad13   adapters==1.3.0 (pins transformers~=4.57.6)

What ``generate`` writes (all under golden/):

    <env>/_base/<arch>/{model.safetensors,config.json,arch.json}   base weights, once per env and architecture
    <env>/<case>/adapter/         exactly what ``model.save_adapter(dir, name)`` wrote (default arguments)
    <env>/<case>/full/            (multi-adapter case only) ``model.save_pretrained(dir)``
    <env>/<case>/input.json       token ids
    <env>/<case>/logits.safetensors  ``logits`` (adapter active, unmerged, fp32), ``base_logits`` (no adapter),
                                  ``logits_merged`` (after ``merge_adapter``, when the library allows it);
                                  multi-adapter case: ``logits_m1``, ``logits_m2``, ``base_logits``
    <env>/<case>/meta.json        library/transformers/torch versions, adapter configs, measured facts; field
                                  ``base`` is the path of the base folder relative to the case folder
    checks.json                   every measured fact (base rebuild check, cross-loading, effective scales)
    FINDINGS.md                   the same facts, as prose and tables (generated; do not edit by hand)
    <env>/pip-freeze.txt          the exact package set the case was made with

Rebuilding a base (what a consumer must do):
``Cls(ConfigCls(**json.load(config.json)))`` then ``model.load_state_dict(load_file(model.safetensors),
strict=False)``; ``generate`` checks in every env that this reproduces ``base_logits``.

``accept`` runs ``<converter> convert <case>/adapter <tmp>/out --to <target> --json`` for each row of
ACCEPTANCE below, loads the output into the target library's env with ``model.load_adapter(out)``, and
compares the logits with the golden ones. It writes golden/acceptance.json.

Cases: see CASES below (at31: t5_qv, t5_ffn, t5_multi, t5_ia3, t5_gated, t5_odd_scale; ad101: t5_qv,
gpt2_mixed, llama_ffn; ad13: t5_qv, t5_qv_safetensors, gpt2_mixed, llama_ffn). Every run is deterministic:
``generate`` twice gives byte-identical files (except the date in checks.json / FINDINGS.md).

Workarounds needed: none for adapter-transformers 3.1.0 under torch 2.13 (imports, add_adapter, forward,
save_adapter, save_pretrained, load_adapter and merge_adapter all work; ``torch.load``'s
``weights_only=True`` default is harmless because adapter files are plain dicts of tensors). The at31 env
has no ``safetensors`` package, so safetensors files there are written by ``_write_safetensors`` below
(the format is an 8-byte little-endian header length, a JSON header, then raw little-endian bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent
VENVS = GOLDEN / ".venvs"
TORCH_PIN = "torch==2.13.0"
DEFAULT_CONVERTER = str(GOLDEN.parent / ".venv" / "bin" / "lora-migrate")  # this checkout's
TOL = 1e-5

# --------------------------------------------------------------------------------------------------
# Environments: exact install recipes.
# --------------------------------------------------------------------------------------------------
ENVS = {
    "at31": {
        "library": "adapter-transformers",
        "library_version": "3.1.0",
        # --no-deps: adapter-transformers pins tokenizers<0.13, which has no cp311 wheel and fails to build.
        "no_deps": ["adapter-transformers==3.1.0"],
        # its other runtime deps, by hand. huggingface-hub 0.16.4 still has every name transformers 4.21.3
        # imports; numpy<2 because 4.21.3 predates numpy 2.
        "deps": ["numpy==1.26.4", "filelock", "huggingface-hub==0.16.4", "packaging", "pyyaml", "regex",
                 "requests", "tqdm"],
    },
    "ad101": {
        "library": "adapters",
        "library_version": "1.0.1",
        "no_deps": [],
        "deps": ["adapters==1.0.1", "transformers==4.45.2", "safetensors"],
    },
    "ad13": {
        "library": "adapters",
        "library_version": "1.3.0",
        "no_deps": [],
        "deps": ["adapters==1.3.0", "safetensors"],
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
# Acceptance table: (case, target, expectation). expectation "match": logits must match (<= TOL);
# "refuse": the converter must exit non-zero.
# --------------------------------------------------------------------------------------------------
TARGET_ENV = {"adapters-1.0": "ad101", "adapter-transformers-3.1": "at31", "adapters-1.1": "ad13"}
ACCEPTANCE = [
    ("at31/t5_qv", "adapters-1.0", "match"),
    ("at31/t5_ffn", "adapters-1.0", "match"),
    ("at31/t5_multi", "adapters-1.0", "match"),
    ("at31/t5_ia3", "adapters-1.0", "match"),
    ("at31/t5_gated", "adapters-1.0", "refuse"),
    ("at31/t5_odd_scale", "adapters-1.0", "match"),
    ("ad13/gpt2_mixed", "adapters-1.0", "match"),
    ("ad13/llama_ffn", "adapters-1.0", "match"),
    ("ad13/t5_qv", "adapters-1.0", "match"),
    ("ad13/t5_qv_safetensors", "adapters-1.0", "match"),
    ("at31/t5_qv", "adapter-transformers-3.1", "match"),
    ("ad101/t5_qv", "adapter-transformers-3.1", "match"),
    ("ad101/t5_qv", "adapters-1.1", "match"),
    ("ad101/gpt2_mixed", "adapters-1.1", "match"),
    ("ad101/llama_ffn", "adapters-1.1", "match"),
]


def env_python(env: str) -> Path:
    return VENVS / env / "bin" / "python"


def env_subprocess_env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONHASHSEED="0",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    return e


def case_envs():
    return sorted({c.split("/")[0] for c in CASES}, key=list(ENVS).index)


def base_rel(case: str) -> str:
    return "../_base/" + CASES[case]["arch"]


# ==================================================================================================
# Host side: envs
# ==================================================================================================
def build_envs(envs: dict, only, imports_ok) -> None:
    """Create or refresh each env of ``envs`` (name → recipe with ``deps`` and optional ``no_deps``), idempotently:
    an env whose recorded recipe matches and whose ``imports_ok(env)`` passes is left alone. torch is installed
    FIRST from the local CPU wheel, and everything after it is constrained to it. Shared with make_golden_peft.py."""
    VENVS.mkdir(parents=True, exist_ok=True)
    gi = GOLDEN / ".gitignore"
    if not gi.exists() or ".venvs/" not in gi.read_text().split():
        gi.write_text(".venvs/\n")
    constraints = VENVS / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    for env, spec in envs.items():
        if only and env not in only:
            continue
        vdir = VENVS / env
        marker = vdir / ".golden-recipe.json"
        recipe = {"torch": TORCH_PIN, **spec}
        if marker.exists() and json.loads(marker.read_text()) == recipe and imports_ok(env):
            print(f"[envs] {env}: up to date")
            continue
        print(f"[envs] {env}: building", flush=True)
        if not env_python(env).exists():
            subprocess.run([sys.executable, "-m", "venv", str(vdir)], check=True)
        pip = [str(env_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run(pip + [TORCH_PIN], check=True)
        if spec.get("no_deps"):
            subprocess.run(pip + ["-c", str(constraints), "--no-deps"] + spec["no_deps"], check=True)
        subprocess.run(pip + ["-c", str(constraints)] + spec["deps"], check=True)
        if not imports_ok(env):
            raise SystemExit(f"[envs] {env}: import check failed")
        marker.write_text(json.dumps(recipe, indent=1))
        print(f"[envs] {env}: ok")


def imports_ok(env: str, code: str) -> bool:
    """``code`` runs without error in ``env``'s venv (which must exist)."""
    if not env_python(env).exists():
        return False
    r = subprocess.run([str(env_python(env)), "-c", code], env=env_subprocess_env(), capture_output=True, text=True,
                       check=False)
    if r.returncode:
        print(r.stderr[-2000:])
    return r.returncode == 0


def run_worker(env: str, task: str, job: dict, script: Path = Path(__file__)) -> dict:
    """Run ``script _worker task`` in ``env``'s venv; the job goes in, the result comes out, both as JSON files."""
    if not env_python(env).exists():
        raise SystemExit(f"env {env} missing: run `python3 {script.name} envs` first")
    with tempfile.TemporaryDirectory(prefix=f"{script.stem}-{env}-") as td:
        jpath, rpath = Path(td) / "job.json", Path(td) / "result.json"
        jpath.write_text(json.dumps(job))
        r = subprocess.run([str(env_python(env)), str(script.resolve()), "_worker", task, env,
                            str(jpath), str(rpath)], env=env_subprocess_env(), check=False)
        if r.returncode:
            raise SystemExit(f"worker {task} in {env} failed (exit {r.returncode})")
        return json.loads(rpath.read_text())


def serve_worker(argv: list[str], make_lib, tasks: dict, seed: int | None = None) -> None:
    """The worker's side of :func:`run_worker`, in the env's venv: ``argv`` is ``task env job.json result.json``;
    ``make_lib(env)`` gives the object the task functions take (with ``.torch``); one torch thread."""
    task, env, jpath, rpath = argv
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    lib = make_lib(env)
    lib.torch.set_num_threads(1)
    if seed is not None:
        lib.torch.manual_seed(seed)
    job = json.loads(Path(jpath).read_text())
    Path(rpath).write_text(json.dumps(tasks[task](lib, job)))


def run_private(argv: list[str], worker, fake_converter) -> bool:
    """The scripts' internal entry points: ``_worker`` (see :func:`run_worker`) and ``_fake_converter`` (tests of
    ``accept``). True when ``argv`` was one of them and it ran."""
    if len(argv) > 1 and argv[1] == "_worker":
        worker(argv[2:])
        return True
    if len(argv) > 1 and argv[1] == "_fake_converter":
        sys.exit(fake_converter(argv[2:]))
    return False


def cmd_envs(args) -> None:
    build_envs(ENVS, args.only, _env_imports_ok)


def _env_imports_ok(env: str) -> bool:
    return imports_ok(env, "import torch, transformers; " +
                      ("import transformers.adapters" if env == "at31" else "import adapters") +
                      "; assert torch.__version__.startswith('2.13.0')")


# ==================================================================================================
# Host side: generate
# ==================================================================================================
def cmd_generate(args) -> None:
    for env in ENVS:
        if not env_python(env).exists():
            raise SystemExit(f"env {env} missing: run `python3 {Path(__file__).name} envs` first")
    envs = case_envs()
    for env in envs:
        edir = GOLDEN / env
        if edir.exists():
            shutil.rmtree(edir)
        edir.mkdir(parents=True)
        print(f"[generate] {env}: writing cases", flush=True)
        run_worker(env, "generate", {"cases": [c for c in CASES if c.startswith(env + "/")]})
        freeze = subprocess.run([str(env_python(env)), "-m", "pip", "freeze", "--all"], capture_output=True,
                                text=True, check=True).stdout
        (edir / "pip-freeze.txt").write_text(freeze)

    adapter_cases = [c for c in CASES if not CASES[c].get("full")]
    checks = {"date": datetime.date.today().isoformat(), "tolerance": TOL, "base_rebuild": {}, "crossload": {}}
    for env in ENVS:
        print(f"[generate] {env}: base rebuild + cross-load checks", flush=True)
        res = run_worker(env, "check", {"cases": list(CASES), "adapter_cases": adapter_cases})
        checks["base_rebuild"][env] = res["base_rebuild"]
        checks["crossload"][env] = res["crossload"]
        checks.setdefault("env_versions", {})[env] = res["versions"]

    # measured facts gathered by the generate workers
    checks["cases"] = {c: json.loads((GOLDEN / c / "meta.json").read_text()).get("measured", {}) for c in CASES}

    # fold the cross-load result "same case from ad101 loaded into adapters 1.3.0" into the ad13 metas
    for case, spec in CASES.items():
        src = spec.get("same_as")
        if not src:
            continue
        meta_p = GOLDEN / case / "meta.json"
        meta = json.loads(meta_p.read_text())
        rec = checks["crossload"]["ad13"].get(src, {})
        meta["measured"]["load_" + src.replace("/", "_") + "_in_adapters_1_3_0"] = {
            "what": f"golden/{src}/adapter loaded with adapters 1.3.0 load_adapter (base from golden/{src}), "
                    f"logits compared with golden/{src} logits (made by adapters 1.0.1)",
            **rec}
        meta_p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    (GOLDEN / "checks.json").write_text(json.dumps(checks, indent=2, sort_keys=True) + "\n")
    write_findings(checks)
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file() and ".venvs" not in p.parts)
    print(f"[generate] done; golden/ (without .venvs) is {total / 1e6:.2f} MB")


def _keys_across(section: dict, envs: list) -> list:
    """The keys of section[env] for every env, in first-seen order."""
    return list(dict.fromkeys(k for e in envs for k in section[e]))


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def write_findings(checks: dict) -> None:
    """FINDINGS.md: generated from checks.json, so every number in it was measured by ``generate``."""
    L = []
    a = L.append
    ev = checks["env_versions"]
    a("# Measured facts (generated by `make_golden.py generate`; do not edit)\n")
    a(f"Date: {checks['date']}. Tolerance for \"same\": max |Δlogit| <= {TOL:g}. Tiny random models (seed "
      f"{MODEL_SEED}); LoRA A/B ~ N(0, {LORA_STD}²), (IA)³ l ~ 1 + N(0, {LORA_STD}²). All numbers are fp32 on CPU, "
      "torch 2.13.0.\n")
    a("| env | library | transformers | torch |")
    a("|---|---|---|---|")
    for env, v in ev.items():
        a(f"| {env} | {v['library']} {v['library_version']} | {v['transformers']} | {v['torch']} |")
    a("")

    a("## 1. Effective LoRA scale per layer class, measured inside the forward pass\n")
    a("For every LoRA-wrapped layer, a forward hook captured input x and output y with the adapter active "
      "(unmerged). With y0 = the host layer's own linear map of x and d = x·Aᵀ·Bᵀ (per q/k/v block for fused "
      "layers), the scale is s = <y−y0, d>/<d, d>; the residual |y−y0−s·d|/|y−y0| shows y−y0 really is s·d. "
      "For (IA)³ the factor is s = mean((y/y0)/l).\n")
    a("| case | alpha/r | layer class | layers | measured scale(s) | max residual |")
    a("|---|---|---|---|---|---|")
    for case, m in checks["cases"].items():
        for aname, per in m.get("effective_scale", {}).items():
            for cls, info in sorted(per.items()):
                a(f"| {case} ({aname}) | {_fmt(info.get('alpha_over_r'))} | {cls} | {info['count']} | "
                  f"{', '.join(_fmt(s) for s in info['scales'])} | {_fmt(info['max_residual'])} |")
    a("")

    a("## 2. Merged (merge_adapter) vs unmerged logits, in the producing library\n")
    a("| case | max abs diff merged vs unmerged | note |")
    a("|---|---|---|")
    for case, m in checks["cases"].items():
        mg = m.get("merged_vs_unmerged")
        if mg is None:
            continue
        a(f"| {case} | {_fmt(mg.get('max_abs_diff'))} | {mg.get('error', '') or ''} |")
    a("")

    a("## 3. Loading a saved adapter with load_adapter in another library version\n")
    a("Each row: the case's base rebuilt in that env, `load_adapter(<case>/adapter)`, that adapter activated, "
      "logits compared with the golden logits of the case (i.e. of the library that made it). "
      "`shim` = the adapters ≥ 1.1 load-time warning 'faulty scaling implementation' was logged "
      "(alpha rewritten to r).\n")
    envs = list(ENVS)
    a("| source case | " + " | ".join(f"load in {e}" for e in envs) + " |")
    a("|---|" + "---|" * len(envs))
    for c in _keys_across(checks["crossload"], envs):
        cells = []
        for e in envs:
            r = checks["crossload"][e].get(c)
            if r is None:
                cells.append("n/a")
            elif r.get("error"):
                cells.append("error: " + r["error"][:60].replace("|", "/"))
            else:
                cells.append(("same" if r["ok"] else "DIFFERS") + f" ({_fmt(r['max_abs_diff'])})"
                             + (" shim" if r.get("shim_warning") else ""))
        a(f"| {c} | " + " | ".join(cells) + " |")
    a("")

    a("## 4. Base rebuild check: `Cls(Config(**config.json))` + `load_state_dict(strict=False)`\n")
    a("Max |Δ| against the producing env's `base_logits`, per consuming env (missing/unexpected keys listed "
      "when any).\n")
    a("| base | " + " | ".join(envs) + " |")
    a("|---|" + "---|" * len(envs))
    for b in _keys_across(checks["base_rebuild"], envs):
        cells = []
        for e in envs:
            r = checks["base_rebuild"][e].get(b)
            if r is None:
                cells.append("n/a")
            elif r.get("error"):
                cells.append("error: " + r["error"][:60])
            else:
                extra = ""
                if r["missing_keys"] or r["unexpected_keys"]:
                    extra = f" missing={r['missing_keys']} unexpected={r['unexpected_keys']}"
                cells.append(f"{_fmt(r['max_abs_diff'])}{extra}")
        a(f"| {b} | " + " | ".join(cells) + " |")
    a("")

    a("## 5. What this means for the converter\n")
    cl13 = checks["crossload"]["ad13"]
    for src in ("ad101/t5_qv", "ad101/llama_ffn", "ad101/gpt2_mixed"):
        r = cl13.get(src, {})
        if "ok" in r:
            a(f"- adapters 1.3.0 loading `{src}` (written by 1.0.1): "
              f"{'reproduces' if r['ok'] else 'does NOT reproduce'} 1.0.1's logits "
              f"(max |Δ| {_fmt(r['max_abs_diff'])}; shim warning logged: {r.get('shim_warning')}).")
    r = checks["crossload"]["ad101"].get("at31/t5_qv", {})
    if "ok" in r:
        a(f"- adapters 1.0.1 loading `at31/t5_qv` as is: {'reproduces' if r['ok'] else 'does NOT reproduce'} "
          f"3.1.0's logits (max |Δ| {_fmt(r['max_abs_diff'])}): the 1.0.x unmerged path ignores alpha.")
    r = checks["crossload"]["ad13"].get("at31/t5_qv", {})
    if "ok" in r:
        a(f"- adapters 1.3.0 loading `at31/t5_qv` as is: {'reproduces' if r['ok'] else 'does NOT reproduce'} "
          f"3.1.0's logits (max |Δ| {_fmt(r['max_abs_diff'])}).")
    for case in ("ad101/gpt2_mixed", "ad101/t5_qv", "ad101/llama_ffn"):
        mg = checks["cases"].get(case, {}).get("merged_vs_unmerged", {})
        if "max_abs_diff" in mg:
            a(f"- `{case}`: merge_adapter changes the logits by up to {_fmt(mg['max_abs_diff'])} in 1.0.1 "
              "(merge uses alpha/r, unmerged LoRALinear uses 1.0).")
    g = {e: checks["crossload"][e].get("at31/t5_gated", {}) for e in ENVS}
    if all("ok" in r for r in g.values()):
        a("- Gated LoRA (`at31/t5_gated`) loaded as is: " + ", ".join(
            f"{e} {'same' if r['ok'] else 'differs'}" for e, r in g.items()) +
          " — the gate replaces alpha/r in every version, so no version changed it; it still cannot be expressed "
          "by a fixed scale, so a converter must refuse it.")
    ia = checks["crossload"]["ad101"].get("at31/t5_ia3", {})
    if "ok" in ia:
        a(f"- (IA)³ with alpha=2 (`at31/t5_ia3`) loaded as is in adapters 1.0.1: "
          f"{'same' if ia['ok'] else 'DIFFERS'} (max |Δ| {_fmt(ia['max_abs_diff'])}); 1.0.1's (IA)³ ignores alpha.")
    st = checks["crossload"]["at31"].get("ad13/t5_qv_safetensors", {})
    plain = checks["crossload"]["ad13"].get("ad13/t5_qv_safetensors (plain load_adapter)", {})
    if st.get("error") and plain.get("error"):
        a("- `adapter.safetensors` adapters: adapters 1.3.0 `load_adapter(dir)` without `use_safetensors=True` "
          "fails (`" + plain["error"][:90] + "...`); adapter-transformers 3.1.0 cannot load them at all (`"
          + st["error"][:80] + "...`).")
    oc = checks["cases"].get("at31/t5_odd_scale", {}).get("effective_scale", {})
    if oc:
        a("- Scales 2, 4 and 8 (all cases but `at31/t5_odd_scale`) are powers of two, so folding them into lora_B "
          "is bit-exact; `at31/t5_odd_scale` (alpha/r = 16/6) is the case where folding rounds.")
    a("- Merging is not bit-exact even in a correct version: merged vs unmerged differs by float rounding "
      "(section 2), up to the order of 1e-5 on logits of magnitude ~4 (T5).")
    a("- Every adapter folder written with default `save_adapter` arguments also holds `head_config.json` + "
      "`pytorch_model_head.bin` (`model_head.safetensors` with use_safetensors): a copy of the base `lm_head`.")
    a("")
    (GOLDEN / "FINDINGS.md").write_text("\n".join(L) + "\n")


# ==================================================================================================
# Host side: accept
# ==================================================================================================
def cmd_accept(args) -> None:
    conv = shlex.split(args.converter)
    if not conv:
        raise SystemExit("empty --converter")
    if not (Path(conv[0]).exists() or shutil.which(conv[0])):
        raise SystemExit(f"converter {conv[0]!r} not found")
    records = []
    checks_by_env: dict[str, list] = {}
    work = Path(tempfile.mkdtemp(prefix="golden-accept-"))
    for i, (case, target, expect) in enumerate(ACCEPTANCE):
        spec = CASES[case]
        cdir = GOLDEN / case
        src = cdir / ("full" if spec.get("full") else "adapter")
        out = work / f"{i:02d}_{case.replace('/', '_')}_{target}" / "out"
        out.parent.mkdir(parents=True)
        cmd = conv + ["convert", str(src), str(out), "--to", target, "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        env = TARGET_ENV[target]
        base = {"case": case, "target": target, "env": env, "library_version":
                f"{ENVS[env]['library']} {ENVS[env]['library_version']}", "expect": expect,
                "converter_exit_code": p.returncode,
                "command": " ".join(shlex.quote(c) for c in conv + ["convert", str(src.relative_to(GOLDEN.parent)),
                                                                   "<tmp>/out", "--to", target, "--json"])}
        tail = (p.stderr or "").strip().splitlines()[-3:]
        if expect == "refuse":
            records.append({**base, "adapter": None, "max_abs_diff": None, "ok": p.returncode != 0,
                            "converter_stderr_tail": tail})
            continue
        names = [n for n, _, _ in spec["adapters"]]
        for name in names:
            rec = {**base, "adapter": name, "max_abs_diff": None, "ok": False}
            if p.returncode != 0:
                rec["error"] = "converter failed"
                rec["converter_stderr_tail"] = tail
                records.append(rec)
                continue
            adir = out / name if len(names) > 1 else out
            ref = "logits_" + name if len(names) > 1 else "logits"
            rec["_job"] = {"adapter_dir": str(adir), "case": case, "ref": ref}
            records.append(rec)
            checks_by_env.setdefault(env, []).append(rec)
    for env, recs in checks_by_env.items():
        res = run_worker(env, "load_check", {"items": [r["_job"] for r in recs]})
        for r, out_r in zip(recs, res["items"], strict=True):
            keep = ("max_abs_diff", "error", "loaded_name", "load_kwargs")
            r.update({k: v for k, v in out_r.items() if k in keep})
            r["ok"] = out_r.get("max_abs_diff") is not None and out_r["max_abs_diff"] <= TOL
    for r in records:
        r.pop("_job", None)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "converter": args.converter,
              "tolerance": TOL, "records": records,
              "summary": {"ok": sum(r["ok"] for r in records), "total": len(records)}}
    out_path = Path(args.out) if args.out else GOLDEN / "acceptance.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':26} {'adapter':7} {'target':26} {'env':6} {'exit':>4} {'max_abs_diff':>12}  ok")
    for r in records:
        print(f"{r['case']:26} {r['adapter']!s:7} {r['target']:26} {r['env']:6} {r['converter_exit_code']:>4} "
              f"{_fmt(r['max_abs_diff']):>12}  {r['ok']}" + (f"  ({r['error']})" if r.get("error") else ""))
    print(f"{result['summary']['ok']}/{result['summary']['total']} ok -> {out_path}")


def cmd_fake_converter(argv) -> int:
    """A stand-in converter used to test ``accept``'s plumbing: it only copies the source folder.

    For a full-model source it writes one empty subfolder per adapter, so those checks fail visibly.
    """
    p = argparse.ArgumentParser(prog="fake-converter")
    p.add_argument("verb")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--to", required=True)
    p.add_argument("--from", dest="from_")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    src = Path(a.src)
    if "gated" in str(src):
        print(json.dumps({"error": "gated LoRA refused (fake)"}), file=sys.stderr)
        return 2
    if (src / "adapter_config.json").exists():
        shutil.copytree(src, a.out)
    else:
        Path(a.out).mkdir(parents=True)
    print(json.dumps({"ok": True, "to": a.to}))
    return 0


# ==================================================================================================
# Worker side (runs inside a venv; may import torch/transformers/adapters)
# ==================================================================================================
class Lib:
    """The few library entry points that differ between adapter-transformers 3.1 and adapters 1.x."""

    def __init__(self, env: str):
        import torch
        import transformers
        self.env = env
        self.torch = torch
        self.transformers = transformers
        if env == "at31":
            import transformers.adapters as ad
            self.ad = ad
            self.library, self.library_version = "adapter-transformers", ad.__version__
            self.logger_name = "transformers.adapters"
        else:
            import adapters as ad
            self.ad = ad
            self.library, self.library_version = "adapters", ad.__version__
            self.logger_name = "adapters"

    def versions(self) -> dict:
        return {"library": self.library, "library_version": self.library_version,
                "transformers": self.transformers.__version__, "torch": self.torch.__version__}

    def init(self, model) -> None:
        if self.env != "at31":
            self.ad.init(model)

    def adapter_config(self, cls_name: str, kwargs: dict):
        return getattr(self.ad, cls_name)(**kwargs)

    def build(self, arch: str, config: dict | None = None):
        spec = ARCHS[arch]
        cfg_cls = getattr(self.transformers, spec["config_class"])
        model_cls = getattr(self.transformers, spec["model_class"])
        self.torch.manual_seed(MODEL_SEED)
        model = model_cls(cfg_cls(**(config if config is not None else spec["config"])))
        model.eval()
        return model

    def rebuild_base(self, base_dir: Path):
        """The consumer recipe: Cls(Config(**config.json)) + load_state_dict(strict=False)."""
        config = json.loads((base_dir / "config.json").read_text())
        arch_info = json.loads((base_dir / "arch.json").read_text())
        arch = arch_info["arch"]
        model = self.build(arch, config)
        try:  # the consumer's way, when the env has the real library
            from safetensors.torch import load_file
            sd = load_file(str(base_dir / "model.safetensors"))
        except ImportError:
            sd = _read_safetensors(base_dir / "model.safetensors", self.torch)
        res = model.load_state_dict(sd, strict=False)
        model.eval()
        return model, arch, sorted(res.missing_keys), sorted(res.unexpected_keys)

    def logits(self, model, inputs: dict):
        torch = self.torch
        kw = {k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**kw, use_cache=False) if "decoder_input_ids" not in kw else model(**kw)
        return out.logits.detach().float().clone()


def _read_safetensors(path: Path, torch) -> dict:
    """Minimal safetensors reader (used everywhere, so at31 needs no safetensors package)."""
    import numpy as np
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    dt = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "BOOL": np.bool_, "U8": np.uint8}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        arr = np.frombuffer(data[s:e], dtype=dt[v["dtype"]]).reshape(v["shape"]).copy()
        out[k] = torch.from_numpy(arr)
    return out


def _write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file: with the real library when the env has it, else by hand.

    Every tensor is cloned and made contiguous first, so tied weights (T5 shared / embed_tokens / lm_head)
    are written as independent copies under every key.
    """
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
        return
    names = {"torch.float32": "F32", "torch.float64": "F64", "torch.float16": "F16", "torch.int64": "I64",
             "torch.int32": "I32", "torch.bool": "BOOL", "torch.uint8": "U8"}
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        t = tensors[k]
        b = t.numpy().tobytes()  # little-endian on x86
        header[k] = {"dtype": names[str(t.dtype)], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = metadata or {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def _randomize(lib: Lib, model, name: str, seed: int, scale_mode: bool) -> list:
    """Overwrite every parameter of adapter ``name`` with seeded noise (lora_B starts at zero otherwise)."""
    torch = lib.torch
    g = torch.Generator().manual_seed(seed)
    tag = f".loras.{name}."
    touched = []
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if tag not in pname:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * LORA_STD
            if scale_mode and pname.endswith("lora_B"):
                noise = noise + 1.0
            p.copy_(noise)
            touched.append(pname)
    if not touched:
        raise RuntimeError(f"no parameters found for adapter {name}")
    return touched


def _measure_scales(lib: Lib, model, name: str, inputs: dict) -> dict:
    """Effective scale applied by every LoRA-wrapped layer of adapter ``name`` (adapter must be active).

    Hooks capture (x, y); y0 = F.linear(x, W_eff, b); d = x A^T B^T (block-wise for fused q/k/v layers).
    Returns {layer class: {"count", "scales" (distinct, rounded), "max_residual", ...}}.
    """
    torch = lib.torch
    F = torch.nn.functional
    captured = []
    hooks = []
    for mname, mod in model.named_modules():
        loras = getattr(mod, "loras", None)
        if loras is None or name not in loras:
            continue
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, mname=mname: captured.append((mname, m, i[0].detach(), o.detach()))))
    try:
        lib.logits(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    per = {}
    for mname, mod, x, y in captured:
        lora = mod.loras[name]
        cls = type(mod).__name__
        W = mod.weight
        fifo = getattr(mod, "fan_in_fan_out", False)
        W_eff = W.t() if fifo else W
        y0 = F.linear(x, W_eff, mod.bias)
        info = per.setdefault(cls, {"count": 0, "scales": set(), "max_residual": 0.0, "modules": set()})
        info["modules"].add(mname.split(".")[-1])
        if getattr(lora, "use_gating", False):
            info["count"] += 1
            info["scales"].add("gated")
            continue
        if getattr(lora, "composition_mode", "add") == "scale":
            lvec = lora.lora_B.view(-1)
            if hasattr(lora, "lora_ind") and lvec.numel() != y.shape[-1]:
                full = torch.ones(y.shape[-1])
                full[lora.lora_ind] = lvec
                lvec = full
            s = ((y / y0) / lvec).mean().item()
            resid = ((y - y0 * lvec * s).norm() / (y - y0).norm()).item()
        else:
            A, B = lora.lora_A, lora.lora_B
            if hasattr(lora, "enable_lora"):          # fused q/k/v layer (MergedLinear / LoRAMergedLinear)
                out = y.shape[-1]
                E = out // 3
                r = A.shape[0] // sum(lora.enable_lora)
                d = torch.zeros_like(y)
                for gi, idx in enumerate(i for i, on in enumerate(lora.enable_lora) if on):
                    d[..., idx * E:(idx + 1) * E] = x @ A[gi * r:(gi + 1) * r].t() @ B[gi * E:(gi + 1) * E].t()
            else:
                d = x @ A.t() @ B.t()
            diff = y - y0
            s = ((diff * d).sum() / (d * d).sum()).item()
            resid = ((diff - s * d).norm() / diff.norm()).item()
        info["count"] += 1
        info["scales"].add(round(s, 5))
        info["max_residual"] = max(info["max_residual"], resid)
        info["alpha_over_r"] = float(lora.lora_alpha) / lora.r if getattr(lora, "r", 0) else None
    for info in per.values():
        info["scales"] = sorted(info["scales"], key=str)
        info["modules"] = sorted(info["modules"])
    return per


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max().item())


def _save_base(lib: Lib, model, arch: str, base_dir: Path) -> None:
    base_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(model.state_dict(), base_dir / "model.safetensors")
    (base_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    (base_dir / "arch.json").write_text(json.dumps(
        {"arch": arch, "model_class": ARCHS[arch]["model_class"], "config_class": ARCHS[arch]["config_class"],
         "seed": MODEL_SEED, **lib.versions()}, indent=2, sort_keys=True) + "\n")


def w_generate(lib: Lib, job: dict) -> dict:
    torch = lib.torch
    out = {}
    for case in job["cases"]:
        spec = CASES[case]
        arch = spec["arch"]
        cdir = GOLDEN / case
        cdir.mkdir(parents=True, exist_ok=True)
        inputs = ARCHS[arch]["inputs"]
        model = lib.build(arch)
        base_dir = GOLDEN / case.split("/")[0] / "_base" / arch
        if not base_dir.exists():
            _save_base(lib, model, arch, base_dir)
        else:  # shared base: must be bit-identical to what this case built
            saved = _read_safetensors(base_dir / "model.safetensors", torch)
            for k, v in model.state_dict().items():
                if not torch.equal(saved[k], v):
                    raise RuntimeError(f"{case}: base differs from shared {base_dir} at {k}")
        (cdir / "input.json").write_text(json.dumps(inputs) + "\n")
        base_logits = lib.logits(model, inputs)

        lib.init(model)
        adapters_meta, setup_meta, measured = {}, {}, {}
        for i, (name, cls_name, kwargs) in enumerate(spec["adapters"]):
            cfg = lib.adapter_config(cls_name, kwargs)
            model.add_adapter(name, config=cfg)
            scale_mode = getattr(cfg, "composition_mode", "add") == "scale"
            touched = _randomize(lib, model, name, ADAPTER_SEED + i, scale_mode)
            adapters_meta[name] = cfg.to_dict()  # exactly the library's config dict
            setup_meta[name] = {"config_class": cls_name, "config_kwargs": kwargs, "seed": ADAPTER_SEED + i,
                                "randomized_parameters": len(touched)}
        model.eval()
        inactive = lib.logits(model, inputs)
        measured["inactive_vs_base_max_abs_diff"] = _maxdiff(inactive, base_logits)

        tensors = {"base_logits": base_logits}
        names = [n for n, _, _ in spec["adapters"]]
        measured["effective_scale"] = {}
        for name in names:
            model.set_active_adapters(name)
            lg = lib.logits(model, inputs)
            tensors["logits_" + name if spec.get("full") else "logits"] = lg
            measured.setdefault("adapter_vs_base_max_abs_diff", {})[name] = _maxdiff(lg, base_logits)
            measured["effective_scale"][name] = _measure_scales(lib, model, name, inputs)
            if not spec.get("full"):
                # exactly as a user would: default arguments (heads are written too if the library wants)
                model.save_adapter(str(cdir / "adapter"), name, **spec.get("save_kwargs", {}))
                try:
                    model.merge_adapter(name)
                    lm = lib.logits(model, inputs)
                    model.reset_adapter()
                    tensors["logits_merged"] = lm
                    measured["merged_vs_unmerged"] = {"max_abs_diff": _maxdiff(lm, lg)}
                    after_reset = lib.logits(model, inputs)
                    measured["merged_vs_unmerged"]["after_reset_vs_unmerged"] = _maxdiff(after_reset, lg)
                except Exception as e:  # noqa: BLE001 - recorded, e.g. gated LoRA cannot merge
                    measured["merged_vs_unmerged"] = {"max_abs_diff": None, "error": f"{type(e).__name__}: {e}"}
        if spec.get("full"):
            model.set_active_adapters(None)
            model.save_pretrained(str(cdir / "full"))
        _write_safetensors(tensors, cdir / "logits.safetensors")
        meta = {"library": lib.library, "library_version": lib.library_version,
                "transformers_version": lib.transformers.__version__, "torch_version": torch.__version__,
                "model_class": ARCHS[arch]["model_class"], "arch": arch, "base": base_rel(case),
                "adapters": adapters_meta, "adapter_setup": setup_meta, "description": spec["description"],
                "layout": "full" if spec.get("full") else "adapter",
                "save_kwargs": spec.get("save_kwargs", {}),
                "logits_tensors": sorted(tensors), "model_seed": MODEL_SEED,
                "randomization": f"torch.Generator(seed) per adapter, every .loras.<name>. parameter ~ "
                                 f"N(0,{LORA_STD}^2) ((IA)^3 lora_B: 1 + N(0,{LORA_STD}^2)), sorted by name",
                "measured": measured}
        (cdir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        out[case] = "ok"
        print(f"  {case}: ok", flush=True)
    return out


class _CaptureWarnings:
    """Collects the library logger's warnings (the adapters>=1.1 'faulty scaling' shim logs one)."""

    def __init__(self, logger_name: str):
        import logging
        self.logging = logging
        self.logger = logging.getLogger(logger_name)
        self.records = []

    def __enter__(self):
        outer = self

        class H(self.logging.Handler):
            def emit(self, record):
                outer.records.append(record.getMessage())

        self.h = H(level=self.logging.WARNING)
        self.old_level = self.logger.level
        self.old_propagate = self.logger.propagate
        self.logger.setLevel(self.logging.WARNING)  # the root logger is at ERROR in workers
        self.logger.propagate = False               # captured, not printed
        self.logger.addHandler(self.h)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.h)
        self.logger.setLevel(self.old_level)
        self.logger.propagate = self.old_propagate


def _load_and_compare(lib: Lib, case: str, adapter_dir: Path, ref_key: str, auto_kwargs: bool = True) -> dict:
    torch = lib.torch
    cdir = GOLDEN / case
    model, _, _, _ = lib.rebuild_base((cdir / CASES_BASE(case)).resolve())
    lib.init(model)
    inputs = json.loads((cdir / "input.json").read_text())
    kw = {}
    if auto_kwargs and (adapter_dir / "adapter.safetensors").exists() \
            and not (adapter_dir / "pytorch_adapter.bin").exists():
        kw["use_safetensors"] = True  # load_adapter only looks for pytorch_adapter.bin otherwise
    with _CaptureWarnings(lib.logger_name) as cw:
        name = model.load_adapter(str(adapter_dir), **kw)
    model.set_active_adapters(name)
    model.eval()
    lg = lib.logits(model, inputs)
    holder = getattr(model, "adapters_config", None) or model.config.adapters
    loaded_cfg = holder.get(name)
    loaded = {k: getattr(loaded_cfg, k, None) for k in ("r", "alpha")}
    ref = _read_safetensors(cdir / "logits.safetensors", torch)[ref_key]
    d = _maxdiff(lg, ref)
    return {"max_abs_diff": d, "ok": d <= TOL, "loaded_name": name, "load_kwargs": kw,
            "loaded_config_r_alpha": loaded,
            "shim_warning": any("faulty scaling" in m for m in cw.records)}


def CASES_BASE(case: str) -> str:
    meta = json.loads((GOLDEN / case / "meta.json").read_text())
    return meta["base"]


def w_check(lib: Lib, job: dict) -> dict:
    torch = lib.torch
    res = {"versions": lib.versions(), "base_rebuild": {}, "crossload": {}}
    # 1. base rebuild, for every base that has a case
    seen = {}
    for case in job["cases"]:
        base_dir = (GOLDEN / case / CASES_BASE(case)).resolve()
        key = str(base_dir.relative_to(GOLDEN))
        arch = CASES[case]["arch"]
        if arch not in ENV_ARCHS[lib.env]:
            continue
        ref = _read_safetensors(GOLDEN / case / "logits.safetensors", torch)["base_logits"]
        if key not in seen:
            try:
                model, _, missing, unexpected = lib.rebuild_base(base_dir)
                seen[key] = (lib.logits(model, ARCHS[arch]["inputs"]), missing, unexpected)
            except Exception as e:  # noqa: BLE001
                res["base_rebuild"][key] = {"error": f"{type(e).__name__}: {e}"}
                seen[key] = None
        if seen[key] is None:
            continue
        lg, missing, unexpected = seen[key]
        rec = res["base_rebuild"].setdefault(key, {"max_abs_diff": 0.0, "missing_keys": missing,
                                                   "unexpected_keys": unexpected, "cases": []})
        rec["max_abs_diff"] = max(rec["max_abs_diff"], _maxdiff(lg, ref))
        rec["cases"].append(case)
    # 2. cross-load: every saved adapter, loaded as is with this env's load_adapter
    for case in job["adapter_cases"]:
        if CASES[case]["arch"] not in ENV_ARCHS[lib.env]:
            continue
        try:
            res["crossload"][case] = _load_and_compare(lib, case, GOLDEN / case / "adapter", "logits")
        except Exception as e:  # noqa: BLE001
            res["crossload"][case] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if (GOLDEN / case / "adapter" / "adapter.safetensors").exists():
            # what a user gets with a plain load_adapter(dir) (no use_safetensors=True)
            try:
                r = _load_and_compare(lib, case, GOLDEN / case / "adapter", "logits", auto_kwargs=False)
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}"[:500]}
            res["crossload"][case + " (plain load_adapter)"] = r
    return res


def w_load_check(lib: Lib, job: dict) -> dict:
    items = []
    for it in job["items"]:
        try:
            adir = Path(it["adapter_dir"])
            if not (adir / "adapter_config.json").exists():
                raise FileNotFoundError(f"no adapter_config.json in {adir}")
            items.append(_load_and_compare(lib, it["case"], adir, it["ref"]))
        except Exception as e:  # noqa: BLE001
            items.append({"max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:500]})
    return {"items": items}


def worker_main(argv) -> None:
    serve_worker(argv, Lib, {"generate": w_generate, "check": w_check, "load_check": w_load_check}, seed=MODEL_SEED)


# ==================================================================================================
def main() -> None:
    if run_private(sys.argv, worker_main, cmd_fake_converter):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("envs", help="create/refresh the virtual envs (idempotent)")
    e.add_argument("--only", nargs="*", choices=list(ENVS))
    sub.add_parser("generate", help="write all golden cases, checks.json and FINDINGS.md")
    ac = sub.add_parser("accept", help="convert goldens with the converter and check them in the old libs")
    ac.add_argument("--converter", default=DEFAULT_CONVERTER, help="command prefix (default: %(default)s)")
    ac.add_argument("--out", help="where to write the JSON (default: golden/acceptance.json)")
    al = sub.add_parser("all", help="envs + generate + accept (accept only if the converter exists)")
    al.add_argument("--converter", default=DEFAULT_CONVERTER)
    al.add_argument("--out")
    args = ap.parse_args()
    if args.cmd == "envs":
        cmd_envs(args)
    elif args.cmd == "generate":
        cmd_generate(args)
    elif args.cmd == "accept":
        cmd_accept(args)
    elif args.cmd == "all":
        args.only = None
        cmd_envs(args)
        cmd_generate(args)
        exe = shlex.split(args.converter)[0]
        if Path(exe).exists() or shutil.which(exe):
            cmd_accept(args)
        else:
            print(f"[all] converter {args.converter!r} not found; skipping accept")


if __name__ == "__main__":
    main()
