"""What the codecs of one-rank-one-scale runtimes share (mlx-lm, torchtune): reading a file whose factors are stored
in another layout, the per-block view of canonical module names, and the plan "one rank, one scale".

Nothing here names a convention: the callers pass their own rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..adapter import ModuleDelta, ScaleProvenance
from ..errors import UnsupportedFeature
from ..execution import AdapterPlan, Execution, ModuleOut, Step, mode, rescale_steps
from ..io import TensorMeta
from ..rules import describe
from ..rules.scale import SAME
from ..schemas import Convention
from ..source import ModuleEntry, SourceAdapter

# canonical LLM module names: <prefix>.layers.<N>.<path inside the block>
BLOCK = re.compile(r"^(?P<stack>.*?\blayers)\.(?P<n>\d+)\.(?P<rel>.+)$")


@dataclass
class StoredSource(SourceAdapter):
    """A source whose stored tensors differ from the canonical factors by a fixed, exact rewrite (a transpose, a
    row permutation): ``transform(entry, param, tensor)`` gives the canonical tensor of ``param`` ("a", "b",
    "magnitude"). The entries' metas already hold the canonical shapes."""

    transform: Callable[[ModuleEntry, str, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    codec_state: dict = field(default_factory=dict)  # what the reading codec needs for ``transform``

    def stored_as_is(self, e: ModuleEntry) -> bool:
        return self.transform is None

    def load(self, e: ModuleEntry) -> ModuleDelta:
        d = super().load(e)
        if self.transform is None:
            return d
        t = self.transform
        return d.replace(A=None if d.A is None else t(e, "a", d.A), B=t(e, "b", d.B),
                         magnitude=None if d.magnitude is None else t(e, "magnitude", d.magnitude))


def canonical_meta(m: TensorMeta, shape: tuple[int, ...]) -> TensorMeta:
    """``m`` with the canonical shape (same bytes, e.g. transposed)."""
    return TensorMeta(key=m.key, shape=tuple(shape), dtype=m.dtype, nbytes=m.nbytes)


@dataclass
class Blocks:
    """The adapted modules by transformer block: ``per_block[N]`` the paths inside block N, ``top`` the rest."""

    stack: str | None
    per_block: dict[int, set[str]]
    top: list[str]

    @classmethod
    def of(cls, modules: list[str]) -> "Blocks":
        per: dict[int, set[str]] = {}
        stacks, top = set(), []
        for m in modules:
            g = BLOCK.match(m)
            if g is None:
                top.append(m)
                continue
            stacks.add(g["stack"])
            per.setdefault(int(g["n"]), set()).add(g["rel"])
        if len(stacks) > 1:
            raise UnsupportedFeature(f"modules in several layer stacks ({', '.join(sorted(stacks))}): one "
                                     "block structure is needed")
        return cls(next(iter(stacks), None), dict(sorted(per.items())), sorted(top))

    def uneven(self) -> str | None:
        """Why the blocks do not all adapt the same paths, or None when they do."""
        sets = {frozenset(v) for v in self.per_block.values()}
        if len(sets) <= 1:
            return None
        first = next(iter(self.per_block))
        for n, v in self.per_block.items():
            if v != self.per_block[first]:
                return (f"block {first} adapts {', '.join(sorted(self.per_block[first]))} but block {n} adapts "
                        f"{', '.join(sorted(v))}")
        return None


def model_type_of(a, opts) -> str | None:
    """The base model's type: its config.json (``--base-model`` or found by the source), else ``--model-type``,
    else what the adapter's own files say."""
    return next((c.get("model_type") for c in (opts.base_config, a.base_config) if c), None) \
        or opts.model_type or a.info.model_type


def layer_count(a: SourceAdapter, base_config: dict | None) -> tuple[int | None, str]:
    """The base model's block count and where it came from (None: not known)."""
    for cfg, where in ((base_config, "--base-model"), (a.base_config, "the base model's config.json")):
        n = (cfg or {}).get("num_hidden_layers") or (cfg or {}).get("n_layer")
        if isinstance(n, int):
            return n, where
    return None, ""


def refuse_fused(src: SourceAdapter, target: Convention) -> None:
    """Fused-QKV LoRA (AdapterHub's ``LoRAMergedLinear``) has no module of these runtimes' trees to go to (the
    planner has already refused gated LoRA and the kinds and features the target's schema lacks)."""
    fused = [e.module for e in src.modules if e.fused is not None]
    if fused:
        raise UnsupportedFeature(f"{src.info.name}: {target.name} cannot hold fused-QKV LoRA ({fused[0]})")


def one_rank_one_scale(src: SourceAdapter, target: Convention, steps: list[Step], runtime: str,
                       provenance: Callable[[float, int], ScaleProvenance], doubled: bool = False
                       ) -> tuple[int, float, dict[str, ModuleOut]]:
    """Plan a target with one rank R and one effective scale s for every module: R = the largest rank (others
    padded with zeros, exact); s = the scale most modules have (their B untouched); every other module gets its
    scale folded into B (B' = (s_m/s)·B, one rounding, named in the steps). ``doubled``: a PiSSA-style source,
    re-expressed at rank 2r against the original weights."""
    ranks = {e.module: e.rank * (2 if doubled else 1) for e in src.modules}
    R = max(ranks.values())
    if len(set(ranks.values())) > 1:
        steps.append(Step(rule="pad_rank", what=f"ranks {sorted(set(ranks.values()))} → {R} ({runtime} holds one "
                          f"rank per adapter): " + describe("pad_rank")))
    s = mode([e.scale for e in src.modules])
    prov = provenance(s, R)
    out = {e.module: ModuleOut(scale=s, provenance=prov, pad_to=R if ranks[e.module] != R else None,
                               alpha=prov.alpha, r=R) for e in src.modules}
    folded = sum(abs(e.scale / s - 1) > SAME for e in src.modules)
    steps.append(Step(rule="global_scale", what=f"one scale {s:.10g} ({prov.describe()}): {runtime} applies one "
                      f"scale to every module; it expresses {len(src.modules) - folded} of {len(src.modules)} modules "
                      "with B untouched" + (f", the other {folded} get theirs folded into B" if folded else "")))
    rescale_steps(steps, src, {e.module: e.kind for e in src.modules}, out)
    return R, s, out


def execution(src: SourceAdapter, target: Convention, out: dict[str, ModuleOut], steps: list[Step], output: str,
              files: list[str], r: int, alpha_out: float, config: dict, notes: list[str] | None = None,
              codec_state: dict | None = None) -> Execution:
    """The Execution of a one-rank-one-scale plan (the planner adds the output tensor list)."""
    scales_in, scales_out = {}, {}
    for e in src.modules:
        scales_in.setdefault(e.kind, e.scale)
        scales_out.setdefault(e.kind, out[e.module].scale)
    rescaled = sum(abs(e.scale / out[e.module].scale - 1) > SAME for e in src.modules)
    plan = AdapterPlan(adapter=src.info.name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=files, modules=len(src.modules), r=r, alpha_in=src.info.alpha,
                       alpha_out=alpha_out, scales_in=scales_in, scales_out=scales_out, rescaled=rescaled,
                       steps=steps, notes=list(notes or []) + list(src.notes))
    return Execution(plan=plan, source=src, target=target, out=out, config=config,
                     codec_state=dict(codec_state or {}))
