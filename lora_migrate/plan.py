"""The planner: (source adapter, target convention) → the ordered rules, and the output they produce.

A plan is made from names, shapes and dtypes alone: the rule pipeline runs on ``meta`` tensors, so the output's
tensor list (the header of a streamed safetensors file) is known before any data is read. Refusals happen here,
before anything is written. What is generic lives here (gated LoRA, layer kinds and features the target's schema
cannot hold, the PiSSA-style initial adapter); what the target needs comes from its codec's :meth:`Codec.plan`.
"""

from __future__ import annotations

from .codecs import PlanOptions, codec_for
from .errors import LoraMigrateError, UnsupportedFeature
from .execution import Execution, Step, meta_delta
from .initial import RebuiltInitial, StoredOLoRAInitial
from .rules import describe
from .rules.refuse import refuse_features, refuse_gated, refuse_kinds
from .schemas import Convention
from .source import SourceAdapter


def plan_adapter(src: SourceAdapter, target: Convention, output: str, opts: PlanOptions | None = None, *,
                 initial: SourceAdapter | None = None) -> Execution:
    """Plan the conversion of one adapter into ``target``; refusals raise here, before anything is written."""
    opts = opts or PlanOptions()
    codec = codec_for(target)
    name = src.info.name
    steps = [Step(rule="read", what=f"read {len(src.modules)} modules as {src.convention.name} "
                                    f"({src.convention.scaling_notes})")]
    refuse_gated(name, src.gated)
    kinds = {e.kind for e in src.modules}
    if codec.expands_fused(target) and "fused_qkv" in kinds:
        kinds = (kinds - {"fused_qkv"}) | {"linear"}
        steps.append(Step(rule="expand_fused_qkv", what=describe("expand_fused_qkv")))
    refuse_kinds(name, kinds, target)
    refuse_features(name, src.features, target)
    initial_entries = _check_initial(src, initial, steps)
    codec.check_options(target, opts)
    opts.doubled = initial is not None
    ex = codec.plan(src, target, opts, steps, output)
    ex.initial, ex.initial_entries = initial, initial_entries
    ex.safetensors, ex.keep_head = opts.safetensors, opts.keep_head
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
    if src.init_mutates and initial is None:
        how = ("--base-model PATH (the original base model, to rebuild the initial adapter from) or "
               if src.init_rebuild else "")
        raise UnsupportedFeature(
            f"{src.info.name}: init_lora_weights={src.init!r} changed the base weights at init, so this adapter "
            f"only holds on the residual model; pass {how}--initial-adapter DIR (the adapter saved before "
            "training) to re-express it as rank-2r LoRA against the original weights")
    if initial is None:
        return None
    if src.init is not None and not src.init_mutates:
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
