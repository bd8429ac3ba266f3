"""PEFT's LoRA on raw parameters (``target_parameters``, ``ParamWrapper``, 0.17 #2638), used for MoE expert weights
stacked in one 3-D parameter (transformers 5: ``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``
(E, H, I)).

Layout (peft 0.21.2 ``ParamWrapper.get_delta_weight``): ``lora_A`` is (E·r, in) expert-major, ``lora_B`` (out, r·E)
rank-major, so expert e's factors are

    A_e = A.reshape(E, r, in)[e],   B_e = B.reshape(out, r, E)[:, :, e],   ΔW_e = s · B_e @ A_e

which is the canonical stacked-experts form (A (E, r, in), B (E, out, r)); the writer applies the inverse
(A.reshape(E·r, in), B.permute(1, 2, 0).reshape(out, r·E)). in/out are the parameter's own (PEFT swaps them for a
(E, out, in) parameter, ``is_transposed`` layouts keep (E, in, out)), so ΔW_e is always (out, in).

Several parameters of one module nest: ``BaseTuner._inject_parameters`` wraps them in the module's parameter order,
the first innermost, so the keys are ``…experts.base_layer.lora_A.weight`` (gate_up_proj, registered first by
transformers 5's expert classes) and ``…experts.lora_A.weight`` (down_proj). Which wrapper holds which parameter is
not in the file; for the gate_up_proj / down_proj pair the shapes tell (gate_up's dimensions are {H, 2I} and
down's {H, I}, in whichever order the layout stores them, which cannot hold the other way round). Other
combinations of several parameters on one module are refused rather than guessed.
"""

from __future__ import annotations

import re

from ...errors import UnsupportedFeature
from ...schemas import peft as P
from ...source import ModuleEntry, SourceAdapter

# parameters of one module, innermost wrapper first (transformers 5 expert classes register gate_up_proj first)
NESTING = ("gate_up_proj", "down_proj")


def refuse_renamed_linears(a: SourceAdapter, model_type: str | None, target_name: str) -> None:
    """peft ≥ 0.19 retargets Linears named like v4 experts on some MoE model types (schemas.peft
    ``V4_EXPERT_RENAMED_TYPES``): LoRA on the ones that are no experts (a dense block's MLP, a shared expert) cannot
    be written for PEFT under their names. transformers 4's per-expert Linears (``…experts.<e>.gate_proj``) are what
    that rewrite is for: left to peft."""
    unknown = model_type is None and a.has_experts  # a transformers-5 MoE of a type not known here
    if target_name != P.PEFT_LATEST.name or not (unknown or model_type in P.V4_EXPERT_RENAMED_TYPES):
        return
    hit = [e.module for e in a.modules if e.kind != "experts" and e.module.rpartition(".")[2] in P.V4_EXPERT_LEAVES
           and not re.search(r"\.experts\.\d+\.", e.module)]
    if hit and unknown:
        raise UnsupportedFeature(f"{a.info.name}: {hit[0]}: whether peft ≥ 0.19 retargets this Linear onto the routed "
                                 "experts depends on the model type (it does for qwen3_moe, olmoe, glm4_moe and "
                                 "others, not for qwen2_moe): pass --model-type or --base-model DIR")
    if hit:
        raise UnsupportedFeature(f"{a.info.name}: {hit[0]}: on {model_type}, peft ≥ 0.19 rewrites target_modules "
                                 "ending in gate_proj/up_proj/down_proj into the routed experts' target_parameters "
                                 "(its transformers-v4 expert names), so this Linear's LoRA would land on the experts")


def router_parameter(module: str, has_experts: bool) -> str | None:
    """transformers 5's MoE router (``<block>.mlp.gate``, a TopKRouter holding ``weight`` (E, H), not an
    nn.Linear) takes LoRA only as a raw parameter: ``<module>.weight`` in target_parameters, a 2-D ParamWrapper whose
    ΔW = s·B@A is a Linear's (measured on qwen2_moe, golden/families/mlx qwen2moe_all_last1). None for other
    modules, or without experts (an older layout, where the router is an nn.Linear)."""
    return f"{module}.weight" if has_experts and module.endswith(".mlp.gate") else None


def _owner_params(owner: str, target_parameters) -> list[str]:
    """The parameter names ``target_parameters`` selects on module ``owner`` (PEFT: ``<module>.<param>`` equal to
    an entry or ending in ``.<entry>``)."""
    out = []
    for t in target_parameters or ():
        mod, _, param = t.rpartition(".")
        if (not mod or owner == mod or owner.endswith("." + mod)) and param not in out:
            out.append(param)
    return out


def resolve(wrapped: dict[str, tuple[tuple, tuple]], target_parameters, where: str) -> dict[str, str]:
    """Stored module path of each ParamWrapper (``…experts`` / ``…experts.base_layer``) → the canonical name of the
    parameter it holds (``…experts.gate_up_proj``). ``wrapped``: path → (lora_A shape, lora_B shape)."""
    by_owner: dict[str, list[str]] = {}
    for path in wrapped:
        by_owner.setdefault(path.replace(".base_layer", ""), []).append(path)
    out = {}
    for owner, paths in by_owner.items():
        params = _owner_params(owner, target_parameters)
        if len(paths) == 1 and len(params) == 1:
            out[paths[0]] = f"{owner}.{params[0]}"
            continue
        if len(paths) == 2 and set(params) == set(NESTING):
            (p, q) = paths
            io = {x: (wrapped[x][0][1], wrapped[x][1][0]) for x in paths}  # (in, out) as PEFT counts them

            def gate_up(x, y):  # x's dims are {h, 2d} where y's are {h, d}, in either order (transposed layouts)
                return any(sorted(io[x]) == sorted((h, 2 * d)) for h, d in (io[y], io[y][::-1]))

            if gate_up(p, q) != gate_up(q, p):
                g, d = (p, q) if gate_up(p, q) else (q, p)
                out[g], out[d] = f"{owner}.gate_up_proj", f"{owner}.down_proj"
                continue
        raise UnsupportedFeature(
            f"{where}: {owner}: {len(paths)} LoRA wrapper(s) for target_parameters {params}: which wrapper holds which "
            "parameter is not recorded in the file and cannot be told from the shapes (only one parameter per "
            "module, or the gate_up_proj/down_proj pair, can)")
    return out


def split_name(module: str) -> tuple[str, str]:
    """``…experts.gate_up_proj`` → (``…experts``, ``gate_up_proj``)."""
    owner, _, param = module.rpartition(".")
    return owner, param


def stored_paths(modules: list[str]) -> dict[str, str]:
    """Canonical experts module → the PEFT module path its keys use (the nesting of :data:`NESTING`)."""
    by_owner: dict[str, list[str]] = {}
    for m in dict.fromkeys(modules):
        owner, param = split_name(m)
        by_owner.setdefault(owner, []).append(param)
    out = {}
    for owner, params in by_owner.items():
        if len(params) > 1 and not set(params) <= set(NESTING):
            raise UnsupportedFeature(f"{owner}: LoRA on parameters {sorted(params)} of one module: PEFT nests them "
                                     "in the base model's parameter order, which is known here only for "
                                     f"{'/'.join(NESTING)}")
        order = sorted(params, key=NESTING.index) if len(params) > 1 else params
        for depth, param in enumerate(order):
            out[f"{owner}.{param}"] = owner + ".base_layer" * (len(order) - 1 - depth)
    return out


def flat_shape(param: str, shape: tuple) -> tuple:
    """The stored shape of a canonical experts factor: A (E, r, in) → (E·r, in), B (E, out, r) → (out, r·E)."""
    if param == "a":
        return (shape[0] * shape[1], shape[2])
    return (shape[1], shape[2] * shape[0])


def flat(param: str, t):
    """A (E, r, in) → (E·r, in) expert-major; B (E, out, r) → (out, r·E) rank-major (PEFT's layout)."""
    if param == "a":
        return t.reshape(-1, t.shape[-1])
    E, out, r = t.shape
    return t.reshape(E, out * r).T.contiguous().reshape(out, r * E)  # = t.permute(1, 2, 0), as a 2-D transpose


class PeftAdapter(SourceAdapter):
    """A PEFT adapter; its experts modules load in the canonical stacked form."""

    def stored_as_is(self, e: ModuleEntry) -> bool:
        return e.kind != "experts"

    def load(self, e: ModuleEntry):
        d = super().load(e)
        if e.kind != "experts":
            return d
        E, r, _ = e.metas["a"].shape
        # one copy of B into (E, out, r) order, as a 2-D transpose of (out·r, E) (4× faster than the 3-D permute
        # copy, as fast as a clone); every later per-expert step reads contiguous slices
        out = d.B.shape[0]
        return d.replace(A=d.A.reshape(E, r, -1), B=d.B.reshape(out * r, E).T.contiguous().reshape(E, out, r))
