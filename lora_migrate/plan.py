"""The planner: (source adapter, target convention) → the ordered rules, and the output they produce.

A plan is made from names, shapes and dtypes alone: the rule pipeline runs on ``meta`` tensors, so the output's
tensor list (the header of a streamed safetensors file) is known before any data is read. Refusals happen here,
before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter

from .adapter import ScaleProvenance
from .errors import LoraMigrateError, UnsupportedFeature
from .formats import peft as pf
from .formats.adapterhub import target_config
from .initial import RebuiltInitial, StoredOLoRAInitial
from .rules import describe
from .rules.coverage import layer_type, layers_by_type, missing_layers, module_at
from .rules.refuse import refuse_before_release, refuse_features, refuse_gated, refuse_kinds
from .rules.scale import SAME, choose_alpha, module_alpha
from .schemas import Convention, Scaling
from .schemas.adapterhub import AH_LOCATIONS, MODEL_TYPE_BY_PATH
from .schemas.peft import DEFAULTS as PEFT_DEFAULTS
from .schemas.peft import FIELDS_SINCE, conv_requirements, mutating_init, rebuild_rule
from .execution import AdapterPlan, Execution, ModuleOut, Step, meta_delta, mode, rescale_steps
from .source import ModuleEntry, SourceAdapter, base_model_config, json_number


# ------------------------------------------------------------------------------------------------ helpers


GUESSED = "from module paths"  # infer_model_type's reason when no config says the model type


def infer_model_type(src: SourceAdapter, model_type: str | None) -> tuple[str, str]:
    """The base model's type (AdapterHub configs name it; PEFT configs do not), and how we know."""
    if model_type:
        return model_type, f"--model-type {model_type}"
    mt = src.info.wrapper.get("model_type")
    if mt:
        return mt, f"model_type {mt!r} from the source config"
    name = src.info.wrapper.get("model_name")
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


def _kernel_rank(r: int) -> int:
    """LoRAX pads ranks for its SGMV kernel (utils/punica.py pad_rank at world size 1: ≤ 8 → 8, else the next
    multiple of 16) and then computes later layer types' scale from the padded r (peft.md §7.3). Writing the
    padded rank makes that mutation a no-op."""
    return 8 if r <= 8 else -(-r // 16) * 16


# ------------------------------------------------------------------------------------------------ planning


def plan_adapter(src: SourceAdapter, target: Convention, output: str, *, safetensors: bool = False,
                 keep_head: bool = False, initial: SourceAdapter | None = None,
                 model_type: str | None = None, num_layers: int | None = None) -> Execution:
    """Plan the conversion of one adapter into ``target``; refusals raise here, before anything is written.
    ``num_layers``: the base model's layer count, which LoRAX needs for an adapter on only some layers."""
    name = src.info.name
    steps = [Step(rule="read", what=f"read {len(src.modules)} modules as {src.convention.name} "
                                    f"({src.convention.scaling_notes})")]
    refuse_gated(name, src.gated)
    kinds = {e.kind for e in src.modules}
    if target.family == "peft" and "fused_qkv" in kinds:
        kinds = (kinds - {"fused_qkv"}) | {"linear"}
        steps.append(Step(rule="expand_fused_qkv", what=describe("expand_fused_qkv")))
    refuse_kinds(name, kinds, target)
    refuse_features(name, src.features, target)
    initial_entries = _check_initial(src, initial, steps)
    if target.family == "adapterhub":
        ex = _plan_adapterhub(src, target, output, steps, model_type, safetensors, keep_head, initial is not None)
    else:
        ex = _plan_peft(src, target, output, steps, doubled=initial is not None, num_layers=num_layers)
    ex.initial, ex.initial_entries = initial, initial_entries
    ex.safetensors, ex.keep_head = safetensors, keep_head
    for e in ex.entries():  # the output header, from meta tensors run through the same pipeline
        d = ex.apply(meta_delta(e), e)
        for p, t in (("a", d.A), ("b", d.B), ("bias", d.bias), ("magnitude", d.magnitude)):
            if t is not None:
                ex.tensors.append((d.module, d.kind, p, tuple(t.shape), t.dtype))
    if ex.extras:
        steps.append(Step(rule="copy_extras", what=f"copy {len(ex.extras)} non-LoRA tensors unchanged"))
    steps.append(Step(rule="verify", what="compare every module's ΔW = s·B·A in the written output "
                                          "(read back as the target) with the source's"))
    return ex


def _check_initial(src: SourceAdapter, initial: SourceAdapter | None, steps: list[Step]):
    if mutating_init(src.init) and initial is None:
        how = ("--base-model PATH (the original base model, to rebuild the initial adapter from) or "
               if rebuild_rule(src.init) else "")
        raise UnsupportedFeature(
            f"{src.info.name}: init_lora_weights={src.init!r} changed the base weights at init, so this adapter "
            f"only holds on the residual model; pass {how}--initial-adapter DIR (the adapter saved before "
            "training) to re-express it as rank-2r LoRA against the original weights")
    if initial is None:
        return None
    if src.init is not None and not mutating_init(src.init):
        raise LoraMigrateError(f"{src.info.name}: --initial-adapter given, but init_lora_weights={src.init!r} did "
                               "not change the base weights")
    if any(e.kind != "linear" for e in src.modules) or src.features & {"dora", "lora_bias"}:
        raise UnsupportedFeature(f"{src.info.name}: the rank-2r re-expression covers plain linear LoRA only")
    by = {e.module: e for e in initial.modules}
    missing = [e.module for e in src.modules if e.module not in by]
    if missing:
        raise LoraMigrateError(f"initial adapter has no module {missing[0]!r}")
    if isinstance(initial, RebuiltInitial):
        steps.append(Step(rule=initial.rule, what=f"A₀, B₀ of {len(by)} modules from the original weights "
                          f"({initial.where}): " + describe(initial.rule)))
    elif isinstance(initial, StoredOLoRAInitial):
        steps.append(Step(rule="olora_stored_init", what=describe("olora_stored_init")))
    steps.append(Step(rule="pissa_to_lora", what=describe("pissa_to_lora") + f" (init was {src.init or 'mutating'!r})"))
    return by


def _plan_adapterhub(src, target, output, steps, model_type, safetensors, keep_head, doubled) -> Execution:
    name = src.info.name
    out: dict[str, ModuleOut] = {}
    fused_modules = set()
    notes = list(src.notes)
    if src.convention.family == "peft":
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
        mt, locs = src.info.wrapper.get("model_type"), None
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
    if src.convention.family == "peft":
        config, cfg_notes = ah_config_from_locations(target, locs, r, alpha_out)
        src.info.wrapper.update(model_type=mt)
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
    return Execution(plan=plan, source=src, target=target, out=out, config=config)


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


def _plan_peft(src, target, output, steps, doubled: bool, num_layers: int | None = None) -> Execution:
    name = src.info.name
    serving = target.serving
    notes = list(src.notes)
    if not serving:  # the serving targets have no conv LoRA at all (refused by kind)
        notes += refuse_before_release(name, conv_requirements(src.conv_dims, "dora" in src.features), target)
    fills = _layer_fills(src, num_layers, steps) if serving and serving.drops_partial_layer_types else []
    out: dict[str, ModuleOut] = {}
    src_rule = Scaling.ALPHA_OVER_SQRT_R if "rslora" in src.features else Scaling.ALPHA_OVER_R
    rslora_out = ("rslora" in src.features and "use_rslora" in target.config_write_fields)
    rule_out = Scaling.ALPHA_OVER_SQRT_R if rslora_out else Scaling.ALPHA_OVER_R
    ranks = {e.module: (e.rank * (len(e.fused.groups) if e.fused else 1)) * (2 if doubled else 1)
             for e in [*src.modules, *fills]}
    if serving:
        R = max(ranks.values())
        if serving.pads_rank:
            R = _kernel_rank(R)
        if set(ranks.values()) != {R}:
            steps.append(Step(rule="pad_rank", what=f"ranks {sorted(set(ranks.values()))} → {R} (one rank: "
                              f"{serving.server} stacks one rank per layer type"
                              f"{f'; {serving.server} kernel padding' if serving.pads_rank else ''}): "
                              + describe("pad_rank")))
        # one global alpha/R: lora_alpha expresses the scale most modules have (their B untouched; from rsLoRA's
        # α itself, α·√r, at the source's own rank); only modules with another scale get it folded into B
        s_glob = mode([e.scale for e in src.modules])
        e0 = next(e for e in src.modules if e.scale == s_glob)
        same_rank = ranks[e0.module] == R and e0.fused is None and not doubled
        a = module_alpha(s_glob, R, Scaling.ALPHA_OVER_R, e0.provenance.alpha if same_rank else None,
                         src_rule if src.convention.family == "peft" and same_rank else None)
        prov = ScaleProvenance(alpha=a, r=R, rule="alpha/r (one global alpha)", convention=target.name)
        for e in [*src.modules, *fills]:
            out[e.module] = ModuleOut(scale=a / R, provenance=prov, pad_to=R if ranks[e.module] != R else None,
                                      alpha=a, r=R)
        folded = sum(abs(e.scale / (a / R) - 1) > SAME for e in src.modules)
        steps.append(Step(rule="global_alpha", what=f"lora_alpha = {a:.10g}, r = {R}, use_rslora = false, no "
                          f"patterns: {target.name} applies one global alpha/r"
                          + (" (and ignores use_rslora)" if not serving.honours_rslora and not serving.rslora_note
                             else "")
                          + f"; it expresses the scale of {len(src.modules) - folded} of {len(src.modules)} modules "
                          "with B untouched" + (f", the other {folded} get theirs folded into B" if folded else "")))
        r_glob, alpha_glob, rank_pattern, alpha_pattern = R, a, {}, {}
    else:
        for e in src.modules:
            rm = ranks[e.module]
            same_rank = e.fused is None and not doubled
            a = module_alpha(e.scale, rm, rule_out, e.provenance.alpha if same_rank else None,
                             src_rule if src.convention.family == "peft" else None)
            prov = ScaleProvenance(alpha=a, r=rm, rule=f"{rule_out.value} ({e.kind})", convention=target.name)
            out[e.module] = ModuleOut(scale=rule_out.scale(a, rm), provenance=prov, alpha=a, r=rm)
        if "rslora" in src.features and not rslora_out:
            steps.append(Step(rule="module_alpha", what=f"{target.name} has no use_rslora: alpha' = alpha·√r per "
                              "module (" + describe("module_alpha") + ")"))
        mods = [e.module for e in src.modules]
        src_r = src.peft.r if src.peft is not None else src.info.r
        r_glob = mode([out[m].r for m in mods], prefer=src_r * (2 if doubled else 1) if src_r else None)
        alpha_glob = mode([out[m].alpha for m in mods])
        key = target.pattern_matching or "regex"
        rank_pattern = {pf.pattern_key_for(key, m): out[m].r for m in mods if out[m].r != r_glob}
        alpha_pattern = {pf.pattern_key_for(key, m): json_number(out[m].alpha) for m in mods if out[m].alpha != alpha_glob}
        if src.peft is not None and not doubled and (rslora_out == ("rslora" in src.features)):
            # keep the source's own patterns when the target era reads them to the same (r, alpha) everywhere
            cfg = src.peft
            same = all(pf.module_r_alpha(key, m, cfg.r, float(cfg.lora_alpha), cfg.rank_pattern, cfg.alpha_pattern)
                       == (out[m].r, out[m].alpha) for m in mods)
            if same:
                r_glob, alpha_glob = cfg.r, float(cfg.lora_alpha)
                rank_pattern, alpha_pattern = dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
            elif cfg.rank_pattern or cfg.alpha_pattern:
                steps.append(Step(rule="rewrite_patterns", what=f"{target.name} matches the source's rank/alpha "
                                  f"patterns differently ({target.pattern_matching}); written as full-path keys"))
        if rank_pattern or alpha_pattern:
            steps.append(Step(rule="patterns", what=f"r={r_glob}, lora_alpha={alpha_glob:g}; "
                              f"{len(rank_pattern)} rank_pattern and {len(alpha_pattern)} alpha_pattern entries"))
    _embedding_factors(src, target, out, steps)
    config = peft_config(src, target, r_glob, alpha_glob, rslora_out and not serving, rank_pattern, alpha_pattern,
                         notes, serving)
    extras = _without_base_copies(src, steps, serving.server) if serving and serving.skips_frozen_base_copies \
        else list(src.extras)
    kind_of = {e.module: e.kind for e in src.modules}
    rescale_steps(steps, src, kind_of, out)
    rescaled = sum(abs(e.scale / out[e.module].scale - 1) > SAME for e in src.modules)
    weights = target.weights_write
    steps.append(Step(rule="write", what=f"write {weights} with keys base_model.model.<module>.lora_A.weight / "
                      f"lora_B.weight{' (+ extras)' if extras else ''}; adapter_config.json for {target.name}"))
    scales_in, scales_out = {}, {}
    for e in src.modules:
        scales_in.setdefault(e.kind, e.scale)
        scales_out.setdefault(e.kind, out[e.module].scale)
    plan = AdapterPlan(adapter=name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=[target.config_file, weights], modules=len(src.modules) + len(fills),
                       r=r_glob, alpha_in=src.info.alpha, alpha_out=alpha_glob, scales_in=scales_in,
                       scales_out=scales_out, rescaled=rescaled, steps=steps, notes=notes)
    return Execution(plan=plan, source=src, target=target, out=out, config=config, fills=fills,
                     extras=extras)


def _embedding_factors(src: SourceAdapter, target: Convention, out: dict[str, ModuleOut], steps: list[Step]):
    """Embedding LoRA on a scaled embedding (the base layer multiplies its output by embed_scale f, √d for Gemma3
    and BART with scale_embedding): PEFT ≥ 0.18 multiplies the LoRA output by f too, older eras do not (#2825).
    The target's effective scale includes f where the target applies it, so ``rescale`` writes B' = f·B into an
    older era and B/f into a newer one. Refused when the eras differ and f is unknown (no base config.json)."""
    if src.convention.family != "peft":
        return
    s_on, t_on = src.convention.lora_embedding_scaled, target.lora_embedding_scaled
    for e in src.modules:
        if e.kind != "embedding":
            continue
        f = e.embed_scale
        if t_on is None and f not in (None, 1.0):
            raise UnsupportedFeature(f"{src.info.name}: embedding LoRA on {e.module}, a scaled embedding (embed_scale "
                                     f"{f:g}): whether {target.name} multiplies its output by that factor is not "
                                     "established; refused rather than served wrong")
        if t_on is None or s_on == t_on:
            if t_on and f:
                out[e.module].scale *= f
            continue
        if f is None:
            name = src.info.wrapper.get("model_name")
            raise UnsupportedFeature(
                f"{src.info.name}: embedding LoRA on {e.module}: PEFT ≥ 0.18 multiplies it by the base layer's "
                f"embed_scale (Gemma3, BART with scale_embedding: √d; #2825), {src.convention.name if s_on else target.name}"
                f" does, {target.name if s_on else src.convention.name} does not, and the factor needs the base "
                "model's config.json: " + (f"base model {name!r} is neither a local folder nor in the Hugging Face "
                                           "cache" if name else "the adapter's config names no base model")
                + "; pass --base-model DIR")
        if f == 1.0:
            continue
        if "dora" in src.features:
            raise UnsupportedFeature(f"{src.info.name}: DoRA on the scaled embedding {e.module}: {target.name} and "
                                     f"{src.convention.name} differ by embed_scale {f:g} after DoRA's weight norm "
                                     "(#2839), which no rescale of B expresses")
        if t_on:
            out[e.module].scale *= f
        steps.append(Step(rule="embed_scale", what=f"{e.module}: {src.convention.name if s_on else target.name} "
                          f"multiplies embedding LoRA by the base layer's embed_scale {f:.10g} (PEFT 0.18.0, #2825),"
                          f" {target.name if s_on else src.convention.name} does not: B' = "
                          f"{'' if s_on else '1/'}{f:.10g}·B"))


def _without_base_copies(src: SourceAdapter, steps: list[Step], server: str) -> list[str]:
    """A server that reads only lora_A/B and lora_embedding_A/B keys (``Serving.skips_frozen_base_copies``: vLLM).
    Of what PEFT saves beside them (the other kinds are refused by ``refuse_features``), the frozen embedding copies
    ``...embed_tokens|lm_head.base_layer.weight`` are the base model's own weights, which the server takes from the
    base model: vLLM's newest skips them by name (``is_base_embeddding_weights``), older releases and other layer
    names raise "... is unsupported LoRA weight". So they are left out: nothing extra is written. A saved
    embedding with no LoRA on it (a resized vocabulary) is refused."""
    for k in src.extras:
        if not pf.is_frozen_base_copy(k):
            raise UnsupportedFeature(f"{src.info.name}: {server} refuses it: \"{k} is unsupported LoRA weight\" (a "
                                     "full embedding/lm_head weight saved without LoRA on it, as for a resized "
                                     "vocabulary)")
    if src.extras:
        steps.append(Step(rule="drop_base_copies", what=f"leave out {len(src.extras)} frozen base embedding copies "
                          f"({', '.join(k[len(pf.PEFT_PREFIX):] for k in src.extras[:2])}): {server} takes them "
                          f"from the base model; older {server} raises \"is unsupported LoRA weight\" on them"))
    return []


def coverage_unproven(src: SourceAdapter) -> str | None:
    """Why the source's config does not prove that each adapted layer type covers every layer of the model, or None
    when it does: PEFT ``target_modules`` as a list of names (or "all-linear", or None: the model type's defaults),
    with no ``layers_to_transform`` / ``exclude_modules``; AdapterHub without ``leave_out``."""
    cfg = src.info.config
    if src.convention.family != "peft":
        return f"leave_out={cfg['leave_out']} leaves layers out" if cfg.get("leave_out") else None
    # layers_pattern only matters with layers_to_transform (PEFT refuses it alone)
    for f, what in (("layers_to_transform", "adapts only those layers"), ("exclude_modules", "leaves modules out")):
        if cfg.get(f) not in (None, [], ""):
            return f"{f}={cfg[f]!r} {what}"
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear":
        return f"target_modules is a regex ({tm!r}), which may match only some layers"
    return None


def lorax_drops(src: SourceAdapter) -> tuple[bool, str] | None:
    """What LoRAX does with this adapter's layer types as it is (peft.md §7.3): (True, why) when some type surely
    lacks a layer (another type has it), so LoRAX drops that type in every layer; (False, why) when the config
    does not prove full coverage (layers_to_transform, a regex, …), so it drops them if the model has more layers
    than the adapter covers; None when every type covers every layer."""
    by_type = layers_by_type(e.module for e in src.modules)
    if not by_type:
        return None
    seen = set().union(*by_type.values())
    gaps = missing_layers((e.module for e in src.modules), seen)
    if gaps:
        t, idx = next(iter(gaps.items()))
        return True, (f"LoRAX drops {', '.join(sorted(g.rsplit('.', 1)[-1] for g in gaps))} in every layer: {t} "
                      f"lacks layer{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))}, so its weights are "
                      "silently unused")
    why = coverage_unproven(src)
    if why is None:
        return None
    types = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in by_type}))
    return False, (f"LoRAX drops {types} in every layer if the model has layers other than "
                   f"{_ranges(sorted(seen))} ({why})")


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5"."""
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _layer_fills(src: SourceAdapter, num_layers: int | None, steps: list[Step]) -> list[ModuleEntry]:
    """Zero adapters for the layers each layer type lacks (LoRAX drops a type in every layer when one layer lacks
    it, peft.md §7.3), over layers 0..num_layers-1. Without ``num_layers`` there is nothing to fill only when the
    config proves that every type covers every layer and the file has every type in every layer it has; otherwise
    the model's layer count is unknown and the conversion is refused."""
    by_type = layers_by_type(e.module for e in src.modules)
    if not by_type:
        return []
    seen = set().union(*by_type.values())
    if num_layers is not None:
        if max(seen) >= num_layers:
            raise LoraMigrateError(f"{src.info.name}: --num-layers {num_layers}, but the adapter has layer "
                                   f"{max(seen)}")
        layers = range(num_layers)
    else:
        gaps = missing_layers((e.module for e in src.modules), seen)
        why = coverage_unproven(src)
        if why is None and not gaps:
            return []
        if why is None:
            t, idx = next(iter(gaps.items()))
            why = f"{t} lacks layer{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))} that other types have"
        types = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in by_type}))
        raise UnsupportedFeature(
            f"{src.info.name}: {why}, so the model's layer count is unknown; LoRAX drops a layer type in every "
            f"layer when any layer lacks its weights (here {types} would be silently unused); pass --num-layers N "
            "(the base model's layer count) to fill the missing layers with zero adapters")
    gaps = missing_layers((e.module for e in src.modules), layers)
    first = {}
    for e in src.modules:
        first.setdefault(layer_type(e.module)[0], e)
    fills = [ModuleEntry(module=module_at(t, i), kind=first[t].kind, keys={}, metas=first[t].metas,
                         scale=first[t].scale, provenance=first[t].provenance, fused=first[t].fused)
             for t, idx in gaps.items() for i in idx]
    if fills:
        steps.append(Step(rule="zero_adapter", what=f"{len(fills)} zero adapters for layers "
                          + "; ".join(f"{t}: {', '.join(map(str, idx))}" for t, idx in gaps.items())
                          + f" of 0..{max(layers)} (LoRAX drops a type that any layer lacks): "
                          + describe("zero_adapter")))
    return fills


def peft_config(src: SourceAdapter, target: Convention, r: int, alpha: float, rslora: bool, rank_pattern: dict,
                alpha_pattern: dict, notes: list[str], serving: bool) -> dict:
    """adapter_config.json for a PEFT-family target: the fields the target era knows, from the source where it
    is PEFT, else built from the modules. A field the target lacks is dropped only at its default value."""
    fields = list(target.config_write_fields)
    mods = [e.module for e in src.modules]
    if src.peft is not None and not serving:
        base = dict(src.info.config)
    else:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
        base = {"peft_type": "LORA", "task_type": src.info.config.get("task_type") if src.peft else None,
                "base_model_name_or_path": src.info.wrapper.get("model_name"),
                "target_modules": leaves if serving else sorted(mods), "bias": "none",
                "fan_in_fan_out": bool(src.peft.fan_in_fan_out) if src.peft else
                src.info.wrapper.get("model_type") == "gpt2"}
    base.update(r=int(r), lora_alpha=json_number(alpha), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                init_lora_weights=True, use_rslora=rslora, inference_mode=True)
    if "dora" in src.features:
        base["use_dora"] = True
    if "lora_bias" in src.features:
        base["lora_bias"] = True
    out = {}
    for f in fields:
        out[f] = base.pop(f) if f in base else PEFT_DEFAULTS.get(f)
    for f, v in base.items():
        if v == PEFT_DEFAULTS.get(f, object()) or v in (None, [], {}) or f in ("peft_version",):
            continue
        since = FIELDS_SINCE.get(f)
        if since and target.pattern_matching and not serving and target.releases_with(since) != "none":
            out[f] = v
            notes.append(f"{f}={v!r} written: it needs PEFT ≥ {since}")
            continue
        why = f": {pf.PEFT_ONLY[f]}" if f in pf.PEFT_ONLY else ""
        raise UnsupportedFeature(f"{src.info.name}: config field {f}={v!r} cannot be expressed in {target.name}"
                                 + (f" (PEFT ≥ {since}{why})" if since else why))
    if "peft_version" in fields:
        out["peft_version"] = target.version_to_write
    return out

