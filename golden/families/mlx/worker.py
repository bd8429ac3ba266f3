#!/usr/bin/env python3
"""mlx family worker: runs INSIDE the mlx-lm venv (mlx[cpu], mlx-lm, torch, transformers, peft).

    <venv>/bin/python golden/families/mlx/worker.py TASK JOB.json RESULT.json

TASK ``base``     : the tiny base in HF layout (transformers, seeded; a WordLevel tokenizer built here so that
                    ``mlx_lm.load`` finds one), mlx-lm's base logits vs transformers'. MoE: save_pretrained's layout,
                    and whether mlx-lm reads the module layout (state_dict) too.
TASK ``generate`` : one case (see cases.py): the adapter as mlx-lm writes it, logits through ``mlx_lm.load(...,
                    adapter_path=)``, the equivalent PEFT adapter and its logits, ``mlx_lm fuse`` of the adapter
                    loaded in transformers, and (llama_qv) what this mlx-lm does with an ``alpha`` in the config.
                    A ``"kind": "peft"`` case: the adapter as peft writes it (target_parameters on MoE experts), its
                    logits, and the mlx-lm adapter mapped from it by hand, loaded by ``mlx_lm.load``.
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


def first_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def layer0_layout(named_shapes):
    """{name: shape} of block 0's MoE tensors (of a per-expert layout only expert 0's)."""
    import re
    return {k: list(v) for k, v in sorted(named_shapes) if k.startswith("model.layers.0.")
            and ".self_attn." not in k and "layernorm" not in k and not re.search(r"\.experts\.[1-9]\d*\.", k)}


def save_moe_base(model, arch, a, base_dir, scratch):
    """An MoE base: what transformers' save_pretrained writes (its per-expert layout), config.json = the case data's
    config as for the dense bases (mlx-lm reads rope_theta only at the top level). Measured on the way: whether
    mlx-lm reads the module layout as it is (state_dict: experts fused into gate_up_proj (E, 2I, H))."""
    from mlx_lm import load
    from safetensors import safe_open
    fused = Path(scratch) / "module_layout"
    shutil.rmtree(fused, ignore_errors=True)
    save_hf_base(model, arch, a, fused)
    write_tokenizer(fused, a["config"]["vocab_size"])
    try:
        load(str(fused))
        module_layout = {"mlx_lm_loads": True}
    except Exception as e:  # noqa: BLE001 - the refusal is the fact being recorded
        module_layout = {"mlx_lm_loads": False, "error": first_line(e)}
    module_layout["tensors_block0"] = layer0_layout((k, v.shape) for k, v in model.state_dict().items())
    model.save_pretrained(str(base_dir))
    shutil.copy(fused / "config.json", base_dir / "config.json")
    with safe_open(str(base_dir / "model.safetensors"), "np") as f:
        saved = layer0_layout((k, f.get_slice(k).get_shape()) for k in f.keys())
        n_saved = len(list(f.keys()))
    return {"module_layout (state_dict)": module_layout,
            "saved_layout (save_pretrained)": {"mlx_lm_loads": True, "tensors": n_saved, "tensors_block0": saved}}


def task_base(job):
    from mlx_lm import load
    arch = job["arch"]
    a = C.ARCHS[arch]
    base_dir = Path(job["base_dir"])
    model = hf_model(a, C.MODEL_SEED)
    extra = {}
    if a.get("moe"):
        extra["layouts"] = save_moe_base(model, arch, a, base_dir, job["scratch"])
    else:
        save_hf_base(model, arch, a, base_dir)
    write_tokenizer(base_dir, a["config"]["vocab_size"])
    ref = hf_logits(hf_model(a, C.MODEL_SEED, base_dir), C.INPUT_IDS)
    if a.get("moe"):
        extra["transformers_reload_vs_saved_model"] = fmt(maxdiff(ref, hf_logits(model, C.INPUT_IDS)))
    ours = Path(base_dir).parents[1].name
    if ours != C.PRIMARY_ENV:  # an older era's env: its own folder (its transformers' tokenizer), the same weights
        from safetensors.numpy import load_file
        mine, primary = (load_file(str(b / "model.safetensors")) for b in (
            base_dir, Path(base_dir).parents[2] / C.PRIMARY_ENV / "_base" / arch))
        extra["same_weights_as_" + C.PRIMARY_ENV] = (sorted(mine) == sorted(primary)
                                                     and all(np.array_equal(mine[k], primary[k]) for k in primary))
    mmodel, _ = load(str(base_dir))
    got = mlx_logits(mmodel)
    meta = {"arch": arch, "versions": versions(VERSIONS), "config": a["config"], "input_ids": C.INPUT_IDS,
            "base_logits_mlx_vs_transformers": fmt(maxdiff(got, ref)), **extra}
    write_json(base_dir / "meta.json", meta)
    return {"arch": arch, "ok": close(maxdiff(got, ref), ref, C.REL_TOL["f32"]) and extra.get(
                "same_weights_as_" + C.PRIMARY_ENV, True), "max_abs_logit": max_abs(ref),
            "base_logits_mlx_vs_transformers": meta["base_logits_mlx_vs_transformers"], **extra}


# -------------------------------------------------------------------------------------------------- generate


def mlx_args(d, rel_base):
    """The args dict mlx_lm lora saves (save_config(vars(args))): its parser's namespace, then CONFIG_DEFAULTS for
    every unset key (as mlx_lm.lora.main does), with lora_parameters from the config file. The CLI flags of this
    release: --fine-tune-type/--num-layers (0.19 and later), else --lora-layers and --use-dora (0.13.1–0.18)."""
    from mlx_lm.lora import CONFIG_DEFAULTS, build_parser
    parser = build_parser()
    flags = {o for a in parser._actions for o in a.option_strings}
    if "--fine-tune-type" in flags:
        era = ["--fine-tune-type", d["fine_tune_type"], "--num-layers", str(d["num_layers"])]
    else:
        era = ["--lora-layers", str(d["num_layers"])] + (["--use-dora"] if d["fine_tune_type"] == "dora" else [])
    args = vars(parser.parse_args(["--model", rel_base, "--train", *era, "--adapter-path", "adapter",
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
    model = load_model(Path(base_dir))
    model = model[0] if isinstance(model, tuple) else model  # (model, config) from 0.19 on
    args = mlx_args(d, rel_base)
    mx.random.seed(args["seed"])
    model.freeze()
    # as this release's lora.run calls it (0.13.1: lora_layers, use_dora; later: num_layers, fine_tune_type)
    linear_to_lora_layers(model, args.get("num_layers", args.get("lora_layers")), args["lora_parameters"],
                          use_dora=(args.get("fine_tune_type") == "dora" or bool(args.get("use_dora"))))
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


SCALE_RULES = {"scale": lambda lp: lp["scale"], "scale·alpha/rank": lambda lp: lp["scale"] * lp["alpha"] / lp["rank"]}


def effective_scale(d, lp, rule=None):
    """The scale the case's era is claimed to apply (cases.py "scale_rule", default the absolute scale)."""
    return SCALE_RULES[rule or d.get("scale_rule", "scale")](lp)


def peft_equivalent(arch, base_dir, adapter_dir, args, out_dir, scale=None):
    """PEFT adapter computing what the mlx one computes: per mlx module model.layers.N.<path>, lora_A = lora_aᵀ,
    lora_B = lora_bᵀ, lora_alpha = scale·r (DoRA: lora_magnitude_vector = m); ``scale`` the effective one
    (default lora_parameters.scale)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    w = load_file(str(adapter_dir / "adapters.safetensors"))
    mods = sorted({k.rsplit(".", 1)[0] for k in w})
    lp = args["lora_parameters"]
    scale = lp["scale"] if scale is None else scale
    cfg = LoraConfig(r=lp["rank"], lora_alpha=scale * lp["rank"], target_modules=mods, lora_dropout=0.0,
                     use_dora=args.get("fine_tune_type") == "dora" or bool(args.get("use_dora")))
    pm = get_peft_model(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), cfg)
    with torch.no_grad():
        for m in mods:
            layer = pm.base_model.model.get_submodule(m)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(w[m + ".lora_a"].T.copy()))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(w[m + ".lora_b"].T.copy()))
            if m + ".m" in w:
                mag = layer.lora_magnitude_vector["default"]  # a bare Parameter before peft 0.12
                getattr(mag, "weight", mag).copy_(torch.from_numpy(w[m + ".m"].copy()))
    logits = hf_logits(pm.eval(), C.INPUT_IDS)
    pm.save_pretrained(str(out_dir), save_embedding_layers=False)  # the LoRA only (lm_head cases)
    return logits, {"r": lp["rank"], "lora_alpha": scale * lp["rank"], "target_modules": mods,
                    "use_dora": cfg.use_dora}


def peft_ab(Ae, Be):
    """Per-expert factors (E, r, in), (E, out, r) -> PEFT ParamWrapper's lora_A (E·r, in), expert-major, and lora_B
    (out, r·E), rank-major (golden/families/mlx/moe_probe.py)."""
    return Ae.reshape(-1, Ae.shape[-1]), Be.transpose(1, 2, 0).reshape(Be.shape[1], -1)


def peft_factors_per_expert(wrapper):
    """The inverse of peft_ab for one ParamWrapper: (E, r, in), (E, out, r)."""
    A = wrapper.lora_A["default"].weight.detach().numpy()
    B = wrapper.lora_B["default"].weight.detach().numpy()
    E = wrapper.num_experts
    r = A.shape[0] // E
    return A.reshape(E, r, A.shape[-1]), B.reshape(B.shape[0], r, E).transpose(2, 0, 1)


def param_wrappers(pm):
    """{module name without base_model.model.: ParamWrapper} of a PeftModel (nested ones under …base_layer)."""
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if type(m).__name__ == "ParamWrapper"}


def peft_equivalent_moe(arch, base_dir, adapter_dir, args, out_dir):
    """PEFT adapter computing what an mlx-lm adapter on an MoE model computes. Linear modules: as for the dense
    models (lora_A = lora_aᵀ, lora_B = lora_bᵀ); a router mlx-lm sees as a Linear but transformers 5 keeps as a
    bare weight (TopKRouter): target_parameters <name>.weight, same factors; switch_mlp: target_parameters
    mlp.experts.gate_up_proj (rank 2r: A_e = [A_gate; A_up], B_e block-diagonal, by rank_pattern/alpha_pattern)
    and mlp.experts.down_proj (rank r)."""
    import torch.nn as tnn
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    a = C.ARCHS[arch]
    parent, I = a["moe"]["parent"], a["moe"]["intermediate"]
    w = load_file(str(adapter_dir / "adapters.safetensors"))
    lp = args["lora_parameters"]
    r, s = lp["rank"], lp["scale"]
    hf = hf_model(a, C.MODEL_SEED, base_dir)
    linear, params, experts = {}, {}, {}  # HF name -> (lora_A, lora_B weights)
    for m in sorted({k.rsplit(".", 1)[0] for k in w}):
        la, lb = w[m + ".lora_a"], w[m + ".lora_b"]
        if ".switch_mlp." in m:
            pre, proj = m.split(f".{parent}.switch_mlp.")
            experts.setdefault(f"{pre}.mlp.experts", {})[proj] = (la, lb)
            continue
        name = m.replace(f".{parent}.", ".mlp.")
        ab = (la.T.copy(), lb.T.copy())
        if isinstance(hf.get_submodule(name), tnn.Linear):
            linear[name] = ab
        else:
            params[name + ".weight"] = ab
    for pre, e in experts.items():
        assert sorted(e) == ["down_proj", "gate_proj", "up_proj"], (pre, sorted(e))
        (ag, bg), (au, bu) = e["gate_proj"], e["up_proj"]
        Be = np.zeros((ag.shape[0], 2 * I, 2 * r), np.float32)
        Be[:, :I, :r], Be[:, I:, r:] = bg, bu
        params[pre + ".gate_up_proj"] = peft_ab(np.concatenate([ag, au], axis=1), Be)
        params[pre + ".down_proj"] = peft_ab(*e["down_proj"])
    gu = "mlp.experts.gate_up_proj"
    pattern = {"rank_pattern": {gu: 2 * r}, "alpha_pattern": {gu: 2 * r * s}} if experts else {}
    cfg = LoraConfig(r=r, lora_alpha=s * r, target_modules=sorted(linear), target_parameters=sorted(params),
                     lora_dropout=0.0, **pattern)
    pm = get_peft_model(hf, cfg)
    wrappers = param_wrappers(pm)
    assert len(wrappers) == len(params), (sorted(wrappers), sorted(params))
    with torch.no_grad():
        for name, (A, B) in linear.items():
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        for mname, wr in wrappers.items():
            A, B = params[mname.replace(".base_layer", "") + "." + wr.parameter_name]
            wr.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(A)))
            wr.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(B)))
    logits = hf_logits(pm.eval(), C.INPUT_IDS)
    pm.save_pretrained(str(out_dir))
    from peft import PeftModel
    again = hf_logits(PeftModel.from_pretrained(hf_model(a, C.MODEL_SEED, base_dir), str(out_dir)).eval(),
                      C.INPUT_IDS)
    return logits, {"r": r, "lora_alpha": s * r, "target_modules": sorted(linear),
                    "target_parameters": sorted(params), **pattern,
                    "scaling": {k: wr.scaling["default"] for k, wr in sorted(wrappers.items())},
                    "param_wrappers": {k: wr.parameter_name for k, wr in sorted(wrappers.items())},
                    "reload_vs_live": fmt(maxdiff(again, logits))}


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


def fuse_check(base_dir, adapter_dir, scratch, arch, peft_logits, mlx_ref=None):
    """mlx_lm fuse (the CLI) of the adapter; the fused folder loaded by transformers, logits vs PEFT's (an error
    when transformers leaves weights of its model unread or reads ones it has no place for); with ``mlx_ref``
    also the fused folder loaded by mlx-lm against those logits."""
    dest = Path(scratch) / "fused"
    shutil.rmtree(dest, ignore_errors=True)
    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    import mlx_lm
    cli = ["mlx_lm", "fuse"] if (Path(mlx_lm.__file__).parent / "__main__.py").exists() else ["mlx_lm.fuse"]  # < 0.21
    p = subprocess.run([sys.executable, "-m", *cli, "--model", str(base_dir), "--adapter-path",
                        str(adapter_dir), "--save-path", str(dest)], capture_output=True, text=True,
                       env=dict(os.environ, **one_thread))  # the fused sums in one order (else ±1e-6 run to run)
    if p.returncode:
        return {"returncode": p.returncode, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    import transformers
    from mlx_lm import load
    out = {"returncode": 0, "files": sorted(x.name for x in dest.iterdir())}
    if mlx_ref is not None:
        out["mlx_lm_load_vs_mlx"] = fmt(maxdiff(mlx_logits(load(str(dest))[0]), mlx_ref))
    model, info = getattr(transformers, C.ARCHS[arch]["model_class"]).from_pretrained(
        str(dest), attn_implementation="eager", output_loading_info=True,
        **{"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32})
    unread = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if unread:
        return dict(out, error=["transformers.from_pretrained of the fused folder: " + "; ".join(
            f"{len(v)} {k} (e.g. {v[0]})" for k, v in sorted(unread.items()))])
    return dict(out, transformers_vs_peft=fmt(maxdiff(hf_logits(model.eval(), C.INPUT_IDS), peft_logits)))


def peft_target_probe(arch, base_dir, probes):
    """What peft does with target_modules naming Linears of a MoE model that are not experts (a dense block's or a
    shared expert's gate/up/down_proj): for each probe, the config after get_peft_model (peft rewrites v4 expert
    names into target_parameters for some model types) and the modules it wrapped, or its error."""
    from peft import LoraConfig, get_peft_model
    out = []
    for targets in probes:
        cfg = LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=list(targets))
        try:
            pm = get_peft_model(hf_model(C.ARCHS[arch], C.MODEL_SEED, base_dir), cfg)
        except Exception as e:  # noqa: BLE001 - the refusal is the fact being recorded
            out.append({"target_modules": list(targets), "error": first_line(e)})
            continue
        wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                         if hasattr(m, "lora_A") and ".lora_" not in n and not n.endswith(".base_layer"))
        out.append({"target_modules": list(targets),
                    "after": {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in (
                        ("target_modules", cfg.target_modules), ("target_parameters", cfg.target_parameters),
                        ("rank_pattern", cfg.rank_pattern))},
                    "wrapped": wrapped})
    return out


def generate_mlx(job):
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
    moe = bool(C.ARCHS[arch].get("moe"))
    era = {}
    if moe:
        peft_logits, peft_cfg = peft_equivalent_moe(arch, base_dir, adapter_dir, args, case_dir / "peft_equivalent")
    elif "scale_rule" in d:  # an older era: the claimed formula, the release's own LoRALinear.scale, the other rule
        lp = args["lora_parameters"]
        peft_logits, peft_cfg = peft_equivalent(arch, base_dir, adapter_dir, args, case_dir / "peft_equivalent",
                                                effective_scale(d, lp))
        other = next(r for r in SCALE_RULES if r != d["scale_rule"])
        other_logits, _ = peft_equivalent(arch, base_dir, adapter_dir, args, Path(scratch) / "peft_other",
                                          effective_scale(d, lp, other))
        era = {"scale_rule": d["scale_rule"], "effective_scale": effective_scale(d, lp),
               "release_lora_scale": sorted({float(m.scale) for _, m in reloaded_model.named_modules()
                                             if type(m).__name__ in ("LoRALinear", "DoRALinear")}),
               "other_rule": other, "other_rule_scale": effective_scale(d, lp, other),
               "mlx_vs_peft_other_rule": fmt(maxdiff(got, other_logits))}
    else:
        peft_logits, peft_cfg = peft_equivalent(arch, base_dir, adapter_dir, args, case_dir / "peft_equivalent")
    save_file({"logits_mlx": got, "logits_peft": peft_logits, "base_logits": base},
              str(case_dir / "logits.safetensors"))
    write_json(case_dir / "input.json", {"input_ids": C.INPUT_IDS})
    facts = {"case": case, "arch": arch, "versions": versions(VERSIONS), "base": "../_base/" + arch,
             "mlx_config": {k: d[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")},
             **era,
             "layout": adapter_layout(adapter_dir), "peft_equivalent": peft_cfg,
             "lora_effect": fmt(maxdiff(got, base)),
             "reload_vs_live": fmt(maxdiff(got, live)),
             "mlx_vs_peft": fmt(maxdiff(got, peft_logits)),
             "fuse": fuse_check(base_dir, adapter_dir, scratch, arch, peft_logits, got if moe else None)}
    if d.get("peft_target_probe"):
        facts["peft_target_probe"] = peft_target_probe(arch, base_dir, d["peft_target_probe"])
    if d.get("scale_semantics", case == "llama_qv"):
        facts["scale_semantics"] = scale_semantics(base_dir, adapter_dir, scratch, got)
    write_json(case_dir / "meta.json", facts)
    res = {k: facts[k] for k in ("case", "arch", "lora_effect", "reload_vs_live", "mlx_vs_peft")}
    res["n_tensors"] = len(facts["layout"]["tensors"])
    res["modules"] = len(peft_cfg["target_modules"]) + len(peft_cfg.get("target_parameters", []))
    if moe:
        res["adapted"] = sorted({k.split(".", 3)[-1].rsplit(".", 1)[0] for k in facts["layout"]["tensors"]})
        res["peft_reload_vs_live"] = peft_cfg["reload_vs_live"]
    res["fuse_vs_peft"] = facts["fuse"].get("transformers_vs_peft", facts["fuse"].get("error"))
    for k in ("scale_semantics", "peft_target_probe"):
        if k in facts:
            res[k] = facts[k]
    res.update(era)
    if era:
        res["blocks"] = sorted({int(k.split(".")[2]) for k in facts["layout"]["tensors"]})
    res["max_abs_logit"] = max_abs(peft_logits)
    res["ok"] = close(maxdiff(got, peft_logits), peft_logits, C.REL_TOL["f32"]) and facts["reload_vs_live"] == 0.0
    return res


def task_generate(job):
    return (generate_peft if job["data"].get("kind") == "peft" else generate_mlx)(job)


def mlx_from_peft(pm, arch):
    """mlx-lm factors {name: array} for a PeftModel on an MoE base (golden/families/mlx/moe_probe.py): Linear
    modules lora_a = lora_Aᵀ, lora_b = lora_Bᵀ; a ParamWrapper on mlp.experts.<p> per expert (E, r, in) / (E, out, r)
    on <parent>.switch_mlp, gate_up_proj split by rows (gate = first I rows of B_e, up = the rest, A shared)."""
    moe = C.ARCHS[arch]["moe"]
    parent, I = moe["parent"], moe["intermediate"]
    w = {}
    for name, m in pm.base_model.model.named_modules():
        if type(m).__name__ == "Linear" and hasattr(m, "lora_A"):  # peft's lora.Linear
            mname = name.replace(".mlp.", f".{parent}.")
            w[mname + ".lora_a"] = m.lora_A["default"].weight.detach().numpy().T
            w[mname + ".lora_b"] = m.lora_B["default"].weight.detach().numpy().T
    for name, wr in param_wrappers(pm).items():
        pre = name.replace(".base_layer", "").replace(".mlp.experts", f".{parent}.switch_mlp")
        Ae, Be = peft_factors_per_expert(wr)
        if wr.parameter_name == "gate_up_proj":
            w.update({pre + ".gate_proj.lora_a": Ae, pre + ".gate_proj.lora_b": Be[:, :I],
                      pre + ".up_proj.lora_a": Ae, pre + ".up_proj.lora_b": Be[:, I:]})
        else:
            w.update({f"{pre}.{wr.parameter_name}.lora_a": Ae, f"{pre}.{wr.parameter_name}.lora_b": Be})
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(w.items())}


def generate_peft(job):
    """A PEFT adapter on an MoE base written by real peft (target_parameters on the experts), and the mlx-lm adapter
    the mapping makes of it, loaded by mlx_lm.load."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import save_config
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from safetensors.numpy import save_file
    case, d = job["case"], job["data"]
    arch = d["arch"]
    a = C.ARCHS[arch]
    base_dir, case_dir = Path(job["base_dir"]), Path(job["case_dir"])
    adapter_dir, mlx_dir = case_dir / "adapter", case_dir / "mlx_equivalent"
    base = hf_logits(hf_model(a, C.MODEL_SEED, base_dir), C.INPUT_IDS)
    cfg = LoraConfig(lora_dropout=0.0, **d["peft_config"])
    pm = get_peft_model(hf_model(a, C.MODEL_SEED, base_dir), cfg)
    rng = np.random.default_rng(C.LORA_SEED)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.from_numpy((rng.standard_normal(tuple(p.shape)) * C.LORA_STD).astype(np.float32)))
    logits = hf_logits(pm.eval(), C.INPUT_IDS)
    pm.save_pretrained(str(adapter_dir))
    again = hf_logits(PeftModel.from_pretrained(hf_model(a, C.MODEL_SEED, base_dir), str(adapter_dir)).eval(),
                      C.INPUT_IDS)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "np") as f:
        saved = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    saved_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    wrappers = param_wrappers(pm)

    r, alpha = cfg.r, cfg.lora_alpha
    scale = alpha / r**0.5 if cfg.use_rslora else alpha / r
    w = mlx_from_peft(pm, arch)
    keys = sorted({k.split(".", 3)[3].rsplit(".", 1)[0] for k in w})
    layers = sorted({int(k.split(".")[2]) for k in w})
    assert layers == list(range(a["config"]["num_hidden_layers"])), layers  # every block: num_layers = all
    args = mlx_args({"fine_tune_type": "lora", "num_layers": len(layers),
                     "lora_parameters": {"rank": r, "dropout": 0.0, "scale": scale, "keys": keys}},
                    "../_base/" + arch)
    mlx_dir.mkdir(parents=True, exist_ok=True)
    save_config(dict(args), mlx_dir / "adapter_config.json")
    mx.save_safetensors(str(mlx_dir / "adapters.safetensors"), {k: mx.array(v) for k, v in w.items()})
    mmodel, _ = load(str(base_dir), adapter_path=str(mlx_dir))
    loaded = dict(tree_flatten(mmodel.parameters()))
    unread = [k for k, v in w.items() if k not in loaded or not np.array_equal(np.array(loaded[k]), v)]
    logits_mlx = mlx_logits(mmodel)
    noise = maxdiff(mlx_logits(load(str(base_dir))[0]), base)
    save_file({"logits": logits, "base_logits": base, "logits_mlx": logits_mlx}, str(case_dir / "logits.safetensors"))
    write_json(case_dir / "input.json", {"input_ids": C.INPUT_IDS})
    facts = {"case": case, "arch": arch, "versions": versions(VERSIONS), "base": "../_base/" + arch,
             "peft_config": d["peft_config"],
             "adapter_config": {k: saved_cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules",
                                                              "target_parameters", "rank_pattern", "alpha_pattern",
                                                              "peft_type", "base_model_name_or_path")},
             "saved_tensors": saved,
             "param_wrappers": {k: {"parameter_name": wr.parameter_name, "num_experts": wr.num_experts,
                                    "in_features": wr.in_features, "out_features": wr.out_features,
                                    "scaling": wr.scaling["default"]} for k, wr in sorted(wrappers.items())},
             "lora_effect": fmt(maxdiff(logits, base)), "reload_vs_live": fmt(maxdiff(again, logits)),
             "mlx_equivalent": {"lora_parameters": args["lora_parameters"], "num_layers": args["num_layers"],
                                "tensors": {k: list(v.shape) for k, v in w.items()},
                                "tensors_not_loaded": unread},
             "noise_mlx_base_vs_transformers": fmt(noise), "mlx_vs_peft": fmt(maxdiff(logits_mlx, logits)),
             "tol": fmt(rows_tol(logits, noise))}
    write_json(case_dir / "meta.json", facts)
    res = {k: facts[k] for k in ("case", "arch", "lora_effect", "reload_vs_live", "mlx_vs_peft", "tol")}
    res.update(n_tensors=len(saved), mlx_scale=fmt(scale), max_abs_logit=max_abs(logits),
               nesting={k: wr.parameter_name for k, wr in sorted(wrappers.items()) if ".layers.0." in k})
    res["ok"] = (facts["reload_vs_live"] == 0.0 and not unread
                 and maxdiff(logits_mlx, logits) <= rows_tol(logits, noise))
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
    lines += [""]
    for k, r in sorted(res.items()):
        for label, v in r.get("layouts", {}).items():
            what = "mlx_lm.load reads it" if v["mlx_lm_loads"] else f"mlx_lm.load refuses it: `{v['error'][:120]}`"
            lines.append(f"- {k}, {label}: {what}; block 0: "
                         + ", ".join(f"`{n.split('.', 3)[-1]}` {s}" for n, s in v["tensors_block0"].items()))
    written = {k: r for k, r in sorted(res.items()) if "/_base/" not in k and "nesting" not in r}
    lines += ["", "## Adapters (written by mlx-lm, loaded with `mlx_lm.load(base, adapter_path=...)`)", ""]
    lines += table(["case", "tensors", "modules", "effect", "max abs logit", "reload vs live", "mlx vs PEFT equivalent",
                    "`mlx_lm fuse` → transformers vs PEFT", "as expected"],
                   [[k, r.get("n_tensors"), r.get("modules"), r.get("lora_effect"), r.get("max_abs_logit"),
                     r.get("reload_vs_live"), r.get("mlx_vs_peft"),
                     "fails (below)" if isinstance(r.get("fuse_vs_peft"), list) else r.get("fuse_vs_peft"),
                     "ok" if r.get("ok") else "FAILED"] for k, r in written.items()])
    moe = {k: r for k, r in written.items() if "adapted" in r}
    if moe:
        lines += ["", "MoE (LoRASwitchLinear on switch_mlp): the PEFT equivalent targets the Linear modules by name, a "
                  "router (transformers 5: a bare weight) and the experts by target_parameters (gate_up_proj rank 2r "
                  "by rank_pattern/alpha_pattern: A_e = [A_gate; A_up], B_e block-diagonal; down_proj rank r).", ""]
        lines += table(["case", "modules mlx-lm adapted (per block)", "PEFT equivalent reload vs live",
                        "`mlx_lm fuse`"],
                       [[k, ", ".join(f"`{m}`" for m in r["adapted"]), r.get("peft_reload_vs_live"),
                         "; ".join(r["fuse_vs_peft"]) if isinstance(r.get("fuse_vs_peft"), list)
                         else r.get("fuse_vs_peft")] for k, r in moe.items()])
    peft = {k: r for k, r in sorted(res.items()) if "nesting" in r}
    if peft:
        lines += ["", "## MoE adapters written by peft (target_parameters), and their mlx-lm equivalent", "",
                  "Real `get_peft_model` + `save_pretrained` on the transformers-5 base; the mlx-lm adapter made of "
                  "it by hand (lora_A (E·r, in) expert-major, lora_B (out, r·E) rank-major; gate_up_proj split by "
                  "rows into gate_proj/up_proj, A shared; scale = α/r, rslora α/√r), loaded by `mlx_lm.load`. "
                  "peft nests the ParamWrappers in the order the experts module defines its parameters, whatever "
                  "the config's order: with both targeted `experts.base_layer` holds gate_up_proj and `experts` "
                  "down_proj; one alone sits at `experts` (so a saved key's nesting does not name its parameter: "
                  "the config's target_parameters and the shapes do).", ""]
        lines += table(["case", "saved tensors", "ParamWrapper nesting (block 0)", "mlx scale", "effect",
                        "max abs logit", "PEFT reload vs live", "mlx vs PEFT", "tol", "as expected"],
                       [[k, r.get("n_tensors"), ", ".join(f"`{m.split('.', 3)[-1]}` → {p}"
                                                           for m, p in r["nesting"].items()),
                         r.get("mlx_scale"), r.get("lora_effect"), r.get("max_abs_logit"), r.get("reload_vs_live"),
                         r.get("mlx_vs_peft"), r.get("tol"), "ok" if r.get("ok") else "FAILED"]
                        for k, r in peft.items()])
    probes = [(k, p) for k, r in sorted(res.items()) for p in r.get("peft_target_probe", [])]
    if probes:
        lines += ["", "peft's rewrite of v4 expert names (`_convert_peft_config_moe`, for model types transformers "
                  "converts like qwen2_moe, not qwen2_moe itself): `target_modules` naming Linears that are not "
                  "experts, on the case's base:", ""]
        for k, p in probes:
            got = (f"refused: `{p['error']}`" if "error" in p else
                   f"config becomes {json.dumps(p['after'], sort_keys=True)}; wrapped: "
                   + ", ".join(f"`{w}`" for w in p["wrapped"]))
            lines.append(f"- {k}, target_modules {p['target_modules']}: {got}")
    lines += ["", "PEFT equivalent: lora_A = lora_aᵀ, lora_B = lora_bᵀ, lora_alpha = scale·rank, target_modules = "
              "the mlx modules' full names, DoRA: lora_magnitude_vector = m. So in mlx-lm 0.32.2 `scale` is "
              "absolute (ΔW = scale·lora_bᵀ·lora_aᵀ, no division by rank), and DoRA's `m` computes what PEFT's "
              "magnitude does.", "", "## Scale semantics of this version", ""]
    for k, r in sorted(res.items()):
        for label, v in sorted(r.get("scale_semantics", {}).items()):
            what = (f"loads; logits vs the same adapter without `alpha`: {v['logits_vs_scale_only']} (alpha ignored)"
                    if v.get("loads") else f"refused: `{v.get('error')}`")
            lines.append(f"- {k}, `lora_parameters` with {label.replace('_', ' ')}: {what}")
    old = {k: r for k, r in sorted(res.items()) if "scale_rule" in r}
    if old:
        lines += ["", "## The older eras, run in their own releases", "",
                  "mlx-lm 0.13.1 (era mlx-lm-2024-03) and 0.20.6 (mlx-lm-2024-06) on mlx 0.32.4, their code "
                  "unpatched, with transformers and peft of their time (envs mlxlm0131, mlxlm0206). Each adapter is "
                  "written through the release's own CLI parser and `linear_to_lora_layers` and loaded by its "
                  "`mlx_lm.utils.load(base, adapter_path=)`; `LoRALinear.scale` is what the release set from "
                  "`lora_parameters`; the PEFT equivalent uses the era's rule, the last column the other rule.", ""]
        lines += table(["case", "lora_parameters (rank, alpha, scale)", "era rule", "release's LoRALinear.scale",
                        "mlx vs PEFT (era rule)", "mlx vs PEFT (other rule)", "blocks adapted", "as expected"],
                       [[k, ", ".join(str(C.CASES[k]["lora_parameters"][x]) for x in ("rank", "alpha", "scale")),
                         f"{r['scale_rule']} = {r['effective_scale']:g}",
                         ", ".join(f"{x:g}" for x in r["release_lora_scale"]), r["mlx_vs_peft"],
                         f"{r['mlx_vs_peft_other_rule']} ({r['other_rule']} = {r['other_rule_scale']:g})",
                         f"num_layers {C.CASES[k]['num_layers']}: {r.get('blocks', '?')}",
                         "ok" if r.get("ok") else "FAILED"] for k, r in old.items()])
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
    base = Path(data_dir) / row["env"] / "_base" / arch
    stored = load_file(str(Path(item["case_dir"]) / "logits.safetensors"))
    ref = stored[row["ref"]]
    res = {"adapter": "default", "load": row["load"]}
    if row["load"] == "mlx":
        model, _ = load(str(base), adapter_path=str(out))
        got = mlx_logits(model)
        base_model, _ = load(str(base))
        res["noise"] = fmt(maxdiff(mlx_logits(base_model), stored["base_logits"]))
        if C.ARCHS[arch].get("fuse_not_applicable"):
            res["fuse"] = f"not applicable ({C.ARCHS[arch]['fuse_not_applicable']})"
        else:
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
