"""What a plan is: the steps it names, the per-module target scales, and how it is carried out.

:class:`Execution` runs one adapter's modules through the rule pipeline (the reference delta, then the target's
rewrites: expand fused QKV, pad the rank, fuse, rescale). The codecs build it (:meth:`Codec.plan`); the API feeds
its deltas to the codec's writer through the numeric check. Shared by every codec, so it names none.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel

from .adapter import ModuleDelta, ScaleProvenance, delta_kind
from .check.report import UNIT_ROUNDOFF
from .io._common import release_memory
from .rules import describe
from .rules.coverage import zero_adapter
from .rules.scale import SAME, rescale
from .rules.shape import expand_fused_qkv, pad_rank, pissa_to_lora, to_fused_qkv
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
    scales_in: dict[str, float]  # layer kind → source effective scale (the first module's, if they differ)
    scales_out: dict[str, float]  # layer kind → target effective scale
    rescaled: int  # modules whose B is multiplied
    steps: list[Step]
    notes: list[str]


@dataclass
class ModuleOut:
    """What the pipeline does to one module."""

    scale: float  # the target's effective scale for it
    provenance: ScaleProvenance
    pad_to: int | None = None
    to_fused: bool = False
    alpha: float | None = None  # PEFT targets: the module's alpha
    r: int | None = None


@dataclass
class Execution:
    """A plan plus what is needed to carry it out."""

    plan: AdapterPlan
    source: SourceAdapter
    target: Convention
    out: dict[str, ModuleOut]
    initial: SourceAdapter | None = None  # PiSSA-style: the saved initial adapter
    initial_entries: dict[str, ModuleEntry] | None = None  # its modules by name
    tensors: list[tuple[str, str, str, tuple, torch.dtype]] = field(default_factory=list)  # module, kind, param, shape, dtype
    config: dict = field(default_factory=dict)  # the target's own config file(s), built by its codec
    extras: list[str] = field(default_factory=list)  # the source's non-LoRA tensor keys that are written
    safetensors: bool = False
    keep_head: bool = False
    _last_initial: ModuleDelta | None = None
    fills: list[ModuleEntry] = field(default_factory=list)  # LoRAX: zero adapters for layers a type lacks
    codec_state: dict = field(default_factory=dict)  # what the target's codec planned for its writer

    def entries(self) -> list[ModuleEntry]:
        """The modules to write: the source's, then the zero adapters that complete layer types (LoRAX)."""
        return [*self.source.modules, *self.fills]

    def load(self, e: ModuleEntry) -> ModuleDelta:
        """The source delta of an entry; a fill's is zero (it has no tensors, only its template's shapes)."""
        return zero_adapter(meta_delta(e)) if not e.keys else self.source.load(e)

    def apply(self, d: ModuleDelta, e: ModuleEntry) -> ModuleDelta:
        """The per-module rule pipeline."""
        return self.rewrite(self.reference(d, e), e)

    def reference(self, d: ModuleDelta, e: ModuleEntry) -> ModuleDelta:
        """The source module as the update the output must hold: itself, or for a PiSSA-style source the update
        of the original weights, s·(BA − B₀A₀), with the initial adapter's module (saved or rebuilt)."""
        if self.initial is None or not e.keys:  # a LoRAX fill is zero against the original weights too
            return d
        return pissa_to_lora(d, self._initial_delta(e, d.A.device.type == "meta"))

    def rewrite(self, d: ModuleDelta, e: ModuleEntry) -> ModuleDelta:
        """The target's rules on a reference delta: expand fused QKV, pad the rank, fuse, rescale."""
        o = self.out[e.module]
        d = expand_fused_qkv(d) if "fused_qkv" not in self.target.scaling else d
        if o.pad_to:
            d = pad_rank(d, o.pad_to)
        if o.to_fused:
            d = to_fused_qkv(d)
        return rescale(d, o.scale, o.provenance)

    def _initial_delta(self, e: ModuleEntry, meta: bool) -> ModuleDelta:
        ie = self.initial_entries[e.module]
        if meta:
            return meta_delta(ie)
        if self._last_initial is None or self._last_initial.module != e.module:
            self._last_initial = self.initial.load(ie)  # read (or rebuilt) once for reference() and apply()
        return self._last_initial

    def deltas(self):
        for e in self.entries():
            yield self.apply(self.load(e), e)
            release_memory()


def meta_delta(e: ModuleEntry) -> ModuleDelta:
    def empty(p):
        m = e.metas.get(p)
        return None if m is None else torch.empty(m.shape, dtype=m.dtype, device="meta")

    return ModuleDelta(module=e.module, A=empty("a"), B=empty("b"), scale=e.scale, provenance=e.provenance,
                       kind=delta_kind(e.kind), fused=e.fused, bias=empty("bias"), magnitude=empty("magnitude"))


def mode(values, prefer=None):
    c = Counter(values)
    best = max(c.values())
    if prefer is not None and c.get(prefer) == best:
        return prefer
    return next(v for v in values if c[v] == best)


def rescale_steps(steps, src, kind_of, out):
    by_kind: dict[str, list[float]] = {}
    dtypes: dict[str, set] = {}
    for e in src.modules:
        c = e.scale / out[e.module].scale
        by_kind.setdefault(kind_of[e.module], []).append(c)
        if abs(c - 1) > SAME:
            dtypes.setdefault(kind_of[e.module], set()).add(e.metas["b"].dtype)
    for k, cs in sorted(by_kind.items()):
        changed = [c for c in cs if abs(c - 1) > SAME]
        if not changed:
            steps.append(Step(rule="rescale", what=f"{k}: scale kept; factors copied bit for bit"))
            continue
        if len(set(changed)) == 1:
            what = f"{k}: B' = {changed[0]:.10g}·B in {len(changed)} of {len(cs)} modules"
        else:
            what = (f"{k}: B rescaled per module in {len(changed)} of {len(cs)} modules (factors "
                    f"{min(changed):.6g}…{max(changed):.6g})")
        steps.append(Step(rule="rescale", what=f"{what}; {rounding(changed, dtypes[k])}; " + describe("rescale")))


def rounding(factors, dtypes) -> str:
    """What multiplying B by ``factors`` costs: nothing for powers of two, else one rounding per element."""
    if all(math.frexp(c)[0] == 0.5 for c in factors):
        return "exact (powers of two)"
    u = max(UNIT_ROUNDOFF.get(dt, torch.finfo(dt).eps / 2) for dt in dtypes)
    return (f"each element rounded once to {'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} "
            f"(relative error ≤ {u:.3g} per element; the check below bounds ΔW)")
