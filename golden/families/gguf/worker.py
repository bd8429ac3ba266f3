#!/usr/bin/env python3
"""gguf family worker: runs INSIDE the llamacpp venv (torch, transformers, peft, gguf, llama-cpp-python).

    <venv>/bin/python golden/families/gguf/worker.py TASK JOB.json RESULT.json

TASK ``base``     : build the tiny base (transformers, from cases.ARCHS, seeded), save it in HF layout with a tiny
                    sentencepiece tokenizer trained here, convert it with llama.cpp's ``convert_hf_to_gguf.py`` (f32),
                    record the GGUF layout, whether q/k rows are permuted (measured and from the converter's code),
                    and transformers vs llama.cpp base logits.
TASK ``generate`` : one case: a PEFT adapter written by peft, PEFT logits, ``convert_lora_to_gguf.py`` output and the
                    llama.cpp runtime's logits with it, a hand-written adapter (GGUFWriter) with the exact scale and
                    its runtime logits.
TASK ``report``   : FINDINGS_GGUF.md from results/gguf.json (system python3).

golden/harness.py runs it (stages base, generate; see worker_util.run_main for the job each task gets);
llama.cpp's scripts are read from the sdist the env's setup unpacked in GOLDEN_WORK (job "work").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_util import (close, fmt, hf_logits, hf_model, load_cases, max_abs, maxdiff,  # noqa: E402
                         report_head, run_main, save_hf_base, table, versions, write_json)

C = load_cases(__file__)

if sys.argv[1:2] != ["report"]:  # report runs with the system python3
    import numpy as np
    import torch

    torch.set_num_threads(2)

# --------------------------------------------------------------------------------------------------- helpers


def llamacpp_dir(job):
    """vendor/llama.cpp of the sdist unpacked by the env's setup step."""
    return Path(job["work"]) / C.SDIST / "vendor" / "llama.cpp"


def _versions():
    import gguf
    import llama_cpp
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "gguf": versions(["gguf"])["gguf"], "llama_cpp_python": llama_cpp.__version__,
            "llama.cpp": "0c1e57098 (vendored by llama-cpp-python 0.3.36, its CHANGELOG)",
            "gguf_module_file": Path(gguf.__file__).parent.name}










def llama_logits(model_path, lora_path=None, lora_scale=1.0):
    """Logits of the real llama.cpp runtime on C.INPUT_IDS (f32 KV cache, no flash attention)."""
    from llama_cpp import GGML_TYPE_F32, Llama
    kw = {"lora_path": str(lora_path), "lora_scale": lora_scale} if lora_path else {}
    llm = Llama(model_path=str(model_path), logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                n_threads_batch=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False,
                use_mmap=False, **kw)
    try:
        llm.eval(C.INPUT_IDS)
        return np.array(llm.scores[: len(C.INPUT_IDS)], dtype=np.float32).copy()
    finally:
        llm.close()


def _field_value(field):
    import gguf
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        n = len(field.data)
        sub = field.types[-1].name if len(field.types) > 1 else "?"
        if n > 16:
            return {"array_of": sub, "len": n}
        return field.contents()
    return field.contents()


def gguf_layout(path):
    """Metadata (keys, types, small values) and tensors (name, ne, ggml type, numpy shape) as gguf.GGUFReader reads them."""
    import gguf
    r = gguf.GGUFReader(str(path))
    meta = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = {"type": "/".join(t.name for t in f.types), "value": _field_value(f)}
    tensors = [{"name": t.name, "ne": [int(x) for x in t.shape], "type": t.tensor_type.name,
                "numpy_shape": [int(x) for x in t.data.shape]} for t in r.tensors]
    return {"metadata": meta, "tensors": tensors}


def gguf_tensors(path):
    import gguf
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        arr = np.array(t.data)
        if t.tensor_type.name in ("F32", "F16"):
            arr = arr.astype(np.float32)
        out[t.name] = arr
    return out


def permute_rows(b, n_head):
    """llama.cpp's LlamaModel.permute on the rows of a (out, r) lora_b: per head, interleave the two rotary halves."""
    out, r = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, r).swapaxes(1, 2).reshape(out, r)


def train_spm(scratch, vocab_size):
    """A tiny sentencepiece model trained here (no download); convert_hf_to_gguf pads the vocab to vocab_size."""
    import sentencepiece as spm
    text = Path(scratch) / "spm_corpus.txt"
    words = ["low", "lower", "newest", "widest", "tiny", "model", "adapter", "lora", "rank", "alpha", "gguf", "llama"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    text.write_text("\n".join(lines) + "\n")
    prefix = Path(scratch) / "spm"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="bpe", num_threads=1, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    return Path(str(prefix) + ".model")


def converter_code_facts(llamacpp_dir, model_class):
    """What convert_hf_to_gguf's code says about q/k for this HF architecture (class, base classes, undo_permute)."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + '/gguf-py')\n"
        "from conversion import get_model_class\nfrom conversion.llama import LlamaModel\n"
        "c = get_model_class(sys.argv[2])\n"
        "print(json.dumps({'class': c.__name__, 'module': c.__module__, 'mro': [k.__name__ for k in c.__mro__][:6],"
        " 'is_LlamaModel': issubclass(c, LlamaModel), 'undo_permute': getattr(c, 'undo_permute', None)}))\n")
    p = subprocess.run([sys.executable, "-c", code, str(llamacpp_dir), model_class], capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _run(cmd, cwd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=str(cwd))
    err = [ln for ln in (p.stderr + p.stdout).splitlines() if "rror" in ln or "Unexpected" in ln or "not supported" in ln]
    return p.returncode, err[-3:], (p.stderr + p.stdout)[-2000:]


# ------------------------------------------------------------------------------------------------------ base


def task_base(job):
    from safetensors.numpy import save_file
    arch = job["arch"]
    a = C.ARCHS[arch]
    base_dir, scratch, lcpp = Path(job["base_dir"]), Path(job["scratch"]), llamacpp_dir(job)
    base_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    save_hf_base(hf_model(a, C.MODEL_SEED), arch, a, base_dir)
    tok = train_spm(scratch, 64)
    (base_dir / "tokenizer.model").write_bytes(tok.read_bytes())
    out = base_dir / "base-f32.gguf"
    rc, err, tail = _run([sys.executable, lcpp / "convert_hf_to_gguf.py", base_dir, "--outtype", "f32",
                          "--outfile", out], scratch)
    (base_dir / "tokenizer.model").unlink()  # only convert_hf_to_gguf needs it; it holds scratch paths
    if rc:
        raise SystemExit(f"convert_hf_to_gguf failed: {tail}")
    model = hf_model(a, C.MODEL_SEED, base_dir)  # the committed files, as every case rebuilds it
    ref = hf_logits(model, C.INPUT_IDS)
    got = llama_logits(out)
    layout = gguf_layout(out)
    gt = gguf_tensors(out)
    cfgd = a["config"]
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    gq, gk = gt["blk.0.attn_q.weight"], gt["blk.0.attn_k.weight"]
    measured = {
        "attn_q_equals_hf": bool(np.array_equal(gq, q)),
        "attn_q_equals_permuted_n_head": bool(np.array_equal(gq, permute_rows(q, cfgd["num_attention_heads"]))),
        "attn_k_equals_hf": bool(np.array_equal(gk, k)),
        "attn_k_equals_permuted_n_kv_head": bool(np.array_equal(gk, permute_rows(k, cfgd["num_key_value_heads"]))),
    }
    permutes = measured["attn_q_equals_permuted_n_head"] and not measured["attn_q_equals_hf"]
    meta = {
        "arch": arch, "versions": _versions(), "config": cfgd, "input_ids": C.INPUT_IDS,
        "gguf_layout": layout,
        "qk_permutation": {"measured": measured, "permutes_qk": permutes,
                           "converter_code": converter_code_facts(lcpp, a["model_class"])},
        "base_logits_llamacpp_vs_transformers": fmt(maxdiff(got, ref)),
    }
    save_file({"logits_transformers": ref, "logits_llamacpp": got}, str(base_dir / "logits.safetensors"))
    write_json(base_dir / "meta.json", meta)
    return {"arch": arch, "ok": close(maxdiff(got, ref), ref, C.REL_TOL["f32"]), "max_abs_logit": max_abs(ref),
            "permutes_qk": permutes, "qk_measured": measured,
            "converter_code": meta["qk_permutation"]["converter_code"],
            "base_logits_llamacpp_vs_transformers": meta["base_logits_llamacpp_vs_transformers"],
            "n_tensors": len(layout["tensors"])}


# -------------------------------------------------------------------------------------------------- generate


def _peft_model(arch, base_dir, lora, std):
    from peft import LoraConfig, get_peft_model
    model = hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir)
    base = hf_logits(model, C.INPUT_IDS)
    pm = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(C.LORA_SEED)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if any(s in name for s in ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.eval()
    return pm, base


def module_scales(pm):
    """PEFT's own per-module scale (layer.scaling['default']) and rank, keyed by the HF module name."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            out[name] = {"scale": float(mod.scaling["default"]), "r": int(mod.r["default"])}
    return out


def write_handwritten(path, arch, base_meta, adapter_sd, scales):
    """The target layout, written with gguf's GGUFWriter from PEFT's tensors: names from gguf's tensor-name map,
    PEFT's bytes (lora_a ne=[in,r], lora_b ne=[r,out]), q/k lora_b rows permuted when the base GGUF permutes them,
    token_embd lora_a transposed. One alpha when s·r is the same for every module (alpha = s·r), else each module's
    scale folded into lora_b and alpha = 0."""
    import gguf
    cfg = C.ARCHS[arch]["config"]
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[C.ARCHS[arch]["gguf_arch"]]
    tmap = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    permute = base_meta["qk_permutation"]["permutes_qk"]
    sr = {round(v["scale"] * v["r"], 9) for v in scales.values()}
    mode = "alpha" if len(sr) == 1 else "fold"
    alpha = float(next(iter(sr))) if mode == "alpha" else 0.0
    pairs = {}
    for key, t in adapter_sd.items():
        mod = key.removeprefix("base_model.model.")
        for suf, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                           (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB")):
            if mod.endswith(suf):
                pairs.setdefault(mod[: -len(suf)], {})[which] = t.astype(np.float32)
    w = gguf.GGUFWriter(str(path), C.ARCHS[arch]["gguf_arch"])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for mod in sorted(pairs):
        p = pairs[mod]
        name = tmap.get_name(mod + ".weight", try_suffixes=(".weight",))
        assert name, mod
        s = scales[mod]["scale"] if mode == "fold" else 1.0
        if "EA" in p:  # embedding: delta (vocab, dim) = (B_e @ A_e).T
            a, b = p["EA"].T.copy(), p["EB"] * s
        else:
            a, b = p["A"], p["B"] * s
            if permute and name.endswith("attn_q.weight"):
                b = permute_rows(b, cfg["num_attention_heads"])
            elif permute and name.endswith("attn_k.weight"):
                b = permute_rows(b, cfg["num_key_value_heads"])
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"mode": mode, "alpha": alpha, "permuted_qk": permute}


def task_generate(job):
    from safetensors.numpy import load_file, save_file
    case, d = job["case"], job["data"]
    arch = d["arch"]
    base_dir, case_dir, scratch = Path(job["base_dir"]), Path(job["case_dir"]), Path(job["scratch"])
    lcpp = llamacpp_dir(job)
    case_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    base_meta = json.loads((base_dir / "meta.json").read_text())
    pm, base = _peft_model(arch, base_dir, d["lora"], d["lora_std"])
    ref = hf_logits(pm, C.INPUT_IDS)
    pm.save_pretrained(str(case_dir / "adapter"))
    save_file({"logits": ref, "base_logits": base}, str(case_dir / "logits.safetensors"))
    write_json(case_dir / "input.json", {"input_ids": C.INPUT_IDS})
    scales = module_scales(pm)
    adapter_sd = load_file(str(case_dir / "adapter" / "adapter_model.safetensors"))
    facts = {"case": case, "arch": arch, "lora": d["lora"], "outtype": d["outtype"], "versions": _versions(),
             "base": "../_base/" + arch, "lora_effect": fmt(maxdiff(ref, base)),
             "peft_scales": {k: v for k, v in sorted(scales.items())},
             "max_abs_logit": max_abs(ref), "rel_tolerance": C.REL_TOL[d["outtype"]]}
    # llama.cpp's own converter
    out = case_dir / f"llamacpp-{d['outtype']}.gguf"
    rc, err, tail = _run([sys.executable, lcpp / "convert_lora_to_gguf.py", case_dir / "adapter", "--base", base_dir,
                          "--outtype", d["outtype"], "--outfile", out], scratch)
    conv = {"returncode": rc, "messages": err}
    if rc == 0:
        layout = gguf_layout(out)
        got = llama_logits(base_dir / "base-f32.gguf", out)
        conv.update(layout=layout, runtime_vs_peft=fmt(maxdiff(got, ref)))
        conv["runtime_matches_peft"] = close(maxdiff(got, ref), ref, C.REL_TOL[d["outtype"]])
        save_file({"logits_llamacpp_converted": got}, str(case_dir / "runtime_logits.safetensors"))
    facts["convert_lora_to_gguf"] = conv
    # the hand-written target
    if d["expect"] == "ok":
        hw = case_dir / "handwritten-f32.gguf"
        info = write_handwritten(hw, arch, base_meta, adapter_sd, scales)
        got_hw = llama_logits(base_dir / "base-f32.gguf", hw)
        info["runtime_vs_peft"] = fmt(maxdiff(got_hw, ref))
        info["runtime_matches_peft"] = close(maxdiff(got_hw, ref), ref, C.REL_TOL["f32"])
        info["layout"] = gguf_layout(hw)
        if rc == 0:  # same tensor names as llama.cpp's converter; same bytes where nothing was folded
            mine, theirs = gguf_tensors(hw), gguf_tensors(out)
            info["same_tensor_names_as_converter"] = sorted(mine) == sorted(theirs)
            if d["outtype"] == "f32" and info["mode"] == "alpha" and info["same_tensor_names_as_converter"]:
                info["tensors_identical_to_converter"] = all(np.array_equal(mine[k], theirs[k]) for k in mine)
        facts["handwritten"] = info
        logits = dict(load_file(str(case_dir / "runtime_logits.safetensors"))) if rc == 0 else {}
        logits["logits_llamacpp_handwritten"] = got_hw
        save_file(logits, str(case_dir / "runtime_logits.safetensors"))
    write_json(case_dir / "meta.json", facts)
    res = {"case": case, "arch": arch, "expect": d["expect"], "lora_effect": facts["lora_effect"],
           "max_abs_logit": facts["max_abs_logit"],
           "converter_rc": rc, "converter_messages": err}
    if rc == 0:
        res["converter_runtime_vs_peft"] = conv["runtime_vs_peft"]
        res["converter_matches_peft"] = conv["runtime_matches_peft"]
        res["converter_alpha"] = layout["metadata"].get("adapter.lora.alpha", {}).get("value")
    if "handwritten" in facts:
        hw_info = facts["handwritten"]
        res.update({k: hw_info[k] for k in ("mode", "alpha", "runtime_vs_peft", "runtime_matches_peft")
                    if k in hw_info})
        res["handwritten_identical_to_converter"] = hw_info.get("tensors_identical_to_converter")
    res["ok"] = (rc != 0) if d["expect"] == "refused" else bool(res.get("runtime_matches_peft"))
    return res


# -------------------------------------------------------------------------------------------------- load_check


def logits_tolerance(ref, base, outtype, noise):
    """tests/tolerance.py's model for float32 (192 unit roundoffs of the largest logit + 4 × the noise floor: here
    llama.cpp's base logits against transformers'); f16/bf16: REL_TOL of the largest logit; q8_0: the check's
    bound on ΔW, (2ε + ε²) with ε = C.Q8_0_ERROR per factor, times the LoRA's effect on the logits (max |PEFT −
    base|), on top of the float32 tolerance."""
    big = float(np.max(np.abs(ref)))
    f32 = C.ULPS * 2.0**-24 * big + C.NOISE_FACTOR * noise
    if outtype == "f32":
        return f32
    if outtype == "q8_0":
        eps = C.Q8_0_ERROR
        return (2 * eps + eps * eps) * float(np.max(np.abs(ref - base))) + f32
    return C.REL_TOL[outtype] * big


def task_load_check(job):
    """Each acceptance item: a GGUF written by the converter run in the real llama.cpp on its case's base GGUF
    (f32), or a PEFT folder converted from a GGUF loaded with PeftModel; logits against the case's PEFT logits."""
    from safetensors.numpy import load_file
    items = []
    for it in job["items"]:
        row, cdir = it["row"], Path(it["case_dir"])
        meta = json.loads((cdir / "meta.json").read_text())
        base_dir = (cdir / meta["base"]).resolve()
        logits = load_file(str(cdir / "logits.safetensors"))
        ref = logits["logits"]
        outtype = row.get("outtype", "f32")
        try:
            if row["target"] == "gguf":
                out = Path(it["out"] + ".gguf")
                got = llama_logits(base_dir / "base-f32.gguf", out)
                noise = json.loads((base_dir / "meta.json").read_text())["base_logits_llamacpp_vs_transformers"]
                lay = gguf_layout(out)
                extra = {"runtime": "llama.cpp", "alpha": lay["metadata"]["adapter.lora.alpha"]["value"],
                         "types": sorted({t["type"] for t in lay["tensors"]})}
            else:  # gguf -> PEFT, loaded by peft on the transformers base
                from peft import PeftModel
                got = hf_logits(PeftModel.from_pretrained(hf_model(C.ARCHS[meta["arch"]], C.MODEL_SEED, base_dir),
                                                          it["out"]).eval(), C.INPUT_IDS)
                noise, extra = 0.0, {"runtime": "peft"}
            d = maxdiff(got, ref)
            items.append([{"adapter": "-", "max_abs_diff": d, "tolerance": logits_tolerance(ref, logits["base_logits"], outtype, noise),
                           "max_abs_logit": max_abs(ref), **extra}])
        except Exception as e:  # noqa: BLE001
            items.append([{"adapter": "-", "max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:500]}])
    return {"items": items}


# ---------------------------------------------------------------------------------------------------- report


def report(job):
    res, lines = report_head(job, "llama.cpp GGUF LoRA", (
        "Measured in the real runtime: llama-cpp-python 0.3.36 (compiled from its sdist, llama.cpp 0c1e57098), "
        "its vendored `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`, gguf 0.19.0, peft 0.21.2, "
        "float32 on CPU. Figures are max |logit difference| on 12 fixed token ids; `effect` is max |PEFT logits "
        "− base logits| (how large the LoRA's effect is). Do not edit by hand."))
    lines += ["## Bases", ""]
    rows = []
    for k, r in sorted(res.items()):
        if "/_base/" in k:
            cc = r.get("converter_code", {})
            rows.append([k, r.get("base_logits_llamacpp_vs_transformers"), r.get("permutes_qk"),
                         f"{cc.get('class')} (LlamaModel subclass: {cc.get('is_LlamaModel')}, "
                         f"undo_permute: {cc.get('undo_permute')})", r.get("n_tensors")])
    lines += table(["base", "llama.cpp vs transformers", "GGUF permutes q/k rows (measured)",
                    "convert_hf_to_gguf class", "tensors"], rows)
    lines += ["", "`permutes q/k` is measured on the base GGUF: `blk.0.attn_q.weight` equals HF `q_proj` with rows "
              "permuted per head (n_head; `attn_k` with n_kv_head), `reshape(n, 2, out/n/2, in).swapaxes(1, 2)`.",
              "", "## Adapters", ""]
    rows = []
    for k, r in sorted(res.items()):
        if "/_base/" in k:
            continue
        conv = ("refused: " + "; ".join(r.get("converter_messages", [])[-1:]) if r.get("converter_rc")
                else f"{r.get('converter_runtime_vs_peft')} (alpha {r.get('converter_alpha')})")
        hw = (f"{r.get('runtime_vs_peft')} ({r.get('mode')}, alpha {_num(r.get('alpha'))})" if "mode" in r else "—")
        rows.append([k, r.get("lora_effect"), conv, hw, r.get("handwritten_identical_to_converter"),
                     "ok" if r.get("ok") else "FAILED"])
    lines += table(["case", "effect", "convert_lora_to_gguf → llama.cpp vs PEFT",
                    "hand-written → llama.cpp vs PEFT", "hand-written bytes = converter's", "as expected"], rows)
    lines += ["", "Hand-written = gguf.GGUFWriter from PEFT's tensors: names from `gguf.get_tensor_name_map`, "
              "lora_a = A (ne=[in, r]), lora_b = B (ne=[r, out]), q/k lora_b rows permuted for the archs whose GGUF "
              "permutes, token_embd lora_a = Aᵀ; `alpha` mode writes adapter.lora.alpha = s·r (rsLoRA: α·√r), "
              "`fold` multiplies each lora_b by its PEFT scale and writes alpha = 0 (runtime scale = alpha/rank, "
              "or 1 when alpha is 0)."]
    lines += acceptance_section(job["results"].get("acceptance") or {})
    return {"markdown": "\n".join(lines + layout_section(res, Path(job["data_dir"]))).rstrip() + "\n"}


def acceptance_section(acc):
    """The converter's outputs run in the real llama.cpp (and GGUF → PEFT loaded by peft): results/gguf.json."""
    recs = acc.get("records") or []
    if not recs:
        return []
    rows = [[r["case"], r["source"], r["target"] + (f" {r['outtype']}" if r.get("outtype") not in (None, "f32")
                                                    else ""),
             r.get("runtime", "—"), r["expect"], r["exit_code"], _num(r.get("max_abs_diff")),
             _num(r.get("tolerance")), r["status"] + (f": {r['message'][:80]}" if r.get("message") else "")]
            for r in recs]
    return ["", f"## Acceptance: the converter's outputs in the real runtime ({acc.get('date')})", "",
            f"Converter: `{acc.get('converter')}`; {acc.get('summary')}. Tolerance: float32 tests/tolerance.py's model "
            "(192·2⁻²⁴·max|logit| + 4 × llama.cpp's base-logit noise); f16/bf16 REL_TOL·max|logit|; q8_0 "
            "(2ε + ε²)·(LoRA effect) + the float32 term, ε = √32·(1/254 + 2⁻¹¹) per factor.", ""] + table(
        ["case", "source", "target", "runtime", "expect", "exit", "max abs Δlogit", "tolerance", "status"], rows)


def layout_section(res, data_dir):
    """The converter's file layout, from the recorded meta.json of the cases (metadata keys, tensor ne/types)."""
    lines = ["", "## Layout written by convert_lora_to_gguf.py (read back with gguf.GGUFReader)", ""]
    for key in sorted(res):
        meta_path = data_dir / key / "meta.json"
        if "/_base/" in key or not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        lay = meta["convert_lora_to_gguf"].get("layout")
        if not lay or key.split("/")[-1] not in ("llama_embed", "llama_patterns", "llama_f16"):
            continue
        md = ", ".join(f"`{k}` {v['type']} = {v['value']}" for k, v in sorted(lay["metadata"].items()))
        ts = "; ".join(f"`{t['name']}` ne={t['ne']} {t['type']}" for t in lay["tensors"][:8])
        lines += [f"- {key}: metadata {md}", f"  - tensors ({len(lay['tensors'])}): {ts}" +
                  (" …" if len(lay["tensors"]) > 8 else "")]
    return lines


def _num(x):
    return f"{x:.6g}" if isinstance(x, float) else x


if __name__ == "__main__":
    if sys.argv[1:2] == ["load_check"]:  # the harness's accept (golden/harness.py accept_family)
        write_json(sys.argv[3], task_load_check(json.loads(Path(sys.argv[2]).read_text())))
        raise SystemExit(0)
    run_main({"generate": task_generate}, {"base": task_base}, report, lambda env: _versions())
