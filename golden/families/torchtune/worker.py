#!/usr/bin/env python3
"""torchtune family worker. One file, two envs (torchtune 0.6.1 and peft 0.21.2 cannot share one):

    <venv>/bin/python golden/families/torchtune/worker.py TASK JOB.json RESULT.json

TASK ``base``     (pf21 env): the tiny HF base (transformers, seeded) -> _base/<arch>/{config.json,model.safetensors},
                  its logits.
TASK ``generate`` (torchtune061 env): FullModelHFCheckpointer.load_checkpoint, the lora_llama2/lora_qwen2 model,
                  LoRA factors randomized with a seed, torchtune's logits, save_checkpoint as the LoRA recipe calls it;
                  the adapter files go to <case>/torchtune/, the merged HF model to the scratch folder.
TASK ``peft_load`` (pf21 env): real peft loads the PEFT export (PeftModel.from_pretrained), transformers loads the
                  merged model; both against torchtune's logits. Also the export with its q/k lora_B permutation undone.
 Its facts say whether the run explains itself (``ok``).
TASK ``report``   FINDINGS_TORCHTUNE.md from results/torchtune.json (system python3).

golden/harness.py runs the stages base (pf21), generate (torchtune061), peft_load (pf21) of each case; see
worker_util.run_main for the job each task gets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_util import (acceptance_lines, close, fmt, hf_logits, hf_model, load_cases, max_abs, maxdiff,  # noqa: E402
                         report_head, run_main, save_hf_base, table, versions, write_json)

C = load_cases(__file__)

if sys.argv[1:2] != ["report"]:  # report runs with the system python3
    import numpy as np
    import torch

    torch.set_num_threads(2)

TT_VERSIONS = ["torch", "torchtune", "torchao", "safetensors"]
PF21_VERSIONS = ["torch", "transformers", "peft"]


def tune_to_hf_rows(t, n_heads):
    """torchtune's tune_to_hf / _permute_lora_matrix on the rows of an (out, r) matrix."""
    out, r = t.shape
    hd = out // n_heads
    return t.reshape(n_heads, hd // 2, 2, r).swapaxes(1, 2).reshape(out, r)


def hf_to_tune_rows(t, n_heads):
    """The inverse (torchtune's hf_to_tune): view(n_heads, 2, hd/2, r).transpose(1, 2)."""
    out, r = t.shape
    hd = out // n_heads
    return t.reshape(n_heads, 2, hd // 2, r).swapaxes(1, 2).reshape(out, r)


# ------------------------------------------------------------------------------------------- pf21 env tasks


def task_base(job):
    from safetensors.numpy import save_file
    arch = job["arch"]
    a = C.ARCHS[arch]
    base_dir = Path(job["base_dir"])
    save_hf_base(hf_model(a, C.MODEL_SEED), arch, a, base_dir)
    ref = hf_logits(hf_model(a, C.MODEL_SEED, base_dir), C.INPUT_IDS)
    save_file({"base_logits": ref}, str(base_dir / "logits.safetensors"))
    write_json(base_dir / "meta.json", {"arch": arch, "config": a["config"], "input_ids": C.INPUT_IDS,
                                        "versions": versions(["torch", "transformers", "safetensors"])})
    return {"arch": arch, "ok": True, "max_abs_logit": max_abs(ref)}


def task_peft_load(job):
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    case, d = job["case"], job["data"]
    arch = d["arch"]
    a = C.ARCHS[arch]["config"]
    base_dir, case_dir, scratch = Path(job["base_dir"]), Path(job["case_dir"]), Path(job["scratch"])
    export = case_dir / "torchtune"
    tt = load_file(str(case_dir / "logits.safetensors"))
    ref = tt["logits_torchtune"]
    out = {}
    pm = PeftModel.from_pretrained(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), str(export)).eval()
    peft_logits = hf_logits(pm, C.INPUT_IDS)
    out["peft_export_vs_torchtune"] = fmt(maxdiff(peft_logits, ref))
    out["peft_export_matches"] = close(maxdiff(peft_logits, ref), ref, C.REL_TOL["f32"])
    out["peft_config_loaded"] = {k: v for k, v in pm.peft_config["default"].to_dict().items()
                                 if k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")}
    out["peft_config_loaded"]["target_modules"] = sorted(out["peft_config_loaded"]["target_modules"])
    # the export with torchtune's q/k lora_B permutation undone: what a non-permuting export would contain
    fixed_dir = scratch / "export_unpermuted"
    shutil.rmtree(fixed_dir, ignore_errors=True)
    shutil.copytree(export, fixed_dir)
    w = load_file(str(export / "adapter_model.safetensors"))
    for k in list(w):
        if "lora_B" in k and (".q_proj." in k or ".k_proj." in k):
            n = a["num_attention_heads"] if ".q_proj." in k else a["num_key_value_heads"]
            w[k] = np.ascontiguousarray(hf_to_tune_rows(w[k], n))
    save_file(w, str(fixed_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    pm2 = PeftModel.from_pretrained(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), str(fixed_dir)).eval()
    unperm = hf_logits(pm2, C.INPUT_IDS)
    out["peft_unpermuted_export_vs_torchtune"] = fmt(maxdiff(unperm, ref))
    if d["lora"]["use_dora"]:  # the export as PEFT needs it: use_dora set, and the q/k magnitude permuted too
        out["dora_export"] = dora_variants(arch, base_dir, export, scratch, ref)
    # torchtune's merged HF checkpoint in transformers
    merged = Path(job["scratch"]) / "out" / "epoch_0"
    import transformers
    cls = getattr(transformers, C.ARCHS[arch]["model_class"])
    try:
        cls.from_pretrained(str(merged), dtype=torch.float32, attn_implementation="eager")
        out["merged_from_pretrained"] = "loads"
    except Exception as e:  # noqa: BLE001 - the failure is the fact recorded
        out["merged_from_pretrained"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    mm = hf_model(C.ARCHS[arch], C.MODEL_SEED)  # the merged shards into the same architecture, by hand
    from safetensors.torch import load_file as pt_load
    merged_sd = {}
    for f in sorted(merged.glob("model-*.safetensors")):
        merged_sd.update(pt_load(str(f)))
    missing, unexpected = mm.load_state_dict(merged_sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    merged_logits = hf_logits(mm.eval(), C.INPUT_IDS)
    out["merged_hf_vs_torchtune"] = fmt(maxdiff(merged_logits, ref))
    out["lora_effect"] = fmt(maxdiff(ref, load_file(str(base_dir / "logits.safetensors"))["base_logits"]))
    save_file(dict(tt, logits_peft_export=peft_logits, logits_peft_unpermuted_export=unperm,
                   logits_merged_hf=merged_logits), str(case_dir / "logits.safetensors"))
    meta = json.loads((case_dir / "meta.json").read_text())
    meta["peft_side"] = dict(out, versions=versions(PF21_VERSIONS))
    write_json(case_dir / "meta.json", meta)
    out["ok"] = _consistent(dict(meta, **out))
    return out


def _consistent(r):
    """The run explains itself: torchtune's base = transformers', its merged model = its own logits in transformers,
    and the PEFT export reproduces torchtune either as written or with its q/k permutation undone."""
    small = lambda x: isinstance(x, float) and x < 1e-4  # noqa: E731 - f32 logits of magnitude <= 10
    dora = r.get("dora_export", {})
    return (small(r.get("torchtune_base_vs_hf_base")) and small(r.get("merged_hf_vs_torchtune"))
            and (small(r.get("peft_export_vs_torchtune")) or small(r.get("peft_unpermuted_export_vs_torchtune"))
                 or small(dora.get("use_dora_and_qk_magnitude_permuted_vs_torchtune"))))


def dora_variants(arch, base_dir, export, scratch, ref):
    """torchtune writes DoRA's magnitude as lora_magnitude_vector but no use_dora, and permutes only lora_B.
    Logits of the export (a) with use_dora: true, (b) with use_dora: true and the q/k magnitudes permuted like B."""
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    a = C.ARCHS[arch]["config"]
    out = {}
    w = load_file(str(export / "adapter_model.safetensors"))
    out["magnitude_keys"] = sum(1 for k in w if "lora_magnitude_vector" in k)
    for label, permute in (("use_dora", False), ("use_dora_and_qk_magnitude_permuted", True)):
        dest = Path(scratch) / label
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(export, dest)
        cfg = json.loads((export / "adapter_config.json").read_text())
        write_json(dest / "adapter_config.json", dict(cfg, use_dora=True))
        w2 = dict(w)
        if permute:
            for k in w2:
                if "lora_magnitude_vector" in k and (".q_proj." in k or ".k_proj." in k):
                    n = a["num_attention_heads"] if ".q_proj." in k else a["num_key_value_heads"]
                    w2[k] = np.ascontiguousarray(tune_to_hf_rows(w2[k].reshape(-1, 1), n).reshape(-1))
        save_file(w2, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
        pm = PeftModel.from_pretrained(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), str(dest)).eval()
        out[label + "_vs_torchtune"] = fmt(maxdiff(hf_logits(pm, C.INPUT_IDS), ref))
    return out


# --------------------------------------------------------------------------------------- torchtune env task


def tt_model(arch, lora, cfg=None):
    """torchtune's LoRA builder for ``arch`` with the dims of ``cfg`` (an HF config; default the family's own)."""
    import importlib
    a = C.ARCHS[arch]
    cfg = cfg or a["config"]
    mod, fn = a["tt_builder"].rsplit(".", 1)
    builder = getattr(importlib.import_module(mod), fn)
    kw = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
              num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"],
              intermediate_dim=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
              norm_eps=cfg["rms_norm_eps"], **lora)
    if arch == "qwen2":
        kw.update(rope_base=cfg["rope_theta"], tie_word_embeddings=cfg["tie_word_embeddings"])
    return builder(**kw)


def task_generate(job):
    from safetensors.numpy import load_file as np_load
    from safetensors.numpy import save_file
    from torchtune import training
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt
    from torchtune.training import FullModelHFCheckpointer
    case, d = job["case"], job["data"]
    arch = d["arch"]
    a = C.ARCHS[arch]
    base_dir, case_dir, scratch = Path(job["base_dir"]), Path(job["case_dir"]), Path(job["scratch"])
    case_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(scratch / "out", ignore_errors=True)
    ck = FullModelHFCheckpointer(checkpoint_dir=str(base_dir), checkpoint_files=["model.safetensors"],
                                 model_type=a["tt_model_type"], output_dir=str(scratch / "out"))
    base_sd = ck.load_checkpoint()[training.MODEL_KEY]
    lora = d["lora"]
    model = tt_model(arch, lora)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("lora" in k or "magnitude" in k for k in missing), (missing, unexpected)
    for m in model.modules():  # what the LoRA recipes do after loading the base (DoRA)
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()
    model.eval()
    tokens = torch.tensor([C.INPUT_IDS])
    with torch.no_grad():
        base_tt = model(tokens)[0].float().numpy()  # lora_b starts at 0: torchtune's base
        g = torch.Generator().manual_seed(C.LORA_SEED)
        for name, p in sorted(model.named_parameters()):
            if ".lora_a." in name or ".lora_b." in name:
                p.copy_(torch.randn(p.shape, generator=g) * C.LORA_STD)
            elif name.endswith(".magnitude"):
                p.mul_(1 + C.LORA_STD * torch.randn(p.shape, generator=g))
        ref = model(tokens)[0].float().numpy()
    # save_checkpoint as recipes/lora_finetune_single_device.py calls it at the end of training
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    ckpt = {training.ADAPTER_KEY: get_adapter_state_dict(model.state_dict()),
            training.MODEL_KEY: get_merged_lora_ckpt(state_dict, rank=lora["lora_rank"], alpha=lora["lora_alpha"]),
            training.ADAPTER_CONFIG: {"r": lora["lora_rank"], "lora_alpha": lora["lora_alpha"],
                                      "target_modules": get_lora_module_names(lora["lora_attn_modules"],
                                                                              lora["apply_lora_to_mlp"],
                                                                              lora["apply_lora_to_output"]),
                                      "peft_type": "LORA"}}
    native = {k: v.clone() for k, v in ckpt[training.ADAPTER_KEY].items()}
    ck.save_checkpoint(ckpt, epoch=0, intermediate_checkpoint=False, adapter_only=False)
    out = scratch / "out" / "epoch_0"
    dest = case_dir / "torchtune"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for f in ("adapter_model.pt", "adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / f, dest / f)
    # layout and the q/k question, on the files
    pt = torch.load(str(dest / "adapter_model.pt"), weights_only=True, map_location="cpu")
    peft_sd = np_load(str(dest / "adapter_model.safetensors"))
    cfg = a["config"]
    qk = {}
    for k, v in sorted(native.items()):
        if ".lora_b." not in k or not (".q_proj." in k or ".k_proj." in k):
            continue
        n = cfg["num_attention_heads"] if ".q_proj." in k else cfg["num_key_value_heads"]
        layer = k.split(".")[1]
        proj = "q_proj" if ".q_proj." in k else "k_proj"
        pk = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_B.weight"
        e, t = peft_sd[pk], v.numpy()
        qk[k] = {"export_equals_native": bool(np.array_equal(e, t)),
                 "export_equals_tune_to_hf_permuted": bool(np.array_equal(e, tune_to_hf_rows(t, n)))}
    facts = {
        "case": case, "arch": arch, "lora": lora, "base": "../_base/" + arch,
        "versions": versions(TT_VERSIONS),
        "adapter_model_pt": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                             for k, v in sorted(pt.items())},
        "adapter_model_safetensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                      for k, v in sorted(peft_sd.items())},
        "adapter_config": json.loads((dest / "adapter_config.json").read_text()),
        "pt_equals_native_state_dict": all(torch.equal(pt[k], native[k]) for k in native) and set(pt) == set(native),
        "qk_lora_b": qk,
        "export_permutes_qk": bool(qk) and all(v["export_equals_tune_to_hf_permuted"] and not
                                               v["export_equals_native"] for v in qk.values()),
        "torchtune_base_vs_hf_base": fmt(maxdiff(base_tt, np_load(str(base_dir / "logits.safetensors"))
                                                   ["base_logits"])),
    }
    save_file({"logits_torchtune": ref, "base_logits_torchtune": base_tt}, str(case_dir / "logits.safetensors"))
    write_json(case_dir / "input.json", {"input_ids": C.INPUT_IDS})
    write_json(case_dir / "meta.json", facts)
    return {k: facts[k] for k in ("case", "arch", "export_permutes_qk", "pt_equals_native_state_dict",
                                  "torchtune_base_vs_hf_base")}


def report(job):
    res, lines = report_head(job, "torchtune adapters", (
        "Written by torchtune 0.6.1 (torchao 0.11.0, torch 2.13.0) through `FullModelHFCheckpointer."
        "save_checkpoint` as its LoRA recipe calls it; the PEFT export loaded by peft 0.21.2 "
        "(`PeftModel.from_pretrained`, transformers 4.57.6) in a separate env. Figures: max |logit difference| "
        "on 12 fixed token ids against torchtune's own logits; `effect` = max |LoRA − base|. "
        "Do not edit by hand."))
    rows = []
    for k, r in sorted(res.items()):
        if "/_base/" in k:
            continue
        rows.append([k, r.get("lora_effect"), r.get("torchtune_base_vs_hf_base"), r.get("export_permutes_qk"),
                     r.get("peft_export_vs_torchtune"), r.get("peft_unpermuted_export_vs_torchtune"),
                     r.get("merged_hf_vs_torchtune"), "ok" if r.get("ok") else "FAILED"])
    lines += table(["case", "effect", "torchtune base vs transformers", "export permutes q/k lora_B",
                    "peft(export) vs torchtune", "peft(export, permutation undone) vs torchtune",
                    "merged HF model (transformers) vs torchtune", "consistent"], rows)
    lines += ["", "`export permutes q/k lora_B`: every q_proj/k_proj lora_B in adapter_model.safetensors equals "
              "torchtune's lora_b with rows permuted by tune_to_hf (`view(n, hd/2, 2, r).transpose(1, 2)`, n_heads "
              "for q, n_kv_heads for k) and differs from it unpermuted. `adapter_model.pt` holds torchtune's own "
              "state dict (keys `layers.N.attn.q_proj.lora_a.weight` …, PEFT orientation)."]
    for k, r in sorted(res.items()):
        if "dora_export" in r:
            v = r["dora_export"]
            lines.append(f"- {k} (DoRA): the export has {v['magnitude_keys']} `lora_magnitude_vector` tensors but no "
                         f"`use_dora`; with `use_dora: true` added: {v['use_dora_vs_torchtune']}; with `use_dora: "
                         f"true` and the q/k magnitudes permuted like lora_B: "
                         f"{v['use_dora_and_qk_magnitude_permuted_vs_torchtune']}")
    for k, r in sorted(res.items()):
        if "peft_config_loaded" in r:
            lines.append(f"- {k}: peft reads the export's config as {r['peft_config_loaded']}; the output folder "
                         f"(merged model + adapter files) in transformers' `from_pretrained`: "
                         f"{r.get('merged_from_pretrained')}")
    lines += acceptance_lines(job, ())
    return {"markdown": "\n".join(lines).rstrip() + "\n"}


# -------------------------------------------------------------------------------------------- load_check


def rows_tol(ref, noise):
    """tests/tolerance.py's model for float32 logits: 192 units of roundoff of the largest logit + 4·noise."""
    return 192 * 2.0**-24 * max_abs(ref) + 4 * noise


def load_torchtune(row, out, base, scratch, ref_base):
    """OUT through torchtune's own loading path: FullModelHFCheckpointer resuming with ``adapter_checkpoint`` (the
    base from checkpoint_dir, adapter_model.pt from the output dir; a dummy recipe_state.pt, which resuming needs),
    the LoRA model built from the base's config.json with the recipe settings OUT's config names, then
    load_state_dict + validate_missing_and_unexpected_for_lora as recipes/lora_finetune_single_device.py does."""
    from torchtune import training
    from torchtune.modules.peft import validate_missing_and_unexpected_for_lora
    from torchtune.training import FullModelHFCheckpointer
    resume = Path(scratch) / "resume"
    shutil.rmtree(resume, ignore_errors=True)
    shutil.copytree(out, resume)
    torch.save({}, resume / "recipe_state.pt")
    arch = row["arch"]
    ck = FullModelHFCheckpointer(checkpoint_dir=str(base), checkpoint_files=["model.safetensors"],
                                 model_type=C.ARCHS[arch]["tt_model_type"], output_dir=str(resume),
                                 adapter_checkpoint="adapter_model.pt", recipe_checkpoint="recipe_state.pt",
                                 should_load_recipe_state=True)
    sd = ck.load_checkpoint()
    recipe = json.loads((Path(out) / "adapter_config.json").read_text())["recipe"]
    lora = {k: recipe[k] for k in ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
                                   "lora_alpha")}
    lora["use_dora"] = bool(recipe.get("use_dora"))
    cfg = json.loads((Path(base) / "config.json").read_text())
    model = tt_model(arch, lora, cfg)
    base_missing, base_unexpected = model.load_state_dict(sd[training.MODEL_KEY], strict=False)
    for m in model.modules():
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()
    tokens = torch.tensor([C.INPUT_IDS])
    model.eval()
    with torch.no_grad():
        base_logits = model(tokens)[0].float().numpy()
    lora_missing, lora_unexpected = model.load_state_dict(sd[training.ADAPTER_KEY], strict=False)
    validate_missing_and_unexpected_for_lora(
        lora_attn_modules=lora["lora_attn_modules"], apply_lora_to_mlp=lora["apply_lora_to_mlp"],
        apply_lora_to_output=lora["apply_lora_to_output"], base_missing=base_missing,
        base_unexpected=base_unexpected, lora_missing=lora_missing, lora_unexpected=lora_unexpected)
    with torch.no_grad():
        got = model(tokens)[0].float().numpy()
    return got, maxdiff(base_logits, ref_base), {"recipe": recipe}


def load_peft(row, out, base, ref_base):
    from peft import PeftModel
    arch = row["arch"]
    pm = PeftModel.from_pretrained(hf_model(C.ARCHS[arch], C.MODEL_SEED, base), str(out)).eval()
    noise = maxdiff(hf_logits(hf_model(C.ARCHS[arch], C.MODEL_SEED, base), C.INPUT_IDS), ref_base)
    return hf_logits(pm, C.INPUT_IDS), noise, {}


def task_load_check(job):
    from safetensors.numpy import load_file
    out = []
    for i, item in enumerate(job["items"]):
        row = item["row"]
        print(f"torchtune load_check {row['case']} -> {row['target']} ({row['load']})", flush=True)
        case_dir = Path(item["case_dir"])
        base = case_dir.parent / "_base" / row["arch"]
        stored = load_file(str(case_dir / "logits.safetensors"))
        ref = stored[row["ref"]]
        res = {"adapter": "default", "load": row["load"]}
        try:
            if row["load"] == "torchtune":
                got, noise, extra = load_torchtune(row, item["out"], base, Path(job["work"]) / "scratch" /
                                                   "torchtune" / f"accept{i:02d}", stored[row["ref_base"]])
            else:
                got, noise, extra = load_peft(row, item["out"], base, stored[row["ref_base"]])
            d = maxdiff(got, ref)
            res.update(extra, max_abs_diff=fmt(d), noise=fmt(noise), max_abs_logit=max_abs(ref),
                       tol=fmt(rows_tol(ref, noise)))
            if d > rows_tol(ref, noise):
                res["error"] = f"logits off by {fmt(d)} > tolerance {res['tol']}"
        except Exception as e:  # noqa: BLE001 - the loader's refusal is the result
            res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        out.append([res])
    return {"items": out}


if __name__ == "__main__" and sys.argv[1:2] == ["load_check"]:
    write_json(sys.argv[3], task_load_check(json.loads(Path(sys.argv[2]).read_text())))
elif __name__ == "__main__":
    run_main({"generate": task_generate, "peft_load": task_peft_load}, {"base": task_base}, report,
             lambda env: versions(TT_VERSIONS if env == "torchtune061" else PF21_VERSIONS))
