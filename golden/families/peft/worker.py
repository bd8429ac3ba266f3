"""PEFT family worker: runs INSIDE an env's venv (``<venv>/bin/python worker.py TASK JOB.json RESULT.json``,
started by golden/harness.py). Top level is stdlib-only; torch/transformers/peft are imported by the tasks.

Tasks: ``generate`` (write the job's cases), ``check`` (base rebuild, cross-loading and PROBES in this env),
``load_check`` (load converted outputs, compare logits), ``report`` (FINDINGS markdown; run by the system python).

What ``generate`` writes (cases under golden/peft/, one level below the AdapterHub ones, so that
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
    peft/<env>/pip-freeze.txt      the exact package set the cases were made with (written by the harness)

Rebuilding a base: ``Cls(Cls.config_class(**config.json))`` with ``Cls`` = transformers.<arch.json model_class>,
then ``load_state_dict(load_file(model.safetensors), strict=False)``; ``check`` verifies this in every env. The
conv cases' base (model_class TinyConvNet, not from transformers) is ``tiny_conv.conv_model_class()(**config.json)``,
its input.json holds ``pixel_values``.

Every adapter tensor is overwritten with seeded noise after ``get_peft_model`` (peft starts with B = 0, or
embedding A = 0, which would test nothing): lora_A/B/bias/embedding ~ N(0, 0.2²); DoRA magnitude m ← m·(1 +
N(0, 0.2²)); modules_to_save copies ← copy + N(0, 0.2²); PiSSA/OLoRA A, B ← A, B + N(0, 0.1²) ("training").

``load_check`` loads a converted adapter with ``PeftModel.from_pretrained`` (or, in the AdapterHub envs, with
``adapters`` ``load_adapter``) and a ``fix-merged`` output with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from cases import (ADAPTER_SEED, ADAPTERHUB_ENVS, ARCHS, CASES, DATA_DIR, ENVS, INPUTS, LORA_STD, MODEL_SEED,
                   PROBES, TOL, TRAIN_STD)
from tiny_conv import conv_inputs, conv_model_class

GOLDEN = Path(__file__).resolve().parents[2]
PEFT_GOLDEN = GOLDEN / DATA_DIR
sys.path.insert(0, str(GOLDEN))
from harness import capture_io, fmt as _fmt, maxdiff as _maxdiff, serve_worker  # noqa: E402

def case_dir(case: str) -> Path:
    """golden/peft/<env>/<case>."""
    return PEFT_GOLDEN / case


def adapter_names(case: str) -> list:
    return [n for n, _ in CASES[case]["adapters"]]


def ref_key(case: str, name: str) -> str:
    return "logits" if len(CASES[case]["adapters"]) == 1 else f"logits_{name}"


def case_inputs(case: str) -> dict:
    """input.json of a case: token ids (the case's own "inputs", else INPUTS), or pixel values for the conv model."""
    return conv_inputs() if CASES[case]["arch"] == "conv" else CASES[case].get("inputs", INPUTS)



def _case_meta(case: str) -> dict:
    return json.loads((case_dir(case) / "meta.json").read_text())


def _case_adapters(case: str, cdir: Path) -> list:
    """Adapter names of any golden case (this family's or another's, e.g. AdapterHub's)."""
    if case in CASES:
        return adapter_names(case)
    meta = json.loads((cdir / "meta.json").read_text())
    return list(meta["adapters"]) if meta.get("layout") == "full" else [None]


def _ref_for(case: str, name) -> str:
    if case in CASES:
        return ref_key(case, name)
    return "logits" if name is None else f"logits_{name}"


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
            cls = conv_model_class()
            # peft records type(model).__module__ as auto_mapping.parent_library in adapter_config.json; the conv
            # goldens were first written with the class defined in the generating script, run as __main__
            cls.__module__ = "__main__"
            return cls(**config).eval()
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
             "config_class": type(model.config).__name__ if hasattr(model, "config") else None, "seed": MODEL_SEED,
             **self.versions()},
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
    out = {}
    captured = capture_io(peft_model,
                          lambda mod: isinstance(getattr(mod, "scaling", None), dict) and name in mod.scaling,
                          lambda: w.logits(peft_model, inputs))
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
                # the committed goldens say make_golden_peft.py (this worker's former home): kept byte-identical
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
    for pname, _env, case, edit, base_key in [p for p in PROBES if p[1] == w.env and p[2] in job["cases"]]:
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
    """Each item (one acceptance row): load ``out`` (a converted adapter, every adapter of it, or a repaired full
    model for target fix-merged) and compare with the golden logits; one result per adapter."""
    items = []
    for it in job["items"]:
        case, cdir, row = it["case"], Path(it["case_dir"]), it["row"]
        kind = "hf" if row["target"] == "fix-merged" else ("adapters" if row["env"] in ADAPTERHUB_ENVS else "peft")
        names = ["-"] if kind == "hf" else _case_adapters(case, cdir)
        items.append([{"adapter": name, **_load_one(w, kind, Path(it["out"]), cdir, name,
                                                    "logits" if kind == "hf" else _ref_for(case, name))}
                      for name in names])
    return {"items": items}


def _load_one(w: W, kind: str, out: Path, cdir: Path, name, ref_key: str) -> dict:
    from safetensors.torch import load_file
    try:
        inputs = json.loads((cdir / "input.json").read_text())
        ref = load_file(str(cdir / "logits.safetensors"))[ref_key]
        if kind == "hf":
            model = w.tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
            extra = {}
        else:
            base, _, _ = w.rebuild_base((cdir / json.loads((cdir / "meta.json").read_text())["base"]).resolve())
            adir = out
            if name not in (None, "default") and (out / name / "adapter_config.json").exists():
                adir = out / name
            elif name is not None and not (out / "adapter_config.json").exists() \
                    and (out / name / "adapter_config.json").exists():
                adir = out / name
            if kind == "peft":
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
        return {"max_abs_diff": d, **extra}
    except Exception as e:  # noqa: BLE001
        return {"max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:500]}




# ==================================================================================================
# report: FINDINGS markdown (runs with any python; no torch)
# ==================================================================================================
def _cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r.get("error"):
        return "error: " + r["error"][:90].replace("|", "/").replace("\n", " ")
    return ("same" if r["ok"] else "DIFFERS") + f" ({_fmt(r['max_abs_diff'])})"


def w_report(job: dict) -> dict:
    """FINDINGS markdown, generated from the results' checks, so every number in it was measured by ``generate``."""
    checks = job["results"]["checks"]
    L = []
    a = L.append
    a("# Measured facts about peft (generated by `golden/harness.py generate --family peft`; do not edit)\n")
    a(f"Date: {checks['date']}. \"same\": max |Δlogit| <= {TOL:g}. Tiny random models (seed {MODEL_SEED}); adapter "
      f"tensors ~ N(0, {LORA_STD}²) (see golden/families/peft/worker.py's docstring). fp32 on CPU.\n")
    if checks.get("added"):
        a("Added later with `generate --case` (the other cases untouched): " + ", ".join(
            f"{c} ({d})" for c, d in sorted(checks["added"].items())) + ".\n")
    a("| env | peft | transformers | torch |")
    a("|---|---|---|---|")
    for env in ENVS:  # in ENVS order, whatever order the results file has
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
        r = checks["probes"].get(env, {}).get(pname)
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
    return {"markdown": "\n".join(L) + "\n"}



if __name__ == "__main__":
    serve_worker({"generate": w_generate, "check": w_check, "load_check": w_load_check, "report": w_report}, W)
