"""mlx-lm's ``LoRASwitchLinear`` (MoE experts) ↔ the canonical stacked-experts form (schema: ``SWITCH_*`` in
:mod:`lora_migrate.schemas.mlx_lm`).

mlx-lm keeps gate, up and down as three SwitchLinear layers, each with its own ``lora_a`` (E, r, in) and ``lora_b``
(E, out, r), stored as they compute (ΔW_e = scale·lora_b[e]@lora_a[e], no transpose). transformers 5 fuses gate
and up into one parameter ``gate_up_proj`` (E, 2I, H), gate rows first, which is what PEFT's target_parameters
adapts. So, per block:

- reading, gate + up → ``mlp.experts.gate_up_proj``: with the same A (a file this codec wrote from PEFT) the
  compact pair A, B = [B_g; B_u] (rank r); otherwise block-diagonal at rank 2r, A = [A_g; A_u],
  B[e] = [[B_g[e], 0], [0, B_u[e]]], so B[e]A[e] = [B_g[e]A_g[e]; B_u[e]A_u[e]] exactly (zeros meet only zeros).
  Only one of the two adapted: the other half's rows are zero.
- writing, ``gate_up_proj`` → gate = (A, B[:, :I]), up = (A, B[:, I:]): row blocks of B[e]A[e], exact.
- ``down_proj`` is the same factor pair under both names.
"""

from __future__ import annotations

import torch

from ...errors import LoraMigrateError, UnsupportedFeature
from ...schemas import mlx_lm as S
from ..shared import Blocks

GATE_UP, DOWN = "gate_up_proj", "down_proj"


def switch_part(module: str) -> tuple[str, str, str] | None:
    """``<block>.<parent>.switch_mlp.<part>`` → (block, parent, part); None for another module."""
    head, _, part = module.rpartition(".")
    parent_path, _, switch = head.rpartition(".")
    if switch != S.SWITCH or part not in S.SWITCH_PARTS:
        return None
    block, _, parent = parent_path.rpartition(".")
    return block, parent, part


def canonical_groups(groups: dict[str, dict[str, str]], where) -> tuple[dict[str, dict[str, str]], dict[str, dict]]:
    """mlx modules → canonical modules. Returns (canonical module → its stored keys, under "a"/"b" for one part or
    "a_gate"/"b_gate"/"a_up"/"b_up" for gate + up), and the experts modules' parts."""
    out: dict[str, dict[str, str]] = {}
    experts: dict[str, dict] = {}
    moe_parents = set()
    for module, keys in groups.items():
        sp = switch_part(module)
        if sp is None:
            continue
        block, parent, part = sp
        if parent not in S.SWITCH_PARENTS.values():
            raise UnsupportedFeature(f"{where}: {module}: {S.REFUSALS['switch']}")
        moe_parents.add(parent)
        name = f"{block}.{S.CANONICAL_EXPERTS}.{DOWN if part == 'down_proj' else GATE_UP}"
        info = experts.setdefault(name, {"parts": []})
        info["parts"].append(part)
        tag = "" if part == "down_proj" else "_" + part.split("_")[0]
        out.setdefault(name, {}).update({p + tag: k for p, k in keys.items()})
    for module, keys in groups.items():
        if switch_part(module) is None:
            # transformers 5 names mixtral's block_sparse_moe "mlp" (its router: mlp.gate)
            name = module
            for parent in moe_parents - {"mlp"}:
                name = name.replace(f".{parent}.", ".mlp.")
            if name in out:
                raise LoraMigrateError(f"{where}: {module} and another module both map to {name}")
            out[name] = keys
    for name, info in experts.items():
        if "magnitude" in out[name] or any(k.startswith("magnitude") for k in out[name]):
            raise UnsupportedFeature(f"{where}: {name}: DoRA on mlx-lm's SwitchLinear is not a PEFT layer")
        info["parts"] = sorted(info["parts"], key=S.SWITCH_PARTS.index)
    return out, experts


def load_experts(info: dict, get) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) of one canonical experts module; ``get(param)`` reads a stored tensor."""
    if info["parts"] == ["down_proj"]:
        return get("a"), get("b")
    parts = {p.split("_")[0]: (get("a_" + p.split("_")[0]), get("b_" + p.split("_")[0])) for p in info["parts"]}
    if len(parts) == 1:
        (which, (A, B)), = parts.items()
        z = torch.zeros_like(B)
        return A, torch.cat([B, z] if which == "gate" else [z, B], dim=1)
    (Ag, Bg), (Au, Bu) = parts["gate"], parts["up"]
    if info.get("compact"):
        return Ag, torch.cat([Bg, Bu], dim=1)
    E, I, r = Bg.shape
    B = Bg.new_zeros(E, 2 * I, 2 * r)
    B[:, :I, :r], B[:, I:, r:] = Bg, Bu
    return torch.cat([Ag, Au], dim=1), B


def experts_shapes(info: dict, metas) -> tuple[tuple, tuple]:
    """Canonical (A, B) shapes of an experts module from its stored metas (see :func:`load_experts`)."""
    if info["parts"] == ["down_proj"]:
        return tuple(metas["a"].shape), tuple(metas["b"].shape)
    first = info["parts"][0].split("_")[0]
    (E, r, H), (_, I, _) = metas["a_" + first].shape, metas["b_" + first].shape
    k = r if len(info["parts"]) == 1 or info.get("compact") else 2 * r
    return (E, k, H), (E, 2 * I, k)


def mlx_modules(module: str, kind: str, model_type: str | None, name: str) -> list[tuple[str, str | None]]:
    """Canonical module → [(mlx module, part)]: part "gate"/"up" for the row halves of gate_up_proj, None for the
    whole pair. Needs the model type for the experts' (and mixtral's router's) mlx path."""
    if kind != "experts" and ".mlp." not in module:
        return [(module, None)]
    parent = S.SWITCH_PARENTS.get(model_type or "")
    if kind != "experts" and model_type in S.SWITCH_ROUTER_NOT_LINEAR and module.endswith(".mlp.gate"):
        raise UnsupportedFeature(f"{name}: {module}: {S.REFUSALS['switch_router']} ({model_type})")
    if kind != "experts":
        return [(module.replace(".mlp.", f".{parent}.") if parent else module, None)]
    owner, _, param = module.rpartition(".")
    if not owner.endswith("." + S.CANONICAL_EXPERTS) or param not in (GATE_UP, DOWN):
        raise UnsupportedFeature(f"{name}: {module}: stacked-experts LoRA outside <block>.mlp.experts."
                                 "gate_up_proj/down_proj has no mlx-lm layer here")
    if parent is None:
        raise UnsupportedFeature(f"{name}: {module}: {S.REFUSALS['switch_model_type']}; the base model's type is "
                                 f"{model_type!r}" + ("" if model_type else " (not known: pass --base-model DIR "
                                                                              "or --model-type)"))
    p = f"{owner[:-len(S.CANONICAL_EXPERTS)]}{parent}.{S.SWITCH}"
    return [(f"{p}.down_proj", None)] if param == DOWN else [(f"{p}.gate_proj", "gate"), (f"{p}.up_proj", "up")]


def fill_dense_blocks(blocks: Blocks, model_type: str | None, base_config: dict | None) -> tuple[Blocks, str | None]:
    """A model type whose first blocks are dense (glm4_moe's first_k_dense_replace): blocks adapting exactly the
    others' modules less the MoE-only ones (switch_mlp, the router, shared experts) come first, and mlx-lm skips the
    MoE keys there (linear_to_lora_layers adapts only paths a block has; measured: golden peft_glm4moe, block 0
    dense). Returns the blocks with those filled in, and a note; ``blocks`` as they are when this does not apply.
    Were such a block an MoE one after all, mlx-lm 0.32.2 would add a LoRA there whose lora_b stays at its zero
    init (load_adapters refuses only extra weights): no effect either."""
    parent = S.SWITCH_PARENTS.get(model_type or "")
    if model_type not in S.SWITCH_DENSE_FIRST or len({frozenset(v) for v in blocks.per_block.values()}) <= 1:
        return blocks, None
    moe_only = (f"{parent}.{S.SWITCH}.", f"{parent}.shared_expert")  # glm4_moe: shared_experts
    full = set().union(*blocks.per_block.values())
    dense_set = {m for m in full if not (m.startswith(moe_only) or m == f"{parent}.gate")}
    idx = list(blocks.per_block)
    dense = [n for n in idx if blocks.per_block[n] == dense_set]
    k = (base_config or {}).get("first_k_dense_replace")
    if (not dense or dense != idx[:len(dense)] or any(blocks.per_block[n] != full for n in idx[len(dense):])
            or (isinstance(k, int) and dense[-1] >= k)):
        return blocks, None
    filled = Blocks(blocks.stack, {n: set(full) for n in idx}, blocks.top)
    which = f"block {dense[0]}" if len(dense) == 1 else f"blocks {dense[0]}–{dense[-1]}"
    return filled, (f"{which} adapt{'s' if len(dense) == 1 else ''} no MoE module: taken as {model_type}'s first "
                    "dense blocks (mlx-lm skips the MoE keys where a block has none)")
