"""AdapterHub family worker: runs INSIDE an env's venv (``<venv>/bin/python worker.py TASK JOB.json RESULT.json``,
started by golden/harness.py). Top level is stdlib-only; torch/transformers/adapters are imported by the tasks.

Tasks: ``generate`` (write the job's cases), ``check`` (base rebuild + cross-loading in this env), ``load_check``
(load converted outputs, compare logits), ``report`` (FINDINGS markdown from the results; run by the system python).

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
    <env>/pip-freeze.txt          the exact package set the case was made with (written by the harness)

Rebuilding a base (what a consumer must do):
``Cls(ConfigCls(**json.load(config.json)))`` then ``model.load_state_dict(load_file(model.safetensors),
strict=False)``; ``check`` verifies in every env that this reproduces ``base_logits``. The ad13 ``check`` also
records in each ``same_as`` case's meta.json how adapters 1.3.0 loads the adapters 1.0.1 original.

Workarounds needed: none for adapter-transformers 3.1.0 under torch 2.13 (imports, add_adapter, forward,
save_adapter, save_pretrained, load_adapter and merge_adapter all work; ``torch.load``'s
``weights_only=True`` default is harmless because adapter files are plain dicts of tensors). The at31 env
has no ``safetensors`` package, so safetensors files there are written by ``_write_safetensors`` below
(the format is an 8-byte little-endian header length, a JSON header, then raw little-endian bytes).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from cases import ADAPTER_SEED, ARCHS, CASES, ENV_ARCHS, ENVS, LORA_STD, MODEL_SEED, TOL

GOLDEN = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(GOLDEN))
from harness import capture_io, fmt as _fmt, maxdiff as _maxdiff, serve_worker  # noqa: E402


def base_rel(case: str) -> str:
    return "../_base/" + CASES[case]["arch"]


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
    captured = capture_io(model, lambda mod: getattr(mod, "loras", None) is not None and name in mod.loras,
                          lambda: lib.logits(model, inputs))
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
    for case in job["cases"]:
        if CASES[case].get("full") or CASES[case]["arch"] not in ENV_ARCHS[lib.env]:
            continue
        res["crossload"][case] = _crossload(lib, case)
        if (GOLDEN / case / "adapter" / "adapter.safetensors").exists():
            # what a user gets with a plain load_adapter(dir) (no use_safetensors=True)
            res["crossload"][case + " (plain load_adapter)"] = _crossload(lib, case, auto_kwargs=False)
    # 3. a case made again in this env from the same recipe as an older one (``same_as``): record in its meta.json
    # how this env loads the older original
    for case in job["cases"]:
        src = CASES[case].get("same_as")
        if not src or case.split("/")[0] != lib.env:
            continue
        src_env = ENVS[src.split("/")[0]]
        meta_p = GOLDEN / case / "meta.json"
        meta = json.loads(meta_p.read_text())
        rec = res["crossload"].get(src) or _crossload(lib, src)
        meta["measured"]["load_" + src.replace("/", "_") + "_in_" + f"{lib.library} {lib.library_version}".replace(
            " ", "_").replace(".", "_")] = {
            "what": f"golden/{src}/adapter loaded with {lib.library} {lib.library_version} load_adapter (base from "
                    f"golden/{src}), logits compared with golden/{src} logits (made by {src_env['library']} "
                    f"{src_env['library_version']})",
            **rec}
        meta_p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return res


def _crossload(lib: Lib, case: str, auto_kwargs: bool = True) -> dict:
    try:
        return _load_and_compare(lib, case, GOLDEN / case / "adapter", "logits", auto_kwargs=auto_kwargs)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def w_load_check(lib: Lib, job: dict) -> dict:
    """Each item (one acceptance row): load every adapter of the converted ``out`` (``out/<name>`` for the
    multi-adapter case) with load_adapter and compare with the golden logits; one result per adapter."""
    items = []
    for it in job["items"]:
        names = [n for n, _, _ in CASES[it["case"]]["adapters"]]
        per = []
        for name in names:
            try:
                adir = Path(it["out"]) / name if len(names) > 1 else Path(it["out"])
                if not (adir / "adapter_config.json").exists():
                    raise FileNotFoundError(f"no adapter_config.json in {adir}")
                r = _load_and_compare(lib, it["case"], adir, "logits_" + name if len(names) > 1 else "logits")
                per.append({"adapter": name, **{k: r[k] for k in ("max_abs_diff", "loaded_name", "load_kwargs")}})
            except Exception as e:  # noqa: BLE001
                per.append({"adapter": name, "max_abs_diff": None, "error": f"{type(e).__name__}: {e}"[:500]})
        items.append(per)
    return {"items": items}
# ==================================================================================================
# report: FINDINGS markdown (runs with any python; no torch)
# ==================================================================================================
def _keys_across(section: dict, envs: list, order: list) -> list:
    """The keys of section[env] for every env, in first-seen order, each env's keys in the order of ``order`` (the
    order the checks made them in, whatever the order of the results file)."""
    rank = {k: i for i, k in enumerate(order)}
    return list(dict.fromkeys(k for e in envs for k in sorted(section[e], key=lambda k: rank.get(k, len(rank)))))




def _in_case_order(section: dict) -> list:
    return [(c, section[c]) for c in CASES if c in section]


def w_report(job: dict) -> dict:
    """FINDINGS markdown, generated from the results' checks, so every number in it was measured by ``generate``."""
    checks = job["results"]["checks"]
    L = []
    a = L.append
    ev = checks["env_versions"]
    a("# Measured facts (generated by `golden/harness.py generate --family adapterhub`; do not edit)\n")
    a(f"Date: {checks['date']}. Tolerance for \"same\": max |Δlogit| <= {TOL:g}. Tiny random models (seed "
      f"{MODEL_SEED}); LoRA A/B ~ N(0, {LORA_STD}²), (IA)³ l ~ 1 + N(0, {LORA_STD}²). All numbers are fp32 on CPU, "
      "torch 2.13.0.\n")
    a("| env | library | transformers | torch |")
    a("|---|---|---|---|")
    for env in ENVS:  # in ENVS order, whatever the order of the results file
        v = ev[env]
        a(f"| {env} | {v['library']} {v['library_version']} | {v['transformers']} | {v['torch']} |")
    a("")

    a("## 1. Effective LoRA scale per layer class, measured inside the forward pass\n")
    a("For every LoRA-wrapped layer, a forward hook captured input x and output y with the adapter active "
      "(unmerged). With y0 = the host layer's own linear map of x and d = x·Aᵀ·Bᵀ (per q/k/v block for fused "
      "layers), the scale is s = <y−y0, d>/<d, d>; the residual |y−y0−s·d|/|y−y0| shows y−y0 really is s·d. "
      "For (IA)³ the factor is s = mean((y/y0)/l).\n")
    a("| case | alpha/r | layer class | layers | measured scale(s) | max residual |")
    a("|---|---|---|---|---|---|")
    for case, m in _in_case_order(checks["cases"]):
        for aname, per in m.get("effective_scale", {}).items():
            for cls, info in sorted(per.items()):
                a(f"| {case} ({aname}) | {_fmt(info.get('alpha_over_r'))} | {cls} | {info['count']} | "
                  f"{', '.join(_fmt(s) for s in info['scales'])} | {_fmt(info['max_residual'])} |")
    a("")

    a("## 2. Merged (merge_adapter) vs unmerged logits, in the producing library\n")
    a("| case | max abs diff merged vs unmerged | note |")
    a("|---|---|---|")
    for case, m in _in_case_order(checks["cases"]):
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
    for c in _keys_across(checks["crossload"], envs, [k for c in CASES for k in (c, c + " (plain load_adapter)")]):
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
    for b in _keys_across(checks["base_rebuild"], envs, [f"{c.split('/')[0]}/_base/{CASES[c]['arch']}" for c in CASES]):
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
    return {"markdown": "\n".join(L) + "\n"}



if __name__ == "__main__":
    serve_worker({"generate": w_generate, "check": w_check, "load_check": w_load_check, "report": w_report}, Lib,
                 seed=MODEL_SEED)
