"""The planner: (source adapter, target convention) → the ordered rules, and the output they produce.

A plan is made from names, shapes and dtypes alone: the rule pipeline runs on ``meta`` tensors, so the output's
tensor list (the header of a streamed safetensors file) is known before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel

from .adapter import ModuleDelta, ScaleProvenance
from .errors import LoraMigrateError
from .formats.adapterhub import target_config
from .io._common import release_memory
from .rules import describe
from .rules.refuse import refuse_gated, refuse_kinds
from .rules.scale import SAME, choose_alpha, rescale
from .schemas import Convention
from .source import ModuleEntry, SourceAdapter


class Step(BaseModel):
    rule: str
    what: str


class AdapterPlan(BaseModel):
    """What converting one adapter will do; the same data as ``convert --dry-run --json``."""

    adapter: str
    source_convention: str
    target_convention: str
    output: str  # folder relative to OUT ("." for a single adapter)
    files: list[str]
    modules: int
    r: int
    alpha_in: float | None
    alpha_out: float
    scales_in: dict[str, float]  # layer kind → source effective scale
    scales_out: dict[str, float]  # layer kind → target effective scale
    rescaled: int  # modules whose B is multiplied
    steps: list[Step]
    notes: list[str]


@dataclass
class Execution:
    """A plan plus what is needed to carry it out."""

    plan: AdapterPlan
    source: SourceAdapter
    target: Convention
    out_scales: dict[str, float]
    tensors: list[tuple[str, str, tuple, torch.dtype]] = field(default_factory=list)  # module, param, shape, dtype
    safetensors: bool = False
    keep_head: bool = False

    def apply(self, d: ModuleDelta, kind: str) -> ModuleDelta:
        """The per-module rule pipeline."""
        prov = ScaleProvenance(alpha=self.plan.alpha_out, r=self.plan.r,
                               rule=f"{self.target.scaling[kind].value} ({kind})", convention=self.target.name)
        return rescale(d, self.out_scales[kind], prov)

    def deltas(self):
        for e in self.source.modules:
            yield self.apply(self.source.load(e), e.kind)
            release_memory()


def _meta_delta(src: SourceAdapter, e: ModuleEntry) -> ModuleDelta:
    def empty(p):
        m = e.metas.get(p)
        return None if m is None else torch.empty(m.shape, dtype=m.dtype, device="meta")

    return ModuleDelta(module=e.module, A=empty("a"), B=empty("b"), scale=e.scale, provenance=e.provenance,
                       kind="ia3" if e.kind == "ia3" else "lora", fused=e.fused)


def plan_adapter(src: SourceAdapter, target: Convention, output: str, *, safetensors: bool = False,
                 keep_head: bool = False) -> Execution:
    """Plan the conversion of one adapter into ``target``; refusals raise here, before anything is written."""
    name = src.info.name
    if target.family != "adapterhub":
        raise LoraMigrateError(f"writing {target.name} is not supported yet")
    steps = [Step(rule="read", what=f"read {len(src.modules)} modules as {src.convention.name} "
                                    f"({src.convention.scaling_notes})")]
    refuse_gated(name, src.gated)
    kinds = {e.kind for e in src.modules}
    refuse_kinds(name, kinds, target)
    ranks = {e.rank for e in src.modules}
    if len(ranks) != 1:
        raise LoraMigrateError(f"{name}: modules have ranks {sorted(ranks)}, but an AdapterHub config holds one r")
    r = ranks.pop()
    alpha_out, out_scales = choose_alpha([(e.kind, e.scale, e.rank) for e in src.modules], target,
                                         src.info.alpha, r)
    steps.append(Step(rule="choose_alpha", what=f"write alpha={alpha_out:g}, r={r}: {target.name} then applies "
                      + ", ".join(f"{s:g} to {k}" for k, s in sorted(out_scales.items()))))
    scales_in: dict[str, float] = {}
    rescaled = 0
    for e in src.modules:
        scales_in.setdefault(e.kind, e.scale)
        if scales_in[e.kind] != e.scale:
            raise LoraMigrateError(f"{name}: modules of one kind with different scales are not supported")
        rescaled += abs(e.scale / out_scales[e.kind] - 1) > SAME
    for k in sorted(kinds):
        s, t = scales_in[k], out_scales[k]
        if abs(s / t - 1) > SAME:
            steps.append(Step(rule="rescale", what=f"{k}: B' = {s / t:.10g}·B (source scale {s:g} → target {t:g}); "
                              + describe("rescale")))
        else:
            steps.append(Step(rule="rescale", what=f"{k}: scale {s:g} is kept; factors copied bit for bit"))
    _, cfg_notes = target_config(target, src.info, r, alpha_out)
    weights = target.weights_write_safetensors if safetensors else target.weights_write
    files = [target.config_file, weights]
    notes = [*src.notes, *cfg_notes]
    if src.head is not None:
        if src.head.static_copy and not keep_head:
            steps.append(Step(rule="drop_static_head", what=f"leave out {', '.join(f.name for f in src.head.files)}: "
                              f"{src.head.reason}"))
        else:
            files += [f.name for f in src.head.files]
            steps.append(Step(rule="copy_head", what=f"copy {', '.join(f.name for f in src.head.files)} unchanged"))
    steps.append(Step(rule="write", what=f"write {weights} with keys {target.keys.a.format(module='<module>', adapter=name)}"
                      f" / lora_B, config version {target.version_to_write!r}"))
    plan = AdapterPlan(adapter=name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=files, modules=len(src.modules), r=r, alpha_in=src.info.alpha,
                       alpha_out=alpha_out, scales_in=scales_in, scales_out=out_scales, rescaled=rescaled,
                       steps=steps, notes=notes)
    ex = Execution(plan=plan, source=src, target=target, out_scales=out_scales, safetensors=safetensors,
                   keep_head=keep_head)
    for e in src.modules:  # the output header, from meta tensors run through the same pipeline
        d = ex.apply(_meta_delta(src, e), e.kind)
        if d.A is not None:
            ex.tensors.append((d.module, "a", tuple(d.A.shape), d.A.dtype))
        ex.tensors.append((d.module, "b", tuple(d.B.shape), d.B.dtype))
    ex.plan.steps.append(Step(rule="verify", what="compare every module's ΔW = s·B·A in the written output "
                              "(read back as the target) with the source's"))
    return ex
