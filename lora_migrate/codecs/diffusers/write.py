"""Planning and writing a diffusers LoRA: per-component ``lora_adapter_metadata`` whose patterns give every module
its (r, alpha) exactly (alpha rewritten, B untouched), or for diffusers < 0.34 (no alpha at all) one rank per
component with the scale folded into B."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ...adapter import ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...execution import AdapterPlan, Execution, ModuleOut, Step, mode, rescale_steps
from ...io import BackgroundWriter, SafetensorsWriter
from ...rules import describe
from ...rules.scale import SAME, module_alpha
from ...schemas import Convention
from ...schemas.base import Scaling
from ...schemas.diffusers import COMPONENTS, METADATA_KEY, TEXT_ENCODERS, WEIGHTS
from ...source import json_number
from ..peft.format import module_r_alpha, pattern_key_for
from .format import pattern_name, reads_metadata


def _source_rule(e) -> Scaling | None:
    """The source module's rule when its scale is exactly rule(alpha, r) at the rank written (else None: the
    alpha is then derived from the scale)."""
    a, r = e.provenance.alpha, e.provenance.r
    for rule in (Scaling.ALPHA_OVER_SQRT_R, Scaling.ALPHA_OVER_R):
        if e.provenance.rule.startswith(rule.value) and a and e.fused is None and r == e.rank \
                and abs(rule.scale(a, r) / e.scale - 1) <= SAME:
            return rule
    return None


def plan_diffusers(src, target: Convention, opts, steps: list[Step], output: str) -> Execution:
    name = src.info.name  # kinds and features were refused by the planner (rules/refuse.py)
    by_comp: dict[str, list] = defaultdict(list)
    for e in src.modules:
        comp = e.module.partition(".")[0]
        if comp not in COMPONENTS:
            raise UnsupportedFeature(f"{name}: module {e.module!r} has no diffusers component prefix "
                                     f"({', '.join(c + '.' for c in COMPONENTS)}): {target.name} loads LoRA only "
                                     "into a pipeline's components; for an adapter of one component saved without "
                                     "its prefix (PEFT on a bare UNet) pass --component NAME")
        by_comp[comp].append(e)
    ranks = {e.module: e.rank * (len(e.fused.groups) if e.fused else 1) for e in src.modules}
    out: dict[str, ModuleOut] = {}
    metadata: dict[str, object] = {}
    for comp, entries in by_comp.items():
        if reads_metadata(target):
            metadata.update({f"{comp}.{k}": v for k, v in _component(comp, entries, ranks, target, out, src,
                                                                      steps).items()})
        else:
            _one_rank(comp, entries, ranks, target, out, steps)
    kind_of = {e.module: e.kind for e in src.modules}
    rescale_steps(steps, src, kind_of, out)
    header = {"format": "pt"}
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)  # as save_lora_weights writes it
    steps.append(Step(rule="write", what=f"write {WEIGHTS} with keys <component>.<module>.lora_A.weight / "
                      "lora_B.weight" + (f" and the {METADATA_KEY} header" if metadata else " (no alpha stored)")))
    scales_in, scales_out = {}, {}
    for e in src.modules:
        scales_in.setdefault(e.kind, e.scale)
        scales_out.setdefault(e.kind, out[e.module].scale)
    plan = AdapterPlan(adapter=name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=[WEIGHTS], modules=len(src.modules),
                       r=mode([o.r for o in out.values()]), alpha_in=src.info.alpha,
                       alpha_out=mode([o.alpha if o.alpha is not None else float(o.r) for o in out.values()]),
                       scales_in=scales_in, scales_out=scales_out,
                       rescaled=sum(abs(e.scale / out[e.module].scale - 1) > SAME for e in src.modules),
                       steps=steps, notes=list(src.notes))
    ex = Execution(plan=plan, source=src, target=target, out=out, config={})
    ex.codec_state["header"] = header
    return ex


def planned(ex: Execution) -> list[tuple[str, tuple, object]]:
    """(key, shape, dtype) of every tensor written, in plan order (``ex.tensors``, filled by the planner)."""
    return [(tensor_key(ex.target, p, m), shape, dtype) for m, _, p, shape, dtype in ex.tensors]


def _component(comp, entries, ranks, target, out, src, steps) -> dict:
    """One component's LoraConfig dict; fills ``out`` for its modules (alpha per module, B untouched)."""
    rslora = all(_source_rule(e) is Scaling.ALPHA_OVER_SQRT_R for e in entries)
    rule_out = Scaling.ALPHA_OVER_SQRT_R if rslora else Scaling.ALPHA_OVER_R
    for e in entries:
        rm = ranks[e.module]
        rule_in = _source_rule(e)
        a = module_alpha(e.scale, rm, rule_out, e.provenance.alpha if rule_in else None, rule_in)
        prov = ScaleProvenance(alpha=a, r=rm, rule=f"{rule_out.value} ({e.kind})", convention=target.name)
        out[e.module] = ModuleOut(scale=rule_out.scale(a, rm), provenance=prov, alpha=a, r=rm)
    if any(_source_rule(e) is Scaling.ALPHA_OVER_SQRT_R for e in entries) and not rslora:
        steps.append(Step(rule="module_alpha", what=f"{comp}: rsLoRA modules beside plain ones: alpha' = alpha·√r "
                          "per module (" + describe("module_alpha") + ")"))
    mods = [e.module for e in entries]
    r_glob = mode([out[m].r for m in mods])
    a_glob = mode([out[m].alpha for m in mods])
    key = target.pattern_matching or "regex"
    rank_pattern = {pattern_key_for(key, pattern_name(m)[1]): out[m].r for m in mods if out[m].r != r_glob}
    alpha_pattern = {pattern_key_for(key, pattern_name(m)[1]): json_number(out[m].alpha) for m in mods
                     if out[m].alpha != a_glob}
    own = _own_patterns(comp, mods, src, target, out)
    if own is not None:  # the source's own (diffusers) patterns give every module the same (r, alpha): kept
        r_glob, a_glob, rank_pattern, alpha_pattern = own
    if rank_pattern or alpha_pattern:
        steps.append(Step(rule="patterns", what=f"{comp}: r={r_glob}, lora_alpha={a_glob:g}; {len(rank_pattern)} "
                          f"rank_pattern and {len(alpha_pattern)} alpha_pattern entries ("
                          + ("the source's own" if own else "full module paths, PEFT ≥ 0.15 regex keys") + ")"))
    dora = [e.module for e in entries if "magnitude" in e.metas]
    if dora and len(dora) != len(entries):
        raise UnsupportedFeature(f"{src.info.name}: {comp}: DoRA on {len(dora)} of {len(entries)} modules; "
                                 f"{target.name} has one use_dora per component")
    extra = {"use_dora": True} if dora else {}
    return {**extra, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "lora_alpha": json_number(a_glob), "lora_dropout": float(src.info.dropout or 0.0), "peft_type": "LORA",
            "r": int(r_glob), "rank_pattern": rank_pattern,
            "target_modules": sorted(pattern_name(m)[1] for m in mods), "use_rslora": rslora}


def _own_patterns(comp, mods, src, target, out):
    """(r, lora_alpha, rank_pattern, alpha_pattern) of a diffusers source's own metadata for ``comp`` when the
    target reads them to every module's planned (r, alpha), else None."""
    cfg = src.info.config.get(comp) if src.convention.family == target.family else None
    if not cfg or not (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        return None
    r0, a0 = cfg.get("r"), cfg.get("lora_alpha")
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    try:
        same = all(module_r_alpha(target.pattern_matching or "regex", pattern_name(m)[1], r0, float(a0), rp, ap)
                   == (out[m].r, out[m].alpha) for m in mods)
    except (TypeError, ValueError, LoraMigrateError):
        return None
    return (r0, float(a0), dict(rp), dict(ap)) if same else None


def _one_rank(comp, entries, ranks, target, out, steps) -> None:
    """diffusers < 0.34 stores no alpha and takes the first module's rank as alpha for the component: with one
    rank R per component every module's scale is 1, so modules are padded to R and their scale folded into B."""
    R = max(ranks[e.module] for e in entries)
    prov = ScaleProvenance(alpha=None, r=R, rule="r_first/r = 1 (one rank per component)", convention=target.name)
    padded = 0
    for e in entries:
        pad = R if ranks[e.module] != R else None
        padded += pad is not None
        out[e.module] = ModuleOut(scale=1.0, provenance=prov, pad_to=pad, alpha=None, r=R)
    if padded:
        steps.append(Step(rule="pad_rank", what=f"{comp}: {padded} modules padded to rank {R} ({target.name} has "
                          "no alpha: every module must share the rank the loader takes as alpha): "
                          + describe("pad_rank")))


def write_diffusers(ex: Execution, dest: Path, deltas) -> list[str]:
    """``dest``/pytorch_lora_weights.safetensors, streamed in plan order, with the planned header metadata."""
    dest.mkdir(parents=True, exist_ok=True)
    with BackgroundWriter(SafetensorsWriter(dest / WEIGHTS, metadata=ex.codec_state["header"])) as w:
        for key, shape, dtype in planned(ex):
            w.add(key, dtype, shape)
        w.write_header()
        for d in deltas:
            for p, t in (("a", d.A), ("b", d.B), ("magnitude", d.magnitude)):
                if t is not None:
                    w.write(tensor_key(ex.target, p, d.module), t)
    return []


def tensor_key(target: Convention, param: str, module: str) -> str:
    """A tensor's key; a text encoder's DoRA magnitude with ".weight" (the spelling its loader takes)."""
    key = target.keys.key(param, module)
    return key + ".weight" if param == "magnitude" and module.partition(".")[0] in TEXT_ENCODERS else key
