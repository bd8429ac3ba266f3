"""Planning a PEFT-family target (the PEFT eras and the servers that read PEFT files): per-module (r, alpha) and
patterns, the server profiles (one global alpha, rank padding, layer fills), embedding scales, and the
adapter_config.json built from the canonical adapter-level form.
"""

from __future__ import annotations

from ...adapter import ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...execution import AdapterPlan, Execution, ModuleOut, Step, mode, rescale_steps
from ...rules import describe
from ...rules.coverage import layer_type, layers_by_type, missing_layers, module_at
from ...rules.refuse import refuse_before_release
from ...rules.scale import SAME, module_alpha
from ...schemas import Convention, Scaling
from ...schemas.peft import DEFAULTS as PEFT_DEFAULTS
from ...schemas.peft import FAMILY, FIELDS_SINCE, PEFT_PREFIX, conv_requirements
from ...source import ModuleEntry, SourceAdapter, json_number
from . import experts as pex
from . import format as pf


def _kernel_rank(r: int) -> int:
    """LoRAX pads ranks for its SGMV kernel (utils/punica.py pad_rank at world size 1: ≤ 8 → 8, else the next
    multiple of 16) and then computes later layer types' scale from the padded r (peft.md §7.3). Writing the
    padded rank makes that mutation a no-op."""
    return 8 if r <= 8 else -(-r // 16) * 16


def plan_peft(src, target, output, steps, doubled: bool, num_layers: int | None = None) -> Execution:
    name = src.info.name
    serving = target.serving
    notes = list(src.notes)
    if not serving:  # the serving targets have no conv LoRA at all (refused by kind)
        notes += refuse_before_release(name, conv_requirements(src.conv_dims, "dora" in src.features, src.has_experts), target)
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
                         src_rule if src.convention.family == FAMILY and same_rank else None)
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
                             src_rule if src.convention.family == FAMILY else None)
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

        def pkey(m):  # PEFT matches a parameter's patterns on <module>.<parameter>
            return pf.pattern_key_for(key, pex.router_parameter(m, src.has_experts) or m)

        rank_pattern = {pkey(m): out[m].r for m in mods if out[m].r != r_glob}
        alpha_pattern = {pkey(m): json_number(out[m].alpha) for m in mods if out[m].alpha != alpha_glob}
        if src.peft is not None and not doubled and (rslora_out == ("rslora" in src.features)):
            # keep the source's own patterns when the target era reads them to the same (r, alpha) everywhere
            cfg = src.peft
            same = all(pf.module_r_alpha(key, pex.router_parameter(m, src.has_experts) or m, cfg.r,
                                         float(cfg.lora_alpha), cfg.rank_pattern, cfg.alpha_pattern)
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
    if src.convention.family != FAMILY:
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
            name = src.info.base_model
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
                          f"({', '.join(k[len(PEFT_PREFIX):] for k in src.extras[:2])}): {server} takes them "
                          f"from the base model; older {server} raises \"is unsupported LoRA weight\" on them"))
    return []


def coverage_unproven(src: SourceAdapter) -> str | None:
    """Why the source's config does not prove that each adapted layer type covers every layer of the model, or None
    when it does: PEFT ``target_modules`` as a list of names (or "all-linear", or None: the model type's defaults),
    with no ``layers_to_transform`` / ``exclude_modules``; AdapterHub without ``leave_out``."""
    return src.info.coverage_unproven


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
    on_param = {e.module: pex.router_parameter(e.module, src.has_experts) or e.module for e in src.modules
                if e.kind == "experts" or pex.router_parameter(e.module, src.has_experts)}
    mods = [e.module for e in src.modules if e.module not in on_param]
    params = sorted(on_param.values())  # LoRA on raw parameters
    if src.peft is not None and not serving:
        base = dict(src.info.config)
    else:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
        base = {"peft_type": "LORA", "task_type": src.info.task_type,
                "base_model_name_or_path": src.info.base_model,
                "target_modules": leaves if serving else sorted(mods), "bias": "none",
                "fan_in_fan_out": src.info.fan_in_fan_out, "target_parameters": params or None}
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
