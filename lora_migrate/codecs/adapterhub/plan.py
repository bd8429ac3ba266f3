"""Planning an AdapterHub target: one r and one alpha per adapter (ranks padded, scales rescaled where one alpha
cannot express them), the LoRA locations of a foreign source's modules by path and model type, and the config
built from the canonical adapter-level form.
"""

from __future__ import annotations

import re
from collections import Counter

from ...adapter import ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...execution import AdapterPlan, Execution, ModuleOut, Step, rescale_steps
from ...rules import describe
from ...rules.scale import SAME, choose_alpha
from ...schemas import Convention
from ...schemas.adapterhub import AH_LOCATIONS, FAMILY, MODEL_TYPE_BY_PATH
from ...source import SourceAdapter, base_model_config, json_number
from .format import target_config


GUESSED = "from module paths"  # infer_model_type's reason when no config says the model type


def infer_model_type(src: SourceAdapter, model_type: str | None) -> tuple[str, str]:
    """The base model's type (AdapterHub configs name it; PEFT configs do not), and how we know."""
    if model_type:
        return model_type, f"--model-type {model_type}"
    mt = src.info.model_type
    if mt:
        return mt, f"model_type {mt!r} from the source config"
    name = src.info.base_model
    mt = base_model_type(name)
    if mt:
        return mt, f"model_type {mt!r} from the config.json of base model {name!r}"
    found = Counter()
    for e in src.modules:
        for rx, t in MODEL_TYPE_BY_PATH:
            if re.search(rx, e.module):
                found[t] += 1
                break
    if not found:
        raise LoraMigrateError(f"{src.info.name}: cannot tell the base model's type from module paths like "
                               f"{src.modules[0].module!r}; pass --model-type")
    t = found.most_common(1)[0][0]
    # built-in llama/mistral and the plug-in interfaces swap which of up_proj/down_proj is "intermediate": with
    # both adapted both flags are set and the keys name the modules; with one of them the flag picks the module
    mlp = {m.group(1): e.module for e in src.modules if (m := re.search(r"\.mlp\.(up|down)_proj$", e.module))}
    if t == "llama" and len(mlp) == 1:
        mlp = next(iter(mlp.values()))
        raise LoraMigrateError(
            f"{src.info.name}: the base model's type decides where {mlp!r} goes in AdapterHub (built-in "
            "llama/mistral: down_proj is 'intermediate'; plug-in qwen2/qwen3/gemma2/gemma3_text: up_proj is), and "
            + (f"base model {name!r} is neither a local folder nor in the Hugging Face cache" if name else
               "the adapter's config names no base model") + "; pass --model-type")
    return t, f"model type {t!r} {GUESSED} like {src.modules[0].module!r}"


def base_model_type(name: str | None) -> str | None:
    """``model_type`` from the base model's config.json (:func:`source.base_model_config`), or None."""
    mt = (base_model_config(name) or {}).get("model_type")
    return mt if isinstance(mt, str) else None


def _ah_locations(src: SourceAdapter, model_type: str, guessed: bool = False) -> dict[str, tuple[str, str | None]]:
    """Where AdapterHub LoRA attaches each module. ``guessed``: the model type comes from module paths alone; the
    refusal then says so (a Phi or Falcon base looks like llama or gpt2 by its paths)."""
    hint = (f" (model type {model_type!r} guessed from module paths, as the adapter's config names no base model "
            "this machine has; pass --model-type if the base is another)") if guessed else ""
    table = AH_LOCATIONS.get(model_type)
    if table is None:
        raise UnsupportedFeature(f"{src.info.name}: no AdapterHub LoRA location table for model type "
                                 f"{model_type!r} (known: {', '.join(sorted(AH_LOCATIONS))})")
    out = {}
    for e in src.modules:
        hit = next(((loc, key) for rx, loc, key in table if re.search(rx, "." + e.module)), None)
        if hit is None:
            raise UnsupportedFeature(
                f"{src.info.name}: AdapterHub LoRA cannot attach to {e.module!r}: for {model_type} it wraps only "
                + ", ".join(rx.strip("\\.$").replace("\\.", ".") for rx, _, _ in table) + hint)
        out[e.module] = hit
    return out


def plan_adapterhub(src, target, output, steps, model_type, safetensors, keep_head, doubled) -> Execution:
    name = src.info.name
    out: dict[str, ModuleOut] = {}
    fused_modules = set()
    notes = list(src.notes)
    foreign = src.convention.family != FAMILY
    if foreign:
        mt, why = infer_model_type(src, model_type)
        locs = _ah_locations(src, mt, guessed=GUESSED in why)
        fused_modules = {m for m, (loc, _) in locs.items() if loc == "fused"}
        steps.append(Step(rule="map_locations", what=f"{why}: every module maps by path to an AdapterHub LoRA "
                          "location (selfattn / intermediate / output" + (" / fused QKV" if fused_modules else "")
                          + ")"))
        if fused_modules:
            steps.append(Step(rule="to_fused_qkv", what=describe("to_fused_qkv")))
        ranks = {e.rank * (2 if doubled else 1) for e in src.modules}
    else:
        mt, locs = src.info.model_type, None
        ranks = {e.rank for e in src.modules}
        if len(ranks) != 1:
            raise LoraMigrateError(f"{name}: modules have ranks {sorted(ranks)}, but an AdapterHub config holds one r")
    r = max(ranks)
    if len(ranks) > 1:
        steps.append(Step(rule="pad_rank", what=f"ranks {sorted(ranks)} → {r}: " + describe("pad_rank")))
    kind_of = {e.module: ("fused_qkv" if e.module in fused_modules else e.kind) for e in src.modules}
    alpha_out, out_scales = choose_alpha([(kind_of[e.module], e.scale, r) for e in src.modules], target,
                                         src.info.alpha, r)
    steps.append(Step(rule="choose_alpha", what=f"write alpha={alpha_out:g}, r={r}: {target.name} then applies "
                      + ", ".join(f"{s:g} to {k}" for k, s in sorted(out_scales.items()))))
    scales_in: dict[str, float] = {}
    rescaled = 0
    for e in src.modules:
        k = kind_of[e.module]
        scales_in.setdefault(k, e.scale)
        t = out_scales[k]
        prov = ScaleProvenance(alpha=alpha_out, r=r, rule=f"{target.scaling[k].value} ({k})", convention=target.name)
        out[e.module] = ModuleOut(scale=t, provenance=prov, pad_to=r if e.rank * (2 if doubled else 1) != r else None,
                                  to_fused=e.module in fused_modules)
        rescaled += abs(e.scale / t - 1) > SAME
    rescale_steps(steps, src, kind_of, out)
    if foreign:
        config, cfg_notes = ah_config_from_locations(target, locs, r, alpha_out)
    else:
        config, cfg_notes = target_config(target, src.info, r, alpha_out)
    weights = target.weights_write_safetensors if safetensors else target.weights_write
    files = [target.config_file, weights]
    notes += cfg_notes
    if src.head is not None:
        if src.head.static_copy and not keep_head:
            steps.append(Step(rule="drop_static_head", what=f"leave out {', '.join(f.name for f in src.head.files)}: "
                              f"{src.head.reason} (--keep-head copies it)"))
        else:
            files += [f.name for f in src.head.files]
            steps.append(Step(rule="copy_head", what=f"copy {', '.join(f.name for f in src.head.files)} unchanged"))
    steps.append(Step(rule="write", what=f"write {weights} with keys {target.keys.a.format(module='<module>', adapter=name)}"
                      f" / lora_B, config version {target.version_to_write!r}"))
    plan = AdapterPlan(adapter=name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=files, modules=len(src.modules), r=r, alpha_in=src.info.alpha,
                       alpha_out=alpha_out, scales_in=scales_in, scales_out=out_scales, rescaled=rescaled,
                       steps=steps, notes=notes)
    return Execution(plan=plan, source=src, target=target, out=out, config=config,
                     codec_state={"model_type": mt} if foreign else {})


def ah_config_from_locations(target: Convention, locs: dict, r: int, alpha: float) -> tuple[dict, list[str]]:
    """An AdapterHub LoRA config that builds LoRA at the given modules' locations (and, where the flags cover
    more modules than the source adapted, at others too: those start with B = 0 and change nothing)."""
    keys = [k for loc, k in locs.values() if loc == "selfattn"]
    fused = any(loc == "fused" for loc, _ in locs.values())
    attn = [k for k in ("q", "k", "v") if k in keys or fused]
    cfg = {"architecture": "lora", "selfattn_lora": bool(attn), "attn_matrices": attn or ["q", "v"],
           "intermediate_lora": any(loc == "intermediate" for loc, _ in locs.values()),
           "output_lora": any(loc == "output" for loc, _ in locs.values()),
           "r": int(r), "alpha": json_number(alpha), "dropout": 0.0,
           "composition_mode": "add", "init_weights": "lora", "use_gating": False}
    for f in target.config_write_fields:
        cfg.setdefault(f, target.config_defaults.get(f))
    return {f: cfg[f] for f in target.config_write_fields}, []
