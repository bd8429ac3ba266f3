"""What another PEFT-family convention computes when it loads a PEFT folder as it is (``inspect``)."""

from __future__ import annotations

import math

from ...findings import LoadCheck
from ...schemas import CONVENTIONS, Scaling
from ...schemas.peft import FAMILY, FIELDS_SINCE, conv_requirements, fields_of
from ...source import SourceAdapter
from ...errors import LoraMigrateError
from .format import PEFT_ONLY, module_r_alpha, plan_module
from .plan import lorax_drops


def read_as(c, a: SourceAdapter, e) -> tuple[int, float]:
    """(r, scale) of module ``e`` of ``a`` as convention ``c`` reads it: the module read again by the reader with
    ``c``'s pattern matching, scaling and serving profile (:func:`format.plan_module`); where ``c`` builds the
    layer at another rank than the tensor's (its pattern keys match differently), that r and its scale."""
    try:
        got = plan_module(c, a.store, e.module, e.keys, a.peft, c.pattern_matching or "regex", str(a.files[-1]),
                          [], set(), experts=e.kind == "experts")
        return got.provenance.r, got.scale
    except LoraMigrateError:  # the rank c's patterns give this module contradicts its tensors
        r, alpha = module_r_alpha(c.pattern_matching, e.module, a.peft.r, float(a.peft.lora_alpha),
                                  a.peft.rank_pattern, a.peft.alpha_pattern)
        rule = Scaling.ALPHA_OVER_SQRT_R if a.peft.use_rslora and "rslora" in c.features else Scaling.ALPHA_OVER_R
        return r, rule.scale(alpha, r)


def as_loaded(a: SourceAdapter) -> list[LoadCheck]:
    """For each other PEFT-family convention: what it computes loading this folder as it is (peft.md §1.3, §4.5,
    §7, §8): its pattern matching, whether it knows use_rslora, fields it chokes on, tensors it drops."""
    cfg = a.peft
    out = []
    needs = conv_requirements(a.conv_dims, "dora" in a.features)  # the experts' need: below (ignored, not fatal)
    for c in CONVENTIONS:
        if c.family != FAMILY or c is a.convention:
            continue
        missing = [(what, since) for what, since in needs
                   if c.serving is None and c.releases_with(since) == "none"]
        if missing:
            out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                 detail=f"FAILS to load: {missing[0][0]} needs PEFT ≥ {missing[0][1]} (an older "
                                        "PEFT raises on the target module); no conversion can change that"))
            continue
        problems = []
        if c.strict_config_fields:
            unknown = sorted(k for k, v in a.info.config.items() if k not in fields_of("0.13"))
            if unknown:
                out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                     detail=f"FAILS to load: TypeError: unexpected keyword argument "
                                            f"{unknown[0]!r}; convert with --to {c.name}"))
                continue
        drops = {**c.serving.refuses, **c.serving.drops} if c.serving else {}
        refused = [drops[f] for f in sorted(a.features) if f in drops]
        experts = a.has_experts and ("none" if c.serving or "experts" not in c.scaling else c.releases_with("0.17"))
        if experts == "none":
            refused.append("ignores target_parameters (LoRA on raw parameters, MoE experts; PEFT ≥ 0.17), so those "
                           "tensors are unused")
        caveats = [f"{what} needs PEFT ≥ {since}; earlier releases ignore it" for what, since in needs
                   if c.serving is None and c.releases_with(since) == "some"]
        if experts == "some":
            caveats.append("target_parameters (MoE experts) needs PEFT ≥ 0.17; earlier releases ignore it")
        for f in sorted(a.features & set(PEFT_ONLY)):  # a field the era lacks is dropped on load (≥ 0.14)
            since = FIELDS_SINCE.get(f, "0")
            have = "none" if c.serving else c.releases_with(since)
            if have == "none":
                refused.append(f"ignores {f} (PEFT ≥ {since}: {PEFT_ONLY[f]}), so those tensors are unused")
            elif have == "some":
                caveats.append(f"{f} needs PEFT ≥ {since}; earlier releases ignore it")
        problems += refused
        rs = cfg.use_rslora and "rslora" in c.features  # whether c applies alpha/√r (its reader does the same)
        wrong = []
        unsure = None
        for e in a.modules:
            r, s = read_as(c, a, e)
            why = ""
            if e.kind == "embedding" and e.embed_scale != 1.0:  # × embed_scale from PEFT 0.18 (#2825)
                if c.lora_embedding_scaled is None and e.embed_scale is not None:
                    refused.append(f"{e.module} is a scaled embedding (embed_scale {e.embed_scale:g}), and whether "
                                   f"{c.name} multiplies its LoRA output by that is not established")
                    problems.append(refused[-1])
                    continue
                if e.embed_scale is None and c.lora_embedding_scaled is not None \
                        and c.lora_embedding_scaled != a.convention.lora_embedding_scaled:
                    unsure = (f"{e.module} differs if the base model scales its embeddings (Gemma3, BART with "
                              "scale_embedding): PEFT ≥ 0.18 multiplies embedding LoRA by that embed_scale (#2825), "
                              "unknown without the base model's config.json (converting needs --base-model DIR)")
                elif c.lora_embedding_scaled and e.embed_scale:
                    s *= e.embed_scale
                elif e.embed_scale:
                    why = f" (embed_scale {e.embed_scale:g} not applied before PEFT 0.18, #2825)"
            if r != e.rank:
                wrong.append(f"{e.module} built at r={r} for a rank-{e.rank} tensor")
            elif abs(s / e.scale - 1) > 1e-12:
                wrong.append(f"{e.module} ×{s:g} instead of ×{e.scale:g}{why}")
        if wrong:
            problems.append(f"{len(wrong)} of {len(a.modules)} modules: {wrong[0]}")
        drops = lorax_drops(a) if c.serving and c.serving.drops_partial_layer_types else None
        if drops is not None and drops[0]:
            problems.append(drops[1])
        if cfg.use_rslora and not rs:
            who = c.serving.rslora_note if c.serving else ""
            problems.append(f"{who}ignores use_rslora (alpha/r, not alpha/√r); the fix is alpha' = alpha·√r "
                            f"= {cfg.lora_alpha * math.sqrt(cfg.r):g}, not the posted alpha·r = "
                            f"{cfg.lora_alpha * cfg.r:g}, which over-scales by √r = {math.sqrt(cfg.r):.3g}")
        fix = f"{c.name} cannot hold it, so converting is refused too" if refused else f"convert with --to {c.name}"
        if drops is not None and drops[0] and not refused:
            fix += " --num-layers N (the model's layer count: each type gets zero adapters where it lacks a layer)"
        detail = "same ΔW" if not problems else "WRONG: " + "; ".join(problems) + f"; {fix}"
        if drops is not None and not drops[0]:
            detail += f"; but {drops[1]}: convert with --to lorax --num-layers N"
        for caveat in [*caveats, *([unsure] if unsure else [])]:
            detail += f"; but {caveat}"
        out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=not problems,
                             detail=detail))
    return out
