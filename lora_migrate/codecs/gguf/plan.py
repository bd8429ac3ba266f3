"""Planning a llama.cpp GGUF adapter: refusals, architecture and names, one alpha for the file, q/k permutation
heads, and the output type as the pipeline's last step."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ...adapter import ScaleProvenance
from ...errors import UnsupportedFeature
from ...execution import AdapterPlan, Execution, ModuleOut, Step, meta_delta, rescale_steps
from ...rules.scale import SAME, module_alpha
from ...schemas import Convention, Scaling
from ...schemas.gguf import FROZEN_BASE_COPY_SUFFIX, OUTTYPES, Q8_0_ERROR, REFUSALS
from ...source import SourceAdapter, base_model_config
from .format import (EMBED, arch_of, ggml_type, gguf_name, heads_of, n_blocks_of, qk_heads, store_delta,
                     tensor_map)

RUNTIME_RULE = "alpha/r (llama.cpp: r = lora_b ne[0]; alpha 0 → 1)"


class GgufExecution(Execution):
    """The generic pipeline, then the output type (cast, or q8_0 values) so that the check sees what is stored."""

    def rewrite(self, d, e):
        return store_delta(super().rewrite(d, e), self.codec_state["outtype"])


def base_config(src: SourceAdapter, opts) -> dict | None:
    return opts.base_config or src.base_config or base_model_config(opts.base_model or src.info.base_model)


def _rule_of(prov: ScaleProvenance) -> Scaling | None:
    for s in (Scaling.ALPHA_OVER_SQRT_R, Scaling.ALPHA_OVER_R):
        if prov.rule.startswith(s.value):
            return s
    return None


def refuse(src: SourceAdapter, steps: list[Step]) -> None:
    name = src.info.name
    extras = [k for k in src.extras if not k.endswith(FROZEN_BASE_COPY_SUFFIX)]
    for f in sorted(src.features):
        if f in REFUSALS and not (f == "saved_embeddings" and not extras):
            raise UnsupportedFeature(f"{name}: {REFUSALS[f]}")
    if extras:
        raise UnsupportedFeature(f"{name}: {REFUSALS['modules_to_save']} ({len(extras)} tensors, e.g. {extras[0]})")
    if src.extras:
        steps.append(Step(rule="skip_base_copies", what=f"left out {len(src.extras)} frozen base-layer copies saved "
                          f"beside the adapter ({src.extras[0]}): the runtime reads them from the base GGUF"))
    for e in src.modules:
        if e.kind not in ("linear", "embedding") or e.fused is not None or "bias" in e.keys:
            raise UnsupportedFeature(f"{name}: {e.module}: a {e.kind} LoRA"
                                     f"{' with lora_B.bias' * ('bias' in e.keys)}: llama.cpp adapters hold plain "
                                     "lora_a/lora_b pairs of linear layers and the token embedding")
        # None: no config told; none of the architectures in schemas/gguf.ARCHS scales its embedding
        if e.kind == "embedding" and e.embed_scale not in (None, 1.0):
            raise UnsupportedFeature(f"{name}: embedding LoRA on a scaled embedding ({e.module}); llama.cpp's "
                                     "handling of it is not established")


def choose_alpha(src: SourceAdapter) -> tuple[float, int]:
    """adapter.lora.alpha: the value that leaves the most modules' B untouched (per module s·r, exact for rsLoRA
    as α·√r from α itself; or 0, the runtime's scale 1). Returns (alpha, modules kept)."""
    products = []
    for e in src.modules:
        prov = e.provenance
        rule_in = _rule_of(prov) if prov.r == e.rank else None
        products.append(module_alpha(e.scale, e.rank, Scaling.ALPHA_OVER_R, prov.alpha, rule_in))
    alpha, kept = Counter(products).most_common(1)[0]
    ones = sum(abs(e.scale - 1) <= SAME for e in src.modules)
    # the file holds alpha as float32: the runtime's scale is float32(alpha)/r (B·(1 + <2⁻²⁴) rounds back to B)
    return (0.0, ones) if ones > kept else (float(np.float32(alpha)), kept)


def plan_gguf(src: SourceAdapter, target: Convention, opts, steps: list[Step], output: str) -> Execution:
    name = src.info.name
    refuse(src, steps)
    outtype = opts.outtype or "f32"
    cfg = base_config(src, opts)
    model_type = opts.model_type or src.info.model_type or (cfg or {}).get("model_type")
    arch = arch_of(model_type, name)
    if cfg is not None and opts.base_config is None:
        opts.base_config = cfg  # read_back un-permutes with the same heads
    tmap = tensor_map(arch.arch, n_blocks_of([e.module for e in src.modules], cfg))
    names, heads = {}, {}
    hc = heads_of(cfg)
    for e in src.modules:
        base = gguf_name(tmap, e.module)
        if base is None or (e.kind == "embedding") != (base == EMBED):
            raise UnsupportedFeature(f"{name}: {e.module} has no tensor in llama.cpp's {arch.arch} GGUF (gguf's "
                                     "tensor-name table); llama.cpp would refuse the pair")
        if base == "output.weight":
            tie = (cfg or {}).get("tie_word_embeddings")
            if tie is None:
                raise UnsupportedFeature(f"{name}: {REFUSALS['lm_head_unknown_tie']}")
            if tie:
                raise UnsupportedFeature(f"{name}: {REFUSALS['tied_lm_head']}")
        names[e.module] = base
        if arch.permutes_qk and qk_heads(base, (1, 1)):
            if hc is None:
                raise UnsupportedFeature(f"{name}: {REFUSALS['unknown_heads'].format(model_type=model_type)}")
            heads[e.module] = qk_heads(base, hc)
            if e.metas["b"].shape[0] % (2 * heads[e.module]):
                raise UnsupportedFeature(f"{name}: {e.module}: {e.metas['b'].shape[0]} rows do not split into "
                                         f"{heads[e.module]} heads of two rotary halves (wrong base config?)")
    alpha, kept = choose_alpha(src)
    out: dict[str, ModuleOut] = {}
    for e in src.modules:
        r = e.rank
        scale = alpha / r if alpha else 1.0
        rule = RUNTIME_RULE if alpha else "1 (adapter.lora.alpha = 0)"
        out[e.module] = ModuleOut(scale=scale, provenance=ScaleProvenance(alpha=alpha, r=r, rule=rule,
                                                                          convention=target.name), alpha=alpha, r=r)
    n = len(src.modules)
    why = ("rsLoRA's α/√r as alpha = α·√r" if "rslora" in src.features else "the source's scale")
    steps.append(Step(rule="global_alpha", what=(
        f"adapter.lora.alpha = {alpha:.10g}: llama.cpp applies alpha/r per pair (r = lora_b ne[0]; no rsLoRA, no "
        f"alpha pattern; alpha is stored as float32); it expresses {why} in {kept} of {n} modules"
        if alpha else f"adapter.lora.alpha = 0 (llama.cpp then applies scale 1): every module's scale folded into B, "
                      f"{kept} of {n} have scale 1 already")
        + (f"; the other {n - kept} get their scale folded into B" if kept < n and alpha else "")))
    rescale_steps(steps, src, {e.module: e.kind for e in src.modules}, out)
    ex = GgufExecution(plan=AdapterPlan(
        adapter=name, source_convention=src.convention.name, target_convention=target.name, output=output,
        files=[output], modules=n, r=max(e.rank for e in src.modules), alpha_in=src.info.alpha, alpha_out=alpha,
        scales_in={e.kind: e.scale for e in reversed(src.modules)},
        scales_out={e.kind: out[e.module].scale for e in reversed(src.modules)},
        rescaled=sum(abs(e.scale / out[e.module].scale - 1) > SAME for e in src.modules), steps=steps,
        notes=list(src.notes)), source=src, target=target, out=out)
    ex.codec_state = {"outtype": outtype, "arch": arch.arch, "alpha": alpha, "names": names, "heads": heads}
    ex.codec_state["layout"] = layout(ex)
    _outtype_steps(ex, steps, arch, heads, model_type)
    ex.plan.steps = steps  # the same list: the generic planner's later steps show too
    return ex


def layout(ex: Execution) -> list[tuple[str, str, tuple, str]]:
    """(tensor name, module, stored numpy shape, GGML type) in write order, from meta tensors through the pipeline."""
    st = ex.codec_state
    rows = []
    for e in ex.entries():
        d = ex.apply(meta_delta(e), e)
        base = st["names"][e.module]
        a_shape = tuple(d.A.shape[::-1]) if d.kind == "embedding" else tuple(d.A.shape)
        for suffix, shape in ((".lora_a", a_shape), (".lora_b", tuple(d.B.shape))):
            rows.append((base + suffix, e.module, shape, ggml_type(st["outtype"], shape)))
    return rows


def _outtype_steps(ex: Execution, steps: list[Step], arch, heads: dict, model_type: str) -> None:
    st = ex.codec_state
    types = Counter(t for *_, t in st["layout"])
    ot = st["outtype"]
    what = f"--outtype {ot}: " + ", ".join(f"{k} {v} tensors" for k, v in sorted(types.items()))
    if ot == "q8_0":
        what += (f" (q8_0 blocks of 32 along ne[0]; tensors whose ne[0] is not a multiple of 32 are F16, as "
                 f"convert_lora_to_gguf writes them); each q8_0 factor within ‖x̂−x‖ ≤ {Q8_0_ERROR:.3g}·‖x‖, the "
                 "check's tolerance follows")
    elif ot != "f32":
        what += f" (each element rounded once to {OUTTYPES[ot][1]}; the check's tolerance follows the dtype)"
    steps.append(Step(rule="outtype", what=what))
    perm = (f"attn_q/attn_k lora_b rows permuted per head ({model_type}: convert_hf_to_gguf {arch.converter_class} "
            f"permutes q/k; {len(heads)} modules)" if heads else
            f"no q/k permutation ({model_type}: {arch.converter_class} keeps HF rows)")
    steps.append(Step(rule="write", what=f"write one .gguf (general.architecture = {arch.arch}, general.type = "
                      f"adapter, adapter.type = lora) with gguf.GGUFWriter, streamed: <base tensor>.lora_a ne=[in, r] "
                      f"= A, .lora_b ne=[r, out] = B, token_embd lora_a = Aᵀ; {perm}"))
