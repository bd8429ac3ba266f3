"""Worker of the image-model LoRA goldens (family ``diffusers``); runs INSIDE an env's venv::

    <venv>/bin/python golden/families/diffusers/worker.py generate JOB.json RESULT.json

JOB.json: {"case": id or "_base:<family>", "case_data": {...}, "step": str, "env": str,
           "paths": {"golden": <golden/diffusers>, "case_dir": ..., "base_dir": ...}} (all absolute).
RESULT.json: the measured facts of that step. Steps (cases.py lists them per case):

    base            (diffusers)  build the family's tiny components from config (MODEL_SEED), save
                                 _base/<family>/{<component>.safetensors, config.json, inputs.safetensors}
    diffusers_write (diffusers)  PEFT adapters on the components, seeded noise, live outputs, then
                                 <Pipeline>.save_lora_weights(…, *_lora_adapter_metadata) and
                                 pipe.load_lora_weights on fresh components
    diffusers_trap  (diffusers)  an edit of another case's file, loaded with pipe.load_lora_weights
    kohya_write     (sdscripts)  sd-scripts' create_network + apply_to, seeded noise, live outputs,
                                 save_weights (float32, metadata as train_network.py writes it), then the written
                                 file read back by sd-scripts' create_network_from_weights
    kohya_trap      (sdscripts)  an edit of another kohya case's file, read back by sd-scripts
    kohya_load      (diffusers)  pipe.load_lora_weights(kohya file): diffusers' converters

Outputs (outputs.safetensors, float32) are ``<stage>.<name>``: ``denoiser`` (UNet / Flux transformer on fixed
latents, timestep, encoder states), ``<text encoder>.hidden`` (last hidden state on fixed token ids) and
``<text encoder>.pooled``; stage ``base`` (no LoRA), ``live`` (the network as trained), ``kohya`` (sd-scripts'
network loaded from the file), ``loaded`` (after pipe.load_lora_weights).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cases():
    spec = importlib.util.spec_from_file_location("diffusers_family_cases", HERE / "cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _cases()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)
LORA_FILE_DIFFUSERS = "pytorch_lora_weights.safetensors"
LORA_FILE_KOHYA = "lora.safetensors"


# ----------------------------------------------------------------------------------------------- small helpers
def maxdiff(a: dict, b: dict, prefix_a: str, prefix_b: str) -> dict:
    """max |a - b| per output name (names present under both prefixes) and overall."""
    out = {}
    for k in sorted(a):
        if k.startswith(prefix_a + "."):
            name = k[len(prefix_a) + 1:]
            if prefix_b + "." + name in b:
                out[name] = float((a[k].double() - b[prefix_b + "." + name].double()).abs().max())
    out["max"] = max(out.values()) if out else None
    return out


def read_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def canonical_header(path: Path) -> None:
    """Sort the header's ``__metadata__`` keys in place (same length, tensors untouched): safetensors' Rust
    writer takes them from a HashMap, so their order changes from run to run and the bytes with it."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    if "__metadata__" not in head:
        return
    head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
    new = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    if len(new) > n:
        raise SystemExit(f"{path}: canonical header longer than the written one")
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def update_meta(case_dir: Path, **kw) -> dict:
    p = case_dir / "meta.json"
    meta = json.loads(p.read_text()) if p.exists() else {}
    meta.update(kw)
    write_json(p, meta)
    return meta


def versions() -> dict:
    import transformers
    import diffusers
    v = {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__}
    try:
        import peft
        v["peft"] = peft.__version__
    except ImportError:
        pass
    sd = Path(C.SD_SCRIPTS_DIR) / "COMMIT"
    if any("sd-scripts" in p for p in sys.path) and sd.exists():
        v["sd-scripts"] = sd.read_text().strip()
    return v


def save_outputs(case_dir: Path, stage_outputs: dict) -> None:
    """Merge ``{stage.name: tensor}`` into case_dir/outputs.safetensors (deterministic key order)."""
    p = case_dir / "outputs.safetensors"
    cur = load_file(str(p)) if p.exists() else {}
    cur.update({k: v.detach().contiguous().float() for k, v in stage_outputs.items()})
    save_file({k: cur[k] for k in sorted(cur)}, str(p))


def exc_text(e: BaseException) -> str:
    import traceback
    s = f"{type(e).__name__}: {e}".strip()
    if not str(e):      # a bare assert: say where
        fr = traceback.extract_tb(e.__traceback__)[-1]
        s += f" at {Path(fr.filename).name}:{fr.lineno} `{fr.line}`"
    return s if len(s) < 600 else s[:600] + " …"


# ------------------------------------------------------------------------------------------------- components
def _seeded(fn):
    torch.manual_seed(C.MODEL_SEED)
    return fn()


def _text_encoder(kind: str, cfg: dict):
    import transformers
    cls = getattr(transformers, kind)
    config = transformers.CLIPTextConfig(**cfg)
    return cls(config)


def _load_into(model, sd: dict) -> None:
    """load ``sd`` (saved with transformers 5 names) into ``model``, adding/removing CLIP's ``text_model.`` level
    (transformers 4 has it on CLIPTextModel, 5 does not)."""
    want = set(model.state_dict())
    fixed = {}
    for k, v in sd.items():
        if k not in want and "text_model." + k in want:
            k = "text_model." + k
        elif k not in want and k.startswith("text_model.") and k[len("text_model."):] in want:
            k = k[len("text_model."):]
        fixed[k] = v
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"base weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_diffusers_components(family: str, base_dir: Path | None) -> dict:
    """{component name: module}, float32, eval; weights from base_dir when given, else seeded init."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    fam = C.FAMILIES[family]
    comps = {}
    if "unet" in fam:
        comps["unet"] = _seeded(lambda: UNet2DConditionModel(**fam["unet"]))
    else:
        comps["transformer"] = _seeded(lambda: FluxTransformer2DModel(**fam["transformer"]))
    for name, (kind, cfg) in fam["text_encoders"].items():
        comps[name] = _seeded(lambda: _text_encoder(kind, cfg))
    for name, m in comps.items():
        if base_dir is not None:
            _load_into(m, load_file(str(base_dir / f"{name}.safetensors")))
        m.float().eval().requires_grad_(False)
    return comps


def flux_params(family: str = "flux"):
    from library.flux_models import FluxParams
    t = C.FAMILIES[family]["transformer"]
    return FluxParams(in_channels=t["in_channels"], vec_in_dim=t["pooled_projection_dim"],
                      context_in_dim=t["joint_attention_dim"],
                      hidden_size=t["attention_head_dim"] * t["num_attention_heads"], mlp_ratio=4.0,
                      num_heads=t["num_attention_heads"], depth=t["num_layers"],
                      depth_single_blocks=t["num_single_layers"], axes_dim=list(t["axes_dims_rope"]), theta=10000,
                      qkv_bias=True, guidance_embed=t["guidance_embeds"])


def diffusers_flux_to_bfl(sd: dict) -> dict:
    """diffusers FluxTransformer2DModel weights -> BFL (sd-scripts library.flux_models.Flux) names, any size."""
    out = {}

    def put(dst, *srcs):
        for suf in ("weight", "bias"):
            parts = [sd[f"{s}.{suf}"] for s in srcs if f"{s}.{suf}" in sd]
            if parts:
                out[f"{dst}.{suf}"] = torch.cat(parts, 0)

    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    nd = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    ns = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for i in range(nd):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        put(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        put(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        put(f"{d}.img_attn.qkv", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v")
        put(f"{d}.txt_attn.qkv", f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj")
        put(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        put(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
        put(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        put(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        put(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        put(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
    for i in range(ns):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(f"{d}.modulation.lin", f"{s}.norm.linear")
        put(f"{d}.linear1", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")
        put(f"{d}.linear2", f"{s}.proj_out")
        out[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer (shift, scale)
    for suf in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{suf}"].chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{suf}"] = torch.cat([shift, scale], 0)
    put("final_layer.linear", "proj_out")
    return out


def build_sdscripts_components(family: str, base_dir: Path) -> dict:
    """Same weights in sd-scripts' env: diffusers 0.32.1 UNet / sd-scripts' BFL Flux, transformers 4 CLIP."""
    fam = C.FAMILIES[family]
    if family != "flux":
        return build_diffusers_components(family, base_dir)
    from library.flux_models import Flux
    comps = {"flux": Flux(flux_params(family))}
    missing, unexpected = comps["flux"].load_state_dict(
        diffusers_flux_to_bfl(load_file(str(base_dir / "transformer.safetensors"))), strict=True), []
    for name, (kind, cfg) in fam["text_encoders"].items():
        comps[name] = _seeded(lambda: _text_encoder(kind, cfg))
        _load_into(comps[name], load_file(str(base_dir / f"{name}.safetensors")))
    for m in comps.values():
        m.float().eval().requires_grad_(False)
    return comps


@torch.no_grad()
def outputs(family: str, comps: dict, inputs: dict, stage: str) -> dict:
    fam = C.FAMILIES[family]
    out = {}
    if "unet" in comps:
        kw = {}
        if "pooled" in inputs:
            kw["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
        out["denoiser"] = comps["unet"](inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["ctx"],
                                        **kw).sample
    elif "transformer" in comps:
        out["denoiser"] = comps["transformer"](
            hidden_states=inputs["img"], encoder_hidden_states=inputs["ctx"], pooled_projections=inputs["pooled"],
            timestep=inputs["timestep"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
            return_dict=False)[0]
    else:   # sd-scripts' BFL Flux
        out["denoiser"] = comps["flux"](img=inputs["img"], img_ids=inputs["img_ids"][None], txt=inputs["ctx"],
                                        txt_ids=inputs["txt_ids"][None], timesteps=inputs["timestep"],
                                        y=inputs["pooled"], guidance=None)
    for name in fam["text_encoders"]:
        o = comps[name](inputs["input_ids"])
        out[f"{name}.hidden"] = o.last_hidden_state
        out[f"{name}.pooled"] = o.text_embeds if hasattr(o, "text_embeds") and o.text_embeds is not None \
            else o.pooler_output
    return {f"{stage}.{k}": v for k, v in out.items()}


def make_inputs(family: str) -> dict:
    fam = C.FAMILIES[family]
    g = torch.Generator().manual_seed(C.INPUT_SEED)
    inp = {"input_ids": torch.randint(3, C.CLIP["vocab_size"], (1, C.TOKENS), generator=g),
           "ctx": torch.randn(*fam["ctx"], generator=g)}
    if family == "flux":
        n = fam["img_seq"]
        side = int(n ** 0.5)
        inp["img"] = torch.randn(1, n, fam["transformer"]["in_channels"], generator=g)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inp["img_ids"] = ids.reshape(n, 3)
        inp["txt_ids"] = torch.zeros(fam["ctx"][1], 3)
        inp["timestep"] = torch.tensor([fam["timestep"]])
        inp["pooled"] = torch.randn(*fam["pooled"], generator=g)
    else:
        inp["latents"] = torch.randn(*fam["latent"], generator=g)
        inp["timestep"] = torch.tensor([fam["timestep"]])
        if "pooled" in fam:
            inp["pooled"] = torch.randn(*fam["pooled"], generator=g)
            inp["time_ids"] = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])
    return inp


def load_inputs(base_dir: Path) -> dict:
    return load_file(str(base_dir / "inputs.safetensors"))


# ------------------------------------------------------------------------------------------ diffusers side
def make_pipe(family: str, comps: dict):
    import diffusers
    fam = C.FAMILIES[family]
    cls = getattr(diffusers, fam["pipeline"])
    if family == "flux":
        return cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=comps["text_encoder"],
                   tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=comps["transformer"])
    kw = dict(vae=None, unet=comps["unet"], scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), tokenizer=None,
              text_encoder=comps["text_encoder"])
    if family == "sdxl":
        return cls(text_encoder_2=comps["text_encoder_2"], tokenizer_2=None, **kw)
    return cls(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw)


def randomize(named_params, seed: int) -> int:
    """overwrite every LoRA factor with seeded N(0, LORA_STD²) noise, in name order; returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in sorted(named_params, key=lambda t: t[0]):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * C.LORA_STD)
        n += 1
    return n


def step_base(job: dict) -> dict:
    family = job["case"].split(":", 1)[1]
    base = Path(job["paths"]["base_dir"])
    base.mkdir(parents=True, exist_ok=True)
    comps = build_diffusers_components(family, None)
    for name, m in comps.items():
        sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
        save_file(dict(sorted(sd.items())), str(base / f"{name}.safetensors"))
    inputs = make_inputs(family)
    save_file(dict(sorted(inputs.items())), str(base / "inputs.safetensors"))
    fam = C.FAMILIES[family]
    write_json(base / "config.json", {"family": family, "pipeline": fam["pipeline"],
                                      "components": {n: type(m).__name__ for n, m in comps.items()},
                                      "config": {k: v for k, v in fam.items() if k != "pipeline"},
                                      "model_seed": C.MODEL_SEED, "input_seed": C.INPUT_SEED,
                                      "versions": versions()})
    # rebuilding from the files gives the same outputs as the seeded build
    again = build_diffusers_components(family, base)
    o1, o2 = outputs(family, comps, inputs, "base"), outputs(family, again, inputs, "base")
    return {"params": {n: sum(p.numel() for p in m.parameters()) for n, m in comps.items()},
            "rebuild_maxdiff": maxdiff(o1, o2, "base", "base")["max"]}


def _peft_metadata(model) -> dict:
    cfg = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def step_diffusers_write(job: dict) -> dict:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    case = job["case_data"]
    family = case["family"]
    base, case_dir = Path(job["paths"]["base_dir"]), Path(job["paths"]["case_dir"])
    case_dir.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(base)
    comps = build_diffusers_components(family, base)
    res = {}
    out = outputs(family, comps, inputs, "base")
    for i, (comp, cfg) in enumerate(case["lora"].items()):
        comps[comp].add_adapter(LoraConfig(**cfg))
        res[f"{comp}_lora_tensors"] = randomize(
            [(n, p) for n, p in comps[comp].named_parameters() if "lora_" in n], C.LORA_SEED + i)
    out.update(outputs(family, comps, inputs, "live"))
    pipe_cls = type(make_pipe(family, build_diffusers_components(family, base)))
    kw = {}
    for comp in case["lora"]:
        kw[f"{comp}_lora_layers"] = get_peft_model_state_dict(comps[comp])
        kw[f"{comp}_lora_adapter_metadata"] = _peft_metadata(comps[comp])
    pipe_cls.save_lora_weights(str(case_dir), **kw)
    canonical_header(case_dir / LORA_FILE_DIFFUSERS)
    res.update(_load_and_compare(family, base, inputs, case_dir / LORA_FILE_DIFFUSERS, out, "live"))
    save_outputs(case_dir, out)
    res["file_keys"] = len(load_file(str(case_dir / LORA_FILE_DIFFUSERS)))
    res["header_keys"] = sorted(read_meta(case_dir / LORA_FILE_DIFFUSERS))
    update_meta(case_dir, case=job["case"], family=family, env=job["env"], versions=versions(),
                writer=f"{pipe_cls.__name__}.save_lora_weights", lora=case["lora"], lora_seed=C.LORA_SEED,
                lora_std=C.LORA_STD, base="../../_base/" + family, facts=res)
    return res


def _load_and_compare(family, base, inputs, lora_file: Path, out: dict, ref_stage: str, **load_kw) -> dict:
    """fresh components, pipe.load_lora_weights(lora_file); the ``loaded`` outputs go into ``out``."""
    res = {}
    comps = build_diffusers_components(family, base)
    pipe = make_pipe(family, comps)
    import logging
    from diffusers.utils import logging as dlog
    records = []

    class Grab(logging.Handler):
        def emit(self, r):
            if r.levelno >= logging.WARNING:
                records.append(r.getMessage()[:300])

    h = Grab()
    dlog.get_logger("diffusers").addHandler(h)
    try:
        pipe.load_lora_weights(str(lora_file), **load_kw)
    except Exception as e:     # noqa: BLE001 - the exception IS the measured fact
        res["load_error"] = exc_text(e)
        return res
    finally:
        dlog.get_logger("diffusers").removeHandler(h)
    res["load_warnings"] = records
    loaded = outputs(family, comps, inputs, "loaded")
    out.update(loaded)
    res[f"loaded_vs_{ref_stage}"] = maxdiff(loaded, out, "loaded", ref_stage)
    res[f"{ref_stage}_vs_base"] = maxdiff(out, out, ref_stage, "base")     # the LoRA's own effect
    res["loaded_vs_base"] = maxdiff(loaded, out, "loaded", "base")
    if hasattr(pipe, "fuse_lora"):
        pipe.fuse_lora()
        fused = outputs(family, comps, inputs, "fused")
        res["fused_vs_loaded"] = maxdiff(fused, loaded, "fused", "loaded")["max"]
    return res


def _trap_setup(job: dict, lora_file: str) -> tuple:
    """(case, family, base, case_dir, src_dir, inputs, source tensors, source header, source base/live outputs)"""
    case = job["case_data"]
    base, case_dir = Path(job["paths"]["base_dir"]), Path(job["paths"]["case_dir"])
    src_dir = case_dir.parent / case["source"]
    case_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / lora_file
    ref = load_file(str(src_dir / "outputs.safetensors"))
    return (case, case["family"], base, case_dir, src_dir, load_inputs(base), load_file(str(src)), read_meta(src),
            {k: v for k, v in ref.items() if k.startswith(("base.", "live."))})


def step_diffusers_trap(job: dict) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    case, family, base, case_dir, src_dir, inputs, sd, meta, out = _trap_setup(job, LORA_FILE_DIFFUSERS)
    res = {"source": case["source"], "edit": case["edit"]}
    target = case_dir / LORA_FILE_DIFFUSERS
    if case["edit"] == "drop_metadata":
        save_file(sd, str(target), {k: v for k, v in meta.items() if k != "lora_adapter_metadata"})
    elif case["edit"] == "convert_state_dict_to_diffusers":
        # what the older training scripts did: convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        # per component, then save_lora_weights with the same metadata
        comps = sorted({k.split(".", 1)[0] for k in sd})
        pipe_cls = type(make_pipe(family, build_diffusers_components(family, base)))
        md = json.loads(meta["lora_adapter_metadata"])
        kw = {}
        for comp in comps:
            part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.startswith(comp + ".")}
            kw[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(part)
            kw[f"{comp}_lora_adapter_metadata"] = {k[len(comp) + 1:]: v for k, v in md.items()
                                                   if k.startswith(comp + ".")}
        pipe_cls.save_lora_weights(str(case_dir), **kw)
        keys = list(load_file(str(target)))
        res["spellings"] = {s: sum(s in k for k in keys) for s in
                            (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")}
        res["first_key"] = keys[0]
    canonical_header(target)
    res.update(_load_and_compare(family, base, inputs, target, out, "live"))
    save_outputs(case_dir, {k: v for k, v in out.items() if k.startswith(("loaded.", "fused."))})
    update_meta(case_dir, case=job["case"], family=family, env=job["env"], versions=versions(),
                source="../" + case["source"], edit=case["edit"], base="../../_base/" + family, facts=res,
                reference="outputs of the source case (its live.* = what the adapter computes)")
    return res


# ------------------------------------------------------------------------------------------ sd-scripts side
def _import_sd_scripts() -> dict:
    """Import the sd-scripts modules the steps use. library/utils.py and library/train_util.py do
    ``from torchvision import transforms`` at import (used only for image augmentation, not by LoRA code);
    torchvision cannot be installed next to the CPU torch 2.13.0 (PyPI's 0.28.0 links libtorch_cuda; no sdist), so a
    bare placeholder module stands in for it during these imports only and is removed right after."""
    import diffusers  # noqa: F401  (imported before the placeholder so they never see it)
    import transformers  # noqa: F401
    placed = "torchvision" not in sys.modules
    if placed:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")

        class _Unavailable:     # train_util builds IMAGE_TRANSFORMS = Compose([ToTensor(), Normalize(…)]) at import
            def __init__(self, *a, **k):
                pass

            def __call__(self, *a, **k):
                raise RuntimeError("torchvision is not installed in this env")

        def _attr(name):
            if name.startswith("_"):
                raise AttributeError(name)
            return _Unavailable
        tv.transforms.__getattr__ = _attr
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
    try:
        mods = {m: importlib.import_module(m) for m in
                ("networks.lora", "networks.lora_flux", "library.train_util", "library.model_util",
                 "library.sdxl_model_util", "library.flux_models")}
    finally:
        if placed:
            del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
    return mods


def _te_list(family: str, comps: dict):
    if family == "sdxl":
        return [comps["text_encoder"], comps["text_encoder_2"]]
    if family == "flux":
        return [comps["text_encoder"], None]      # CLIP-L; no T5
    return comps["text_encoder"]


def _denoiser(comps):
    return comps.get("unet", comps.get("flux"))


def _kohya_metadata(case: dict) -> dict:
    """the network fields train_network.py writes (ss_* strings); save_weights adds sshs_model_hash/legacy_hash"""
    md = {"ss_network_module": case["module"], "ss_network_dim": str(case["dim"]),
          "ss_network_alpha": str(float(case["alpha"])), "ss_base_model_version": case["base_model_version"],
          "ss_v2": "False", "ss_output_name": "lora", "ss_training_comment": "None"}
    if case["kwargs"]:
        md["ss_network_args"] = json.dumps(case["kwargs"])
    return md


def sai_names_sd1(mods, keys, unet) -> dict:
    """{diffusers-named kohya module: SAI-named}, from sd-scripts' own SD1 U-Net map (model_util)"""
    path_of = {"lora_unet_" + p.replace(".", "_"): p for p, _ in unet.named_modules() if p}
    names = sorted({k.split(".", 1)[0] for k in keys if k.startswith("lora_unet_")})
    index = {path_of[n] + ".weight": i for i, n in enumerate(names)}
    fake = {k: torch.tensor(float(index.get(k, -1))) for k in unet.state_dict()}
    conv = mods["library.model_util"].convert_unet_state_dict_to_sd(False, fake)
    return {names[int(v)]: "lora_unet_" + k[:-len(".weight")].replace(".", "_") for k, v in conv.items() if v >= 0}


def _kohya_readback(mods, case_module: str, family: str, base: Path, inputs: dict, weights_sd: dict) -> tuple:
    """sd-scripts' create_network_from_weights + apply_to + load_state_dict on fresh components."""
    comps = build_sdscripts_components(family, base)
    mod = mods[case_module]
    net, wsd = mod.create_network_from_weights(1.0, None, None, _te_list(family, comps), _denoiser(comps),
                                               weights_sd=dict(weights_sd), for_inference=False)
    net.apply_to(_te_list(family, comps), _denoiser(comps), apply_text_encoder=True, apply_unet=True)
    info = net.load_state_dict(wsd, strict=False)
    res = {"modules": len(net.unet_loras) + len(net.text_encoder_loras),
           "unexpected_keys": len(info.unexpected_keys), "missing_keys": len(info.missing_keys)}
    return outputs(family, comps, inputs, "kohya"), res


def step_kohya_write(job: dict) -> dict:
    mods = _import_sd_scripts()
    case = job["case_data"]
    family = case["family"]
    base, case_dir = Path(job["paths"]["base_dir"]), Path(job["paths"]["case_dir"])
    case_dir.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(base)
    comps = build_sdscripts_components(family, base)
    out = outputs(family, comps, inputs, "base")
    mod = mods[case["module"]]
    te = _te_list(family, comps)
    torch.manual_seed(C.LORA_SEED)
    net = mod.create_network(1.0, case["dim"], case["alpha"], None, te, _denoiser(comps), **case["kwargs"])
    net.apply_to(te, _denoiser(comps), apply_text_encoder=True, apply_unet=True)
    res = {"lora_tensors": randomize([(n, p) for n, p in net.named_parameters() if "lora_" in n], C.LORA_SEED),
           "modules": len(net.unet_loras) + len(net.text_encoder_loras)}
    out.update(outputs(family, comps, inputs, "live"))
    diffusers_named = net.state_dict()
    if case.get("sai_names"):
        # sd-scripts trains SDXL on its own SdxlUNet2DConditionModel (SAI names, full size only); the tiny U-Net is
        # diffusers', so the names are brought to SAI with sd-scripts' own map (convert_diffusers_to_sai_if_needed)
        orig = net.state_dict

        def sai_state_dict():
            sd = orig()
            mods["networks.lora"].convert_diffusers_to_sai_if_needed(sd)
            return sd
        net.state_dict = sai_state_dict
    net.save_weights(str(case_dir / LORA_FILE_KOHYA), torch.float32, _kohya_metadata(case))
    canonical_header(case_dir / LORA_FILE_KOHYA)
    written = load_file(str(case_dir / LORA_FILE_KOHYA))
    res["file_keys"] = len(written)
    res["alpha_keys"] = sum(k.endswith(".alpha") for k in written)
    res["header"] = read_meta(case_dir / LORA_FILE_KOHYA)
    # read back by sd-scripts itself (it reads SAI names only into its own full-size SdxlUNet: the file's SAI
    # names go back to diffusers names with the inverse of sd-scripts' map, checked against the network's own)
    readback_sd = written
    if case.get("sai_names"):
        readback_sd = sai_to_diffusers_sdxl(written)
        res["sai_inverse_equals_network_names"] = sorted(readback_sd) == sorted(diffusers_named) and all(
            torch.equal(readback_sd[k], diffusers_named[k]) for k in diffusers_named)
    kohya, rb = _kohya_readback(mods, case["module"], family, base, inputs, readback_sd)
    out.update(kohya)
    res["readback"] = rb
    res["kohya_vs_live"] = maxdiff(kohya, out, "kohya", "live")["max"]
    res["live_vs_base"] = maxdiff(out, out, "live", "base")
    save_outputs(case_dir, out)
    update_meta(case_dir, case=job["case"], family=family, versions_sdscripts=versions(), writer=case["module"],
                create_network={"dim": case["dim"], "alpha": case["alpha"], "kwargs": case["kwargs"]},
                lora_seed=C.LORA_SEED, lora_std=C.LORA_STD, base="../../_base/" + family, facts_sdscripts=res)
    return res


def step_kohya_trap(job: dict) -> dict:
    mods = _import_sd_scripts()
    case, family, base, case_dir, src_dir, inputs, sd, meta, out = _trap_setup(job, LORA_FILE_KOHYA)
    edit = case["edit"]
    res = {"source": case["source"], "edit": edit}
    if edit == "drop_alpha":
        new = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    elif edit == "swap_te":
        new = {(k.replace("lora_te1_", "lora_teX_").replace("lora_te2_", "lora_te1_").replace("lora_teX_",
                                                                                             "lora_te2_")): v
               for k, v in sd.items()}
    elif edit == "sd1_sai_names":
        m = sai_names_sd1(mods, sd, build_sdscripts_components(family, base)["unet"])
        new = {}
        for k, v in sd.items():
            mod, rest = k.split(".", 1)
            new[m.get(mod, mod) + "." + rest] = v
        res["renamed_modules"] = sum(a != b for a, b in m.items())
        res["example"] = sorted(set(m.values()))[0]
    else:
        raise SystemExit(f"unknown edit {edit}")
    save_file(dict(sorted(new.items())), str(case_dir / LORA_FILE_KOHYA), meta)
    canonical_header(case_dir / LORA_FILE_KOHYA)
    res["header_note"] = "source header kept as is (sshs_* hashes are the source's)"
    readback_sd = new
    if meta_sai(case, src_dir):
        # sd-scripts reads SAI names only into its own full-size SdxlUNet: back to the diffusers names with the
        # inverse of its own map (library.sdxl_model_util.make_unet_conversion_map)
        readback_sd = sai_to_diffusers_sdxl(new)
    if readback_sd is not None:
        try:
            kohya, rb = _kohya_readback(mods, json.loads((src_dir / "meta.json").read_text())["writer"], family,
                                        base, inputs, readback_sd)
        except Exception as e:     # noqa: BLE001 - sd-scripts refusing the file IS the measured fact
            res["readback_error"] = exc_text(e)
        else:
            out.update(kohya)
            res["readback"] = rb
            res["kohya_vs_source_live"] = maxdiff(kohya, out, "kohya", "live")
    save_outputs(case_dir, {k: v for k, v in out.items() if k.startswith("kohya.")})
    update_meta(case_dir, case=job["case"], family=family, versions_sdscripts=versions(), source="../" + case["source"],
                edit=edit, base="../../_base/" + family, facts_sdscripts=res)
    return res


def sai_to_diffusers_sdxl(sd: dict) -> dict:
    from library.sdxl_model_util import make_unet_conversion_map
    inv = {sai.replace(".", "_")[:-1]: hf.replace(".", "_")[:-1] for sai, hf in make_unet_conversion_map()}
    out = {}
    for k, v in sd.items():
        mod, rest = k.split(".", 1)
        if mod.startswith("lora_unet_"):
            m = mod[len("lora_unet_"):]
            hits = [p for p in inv if m == p or m.startswith(p + "_")]
            if hits:
                p = max(hits, key=len)
                mod = "lora_unet_" + inv[p] + m[len(p):]
        out[mod + "." + rest] = v
    return out


def meta_sai(case: dict, src_dir: Path) -> bool:
    meta = json.loads((src_dir / "meta.json").read_text())
    return bool(C.CASES.get(meta["case"], {}).get("sai_names"))


def step_kohya_load(job: dict) -> dict:
    case = job["case_data"]
    family = case["family"]
    base, case_dir = Path(job["paths"]["base_dir"]), Path(job["paths"]["case_dir"])
    inputs = load_inputs(base)
    mine = load_file(str(case_dir / "outputs.safetensors"))
    src_dir = case_dir.parent / case["source"] if "source" in case else case_dir
    ref = load_file(str(src_dir / "outputs.safetensors"))
    out = {**{k: v for k, v in ref.items() if k.startswith(("base.", "live."))}, **mine}
    res = {}
    comps = build_diffusers_components(family, base)
    mine_base = outputs(family, comps, inputs, "dbase")
    res["base_sdscripts_vs_diffusers_env"] = maxdiff(mine_base, out, "dbase", "base")
    res.update(_load_and_compare(family, base, inputs, case_dir / LORA_FILE_KOHYA, out, "live"))
    if any(k.startswith("kohya.") for k in out) and "load_error" not in res:
        res["loaded_vs_kohya"] = maxdiff(out, out, "loaded", "kohya")
    if case.get("edit") == "sd1_sai_names" and "load_error" in res:
        again = {k: v for k, v in ref.items() if k.startswith(("base.", "live."))}
        r2 = _load_and_compare(family, base, inputs, case_dir / LORA_FILE_KOHYA, again, "live",
                               unet_config=build_diffusers_components(family, base)["unet"].config)
        res["with_unet_config"] = r2
    save_outputs(case_dir, {k: v for k, v in out.items() if k.startswith(("loaded.", "fused."))})
    p = case_dir / "meta.json"
    meta = json.loads(p.read_text())
    meta.update(env_loader="diffusers", versions_loader=versions(), facts_diffusers=res)
    write_json(p, meta)
    return res


STEPS = {"base": step_base, "diffusers_write": step_diffusers_write, "diffusers_trap": step_diffusers_trap,
         "kohya_write": step_kohya_write, "kohya_trap": step_kohya_trap, "kohya_load": step_kohya_load}


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] != "generate":
        print("usage: worker.py generate JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[2]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = STEPS[job["step"]](job)
    write_json(Path(argv[3]), {"case": job["case"], "step": job["step"], "env": job["env"], "result": res})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
