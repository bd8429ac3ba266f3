#!/usr/bin/env python3
"""mlx family worker: runs INSIDE the mlx-lm venv (mlx[cpu], mlx-lm, torch, transformers, peft).

    <venv>/bin/python golden/families/mlx/worker.py TASK JOB.json RESULT.json

TASK ``base``     : the tiny base in HF layout (transformers, seeded; a WordLevel tokenizer built here so that
                    ``mlx_lm.load`` finds one), mlx-lm's base logits vs transformers'.
TASK ``generate`` : one case (see cases.py): the adapter as mlx-lm writes it, logits through ``mlx_lm.load(...,
                    adapter_path=)``, the equivalent PEFT adapter and its logits, ``mlx_lm fuse`` of the adapter
                    loaded in transformers, and (llama_qv) what this mlx-lm does with an ``alpha`` in the config.
TASK ``report``   : FINDINGS_MLX.md from results/mlx.json (system python3).

golden/harness.py runs it (stages base, generate; see worker_util.run_main for the job each task gets).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_util import (acceptance_lines, close, fmt, hf_logits, hf_model, load_cases, max_abs, maxdiff,  # noqa: E402
                         report_head, run_main, save_hf_base, table, versions, write_json)

C = load_cases(__file__)

if sys.argv[1:2] != ["report"]:  # report runs with the system python3
    import mlx.core as mx
    import numpy as np
    import torch

    torch.set_num_threads(2)
VERSIONS = ["mlx", "mlx-lm", "torch", "transformers", "peft", "safetensors"]


def mlx_logits(model):
    out = model(mx.array([C.INPUT_IDS]))
    return np.array(out[0].astype(mx.float32))


def write_tokenizer(dest, vocab_size):
    """A WordLevel tokenizer over t0..t{V-1} (built here, no download), saved as transformers writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t0")
    fast.save_pretrained(str(dest))


def task_base(job):
    from mlx_lm import load
    arch = job["arch"]
    a = C.ARCHS[arch]
    base_dir = Path(job["base_dir"])
    save_hf_base(hf_model(a, C.MODEL_SEED), arch, a, base_dir)
    write_tokenizer(base_dir, a["config"]["vocab_size"])
    ref = hf_logits(hf_model(a, C.MODEL_SEED, base_dir), C.INPUT_IDS)
    mmodel, _ = load(str(base_dir))
    got = mlx_logits(mmodel)
    meta = {"arch": arch, "versions": versions(VERSIONS), "config": a["config"], "input_ids": C.INPUT_IDS,
            "base_logits_mlx_vs_transformers": fmt(maxdiff(got, ref))}
    write_json(base_dir / "meta.json", meta)
    return {"arch": arch, "ok": close(maxdiff(got, ref), ref, C.REL_TOL["f32"]), "max_abs_logit": max_abs(ref),
            "base_logits_mlx_vs_transformers": meta["base_logits_mlx_vs_transformers"]}


# -------------------------------------------------------------------------------------------------- generate


def mlx_args(d, rel_base):
    """The args dict mlx_lm lora saves (save_config(vars(args))): its parser's namespace, then CONFIG_DEFAULTS for
    every unset key (as mlx_lm.lora.main does), with lora_parameters from the config file."""
    from mlx_lm.lora import CONFIG_DEFAULTS, build_parser
    args = vars(build_parser().parse_args(["--model", rel_base, "--train", "--fine-tune-type", d["fine_tune_type"],
                                           "--num-layers", str(d["num_layers"]), "--adapter-path", "adapter",
                                           "--seed", str(C.LORA_SEED)]))
    args["lora_parameters"] = dict(d["lora_parameters"])
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k, None) is None:
            args[k] = v
    return args


def make_mlx_adapter(d, base_dir, adapter_dir, rel_base):
    """What mlx_lm lora does before training (freeze, linear_to_lora_layers, save_config) and after (save the
    trainable parameters), with the factors set to seeded noise in between (DoRA's m: m·(1 + N(0, 0.2²)))."""
    import mlx.nn as nn  # noqa: F401
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config
    model, _ = load_model(Path(base_dir))
    args = mlx_args(d, rel_base)
    mx.random.seed(args["seed"])
    model.freeze()
    linear_to_lora_layers(model, args["num_layers"], args["lora_parameters"],
                          use_dora=(args["fine_tune_type"] == "dora"))
    rng = np.random.default_rng(C.LORA_SEED)
    new = []
    for name, p in sorted(tree_flatten(model.trainable_parameters())):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b"):
            new.append((name, mx.array((rng.standard_normal(p.shape) * C.LORA_STD).astype(np.float32))))
        elif leaf == "m":
            m = np.array(p)
            new.append((name, mx.array((m * (1 + C.LORA_STD * rng.standard_normal(m.shape))).astype(np.float32))))
    model.load_weights(new, strict=False)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_config(dict(args), adapter_dir / "adapter_config.json")
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), weights)
    model.eval()
    return model, args


def peft_equivalent(arch, base_dir, adapter_dir, args, out_dir):
    """PEFT adapter computing what the mlx one computes: per mlx module model.layers.N.<path>, lora_A = lora_aᵀ,
    lora_B = lora_bᵀ, lora_alpha = scale·r (DoRA: lora_magnitude_vector = m)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    w = load_file(str(adapter_dir / "adapters.safetensors"))
    mods = sorted({k.rsplit(".", 1)[0] for k in w})
    lp = args["lora_parameters"]
    cfg = LoraConfig(r=lp["rank"], lora_alpha=lp["scale"] * lp["rank"], target_modules=mods, lora_dropout=0.0,
                     use_dora=args["fine_tune_type"] == "dora")
    pm = get_peft_model(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), cfg)
    with torch.no_grad():
        for m in mods:
            layer = pm.base_model.model.get_submodule(m)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(w[m + ".lora_a"].T.copy()))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(w[m + ".lora_b"].T.copy()))
            if m + ".m" in w:
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(w[m + ".m"].copy()))
    logits = hf_logits(pm.eval(), C.INPUT_IDS)
    pm.save_pretrained(str(out_dir), save_embedding_layers=False)  # the LoRA only (lm_head cases)
    return logits, {"r": lp["rank"], "lora_alpha": lp["scale"] * lp["rank"], "target_modules": mods,
                    "use_dora": cfg.use_dora}


def adapter_layout(adapter_dir):
    from safetensors import safe_open
    with safe_open(str(adapter_dir / "adapters.safetensors"), "np") as f:
        tensors = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()}
                   for k in sorted(f.keys())}
        md = f.metadata()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"tensors": tensors, "safetensors_metadata": md, "config_keys": sorted(cfg),
            "lora_parameters": cfg.get("lora_parameters")}


def scale_semantics(base_dir, adapter_dir, scratch, ref_logits):
    """What this mlx-lm makes of a config that also has an `alpha` (the 2024-03..06 schema), and of one with alpha
    but no scale."""
    from mlx_lm import load
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = {}
    for label, lp in (("alpha_and_scale", dict(cfg["lora_parameters"], alpha=16.0)),
                      ("alpha_only", {k: v for k, v in dict(cfg["lora_parameters"], alpha=16.0).items()
                                      if k != "scale"})):
        d = Path(scratch) / label
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copy(adapter_dir / "adapters.safetensors", d)
        write_json(d / "adapter_config.json", dict(cfg, lora_parameters=lp))
        try:
            model, _ = load(str(base_dir), adapter_path=str(d))
            out[label] = {"loads": True, "logits_vs_scale_only": fmt(maxdiff(mlx_logits(model), ref_logits))}
        except Exception as e:  # noqa: BLE001 - the refusal is the fact being recorded
            out[label] = {"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def fuse_check(base_dir, adapter_dir, scratch, arch, peft_logits):
    """mlx_lm fuse (the CLI) of the adapter; the fused folder loaded by transformers, logits vs PEFT's."""
    dest = Path(scratch) / "fused"
    shutil.rmtree(dest, ignore_errors=True)
    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base_dir), "--adapter-path",
                        str(adapter_dir), "--save-path", str(dest)], capture_output=True, text=True,
                       env=dict(os.environ, **one_thread))  # the fused sums in one order (else ±1e-6 run to run)
    if p.returncode:
        return {"returncode": p.returncode, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    import transformers
    model = getattr(transformers, C.ARCHS[arch]["model_class"]).from_pretrained(
        str(dest), dtype=torch.float32, attn_implementation="eager").eval()
    return {"returncode": 0, "files": sorted(x.name for x in dest.iterdir()),
            "transformers_vs_peft": fmt(maxdiff(hf_logits(model, C.INPUT_IDS), peft_logits))}


def task_generate(job):
    from mlx_lm import load
    from safetensors.numpy import save_file
    case, d = job["case"], job["data"]
    arch = d["arch"]
    base_dir, case_dir, scratch = Path(job["base_dir"]), Path(job["case_dir"]), Path(job["scratch"])
    case_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    adapter_dir = case_dir / "adapter"
    model, args = make_mlx_adapter(d, base_dir, adapter_dir, "../_base/" + arch)
    live = mlx_logits(model)
    reloaded_model, _ = load(str(base_dir), adapter_path=str(adapter_dir))
    got = mlx_logits(reloaded_model)
    base = hf_logits(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), C.INPUT_IDS)
    peft_logits, peft_cfg = peft_equivalent(arch, base_dir, adapter_dir, args, case_dir / "peft_equivalent")
    save_file({"logits_mlx": got, "logits_peft": peft_logits, "base_logits": base},
              str(case_dir / "logits.safetensors"))
    write_json(case_dir / "input.json", {"input_ids": C.INPUT_IDS})
    facts = {"case": case, "arch": arch, "versions": versions(VERSIONS), "base": "../_base/" + arch,
             "mlx_config": {k: d[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")},
             "layout": adapter_layout(adapter_dir), "peft_equivalent": peft_cfg,
             "lora_effect": fmt(maxdiff(got, base)),
             "reload_vs_live": fmt(maxdiff(got, live)),
             "mlx_vs_peft": fmt(maxdiff(got, peft_logits)),
             "fuse": fuse_check(base_dir, adapter_dir, scratch, arch, peft_logits)}
    if d.get("scale_semantics", case == "llama_qv"):
        facts["scale_semantics"] = scale_semantics(base_dir, adapter_dir, scratch, got)
    write_json(case_dir / "meta.json", facts)
    res = {k: facts[k] for k in ("case", "arch", "lora_effect", "reload_vs_live", "mlx_vs_peft")}
    res["n_tensors"] = len(facts["layout"]["tensors"])
    res["modules"] = len(peft_cfg["target_modules"])
    res["fuse_vs_peft"] = facts["fuse"].get("transformers_vs_peft", facts["fuse"].get("error"))
    if "scale_semantics" in facts:
        res["scale_semantics"] = facts["scale_semantics"]
    res["max_abs_logit"] = max_abs(peft_logits)
    res["ok"] = close(maxdiff(got, peft_logits), peft_logits, C.REL_TOL["f32"]) and facts["reload_vs_live"] == 0.0
    return res


def report(job):
    res, lines = report_head(job, "mlx-lm adapters", (
        "Measured with mlx 0.32.4 (`mlx[cpu]`, Linux CPU) and mlx-lm 0.32.2, peft 0.21.2, transformers 5.25.0, "
        "float32. Figures: max |logit difference| on 12 fixed token ids; `effect` = max |adapter logits − base "
        "logits|; `max abs logit` = the reference's largest logit. Do not edit by hand."))
    lines += ["## Bases", ""]
    lines += table(["base", "mlx-lm vs transformers", "max abs logit", "as expected"],
                   [[k, r.get("base_logits_mlx_vs_transformers"), r.get("max_abs_logit"),
                     "ok" if r.get("ok") else "FAILED"] for k, r in sorted(res.items()) if "/_base/" in k])
    lines += ["", "## Adapters (written by mlx-lm, loaded with `mlx_lm.load(base, adapter_path=...)`)", ""]
    lines += table(["case", "tensors", "modules", "effect", "max abs logit", "reload vs live", "mlx vs PEFT equivalent",
                    "`mlx_lm fuse` → transformers vs PEFT", "as expected"],
                   [[k, r.get("n_tensors"), r.get("modules"), r.get("lora_effect"), r.get("max_abs_logit"),
                     r.get("reload_vs_live"), r.get("mlx_vs_peft"), r.get("fuse_vs_peft"),
                     "ok" if r.get("ok") else "FAILED"] for k, r in sorted(res.items()) if "/_base/" not in k])
    lines += ["", "PEFT equivalent: lora_A = lora_aᵀ, lora_B = lora_bᵀ, lora_alpha = scale·rank, target_modules = "
              "the mlx modules' full names, DoRA: lora_magnitude_vector = m. So in mlx-lm 0.32.2 `scale` is "
              "absolute (ΔW = scale·lora_bᵀ·lora_aᵀ, no division by rank), and DoRA's `m` computes what PEFT's "
              "magnitude does.", "", "## Scale semantics of this version", ""]
    for k, r in sorted(res.items()):
        for label, v in sorted(r.get("scale_semantics", {}).items()):
            what = (f"loads; logits vs the same adapter without `alpha`: {v['logits_vs_scale_only']} (alpha ignored)"
                    if v.get("loads") else f"refused: `{v.get('error')}`")
            lines.append(f"- {k}, `lora_parameters` with {label.replace('_', ' ')}: {what}")
    lines += acceptance_lines(job, [("`mlx_lm fuse` → transformers", "fuse_vs_ref")])
    return {"markdown": "\n".join(lines).rstrip() + "\n"}


# ------------------------------------------------------------------------------------------------ load_check


def rows_tol(ref, noise):
    """tests/tolerance.py's model for float32 logits: 192 units of roundoff of the largest logit + 4·noise."""
    return 192 * 2.0**-24 * max_abs(ref) + 4 * noise


def load_one(item, data_dir, scratch):
    """One ACCEPTANCE row: the converted OUT loaded by mlx-lm (and fused by ``mlx_lm fuse``) or by peft, its logits
    against the row's reference logits of the source case."""
    from mlx_lm import load
    from safetensors.numpy import load_file
    row, out = item["row"], Path(item["out"])
    arch = row["arch"]
    base = Path(data_dir) / "mlxlm0322" / "_base" / arch
    stored = load_file(str(Path(item["case_dir"]) / "logits.safetensors"))
    ref = stored[row["ref"]]
    res = {"adapter": "default", "load": row["load"]}
    if row["load"] == "mlx":
        model, _ = load(str(base), adapter_path=str(out))
        got = mlx_logits(model)
        base_model, _ = load(str(base))
        res["noise"] = fmt(maxdiff(mlx_logits(base_model), stored["base_logits"]))
        fused = fuse_check(base, out, scratch, arch, ref)
        res["fuse_vs_ref"] = fused.get("transformers_vs_peft", fused.get("error"))
    else:
        from peft import PeftModel
        pm = PeftModel.from_pretrained(hf_model(C.ARCHS[arch], C.MODEL_SEED, base), str(out)).eval()
        got = hf_logits(pm, C.INPUT_IDS)
        res["noise"] = fmt(maxdiff(hf_logits(hf_model(C.ARCHS[arch], C.MODEL_SEED, base), C.INPUT_IDS),
                                   stored["base_logits"]))
    d = maxdiff(got, ref)
    res.update(max_abs_diff=fmt(d), max_abs_logit=max_abs(ref), tol=fmt(rows_tol(ref, res["noise"])))
    if d > rows_tol(ref, res["noise"]):
        res["error"] = f"logits off by {fmt(d)} > tolerance {res['tol']}"
    fuse = res.get("fuse_vs_ref")
    if isinstance(fuse, float) and fuse > rows_tol(ref, res["noise"]):
        res["error"] = f"mlx_lm fuse of the output off by {fuse} > tolerance {res['tol']}"
    elif fuse is not None and not isinstance(fuse, float):
        res["error"] = f"mlx_lm fuse failed: {fuse}"
    return res


def task_load_check(job):
    out = []
    for i, item in enumerate(job["items"]):
        print(f"mlx load_check {item['row']['case']} -> {item['row']['target']}", flush=True)
        try:
            res = load_one(item, job["data_dir"], Path(job["work"]) / "scratch" / "mlx" / f"accept{i:02d}")
        except Exception as e:  # noqa: BLE001 - the loader's refusal is the result
            res = {"adapter": "default", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
        out.append([res])
    return {"items": out}


if __name__ == "__main__" and sys.argv[1:2] == ["load_check"]:
    write_json(sys.argv[3], task_load_check(json.loads(Path(sys.argv[2]).read_text())))
elif __name__ == "__main__":
    run_main({"generate": task_generate}, {"base": task_base}, report, lambda env: versions(VERSIONS))
