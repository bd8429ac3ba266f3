"""Layer coverage: which layers an adapter adapts per layer type, and zero adapters that complete a type.

LoRAX loads an adapter per layer type and returns nothing for the whole type when any layer of the model lacks its
weights (peft.md §7.3: ``if weight_name not in module_map: return None``), so a type adapted in only some layers is
silently unused everywhere. A zero adapter in each missing layer keeps the type, and changes nothing.
"""

from __future__ import annotations

import re

import torch

from ..adapter import ModuleDelta
from .registry import rule

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_type(module: str) -> tuple[str, int | None]:
    """A module path → (its layer type, its layer index): the first numeric path component is the index and is
    replaced by ``*`` (``model.layers.3.self_attn.q_proj`` → (``model.layers.*.self_attn.q_proj``, 3)), as LoRAX
    enumerates ``model.layers.{i}...`` per type. A path without one (``lm_head``) is a type of its own, index None."""
    m = _INDEX.search(module)
    if m is None:
        return module, None
    return module[:m.start(1)] + "*" + module[m.end(1):], int(m.group(1))


def layers_by_type(modules) -> dict[str, set[int]]:
    """Layer type → the indices that have a module of that type (types without a layer index are left out)."""
    out: dict[str, set[int]] = {}
    for m in modules:
        t, i = layer_type(m)
        if i is not None:
            out.setdefault(t, set()).add(i)
    return out


def missing_layers(modules, layers) -> dict[str, list[int]]:
    """Layer type → the indices of ``layers`` it lacks (only types that lack some)."""
    want = set(layers)
    return {t: sorted(want - have) for t, have in layers_by_type(modules).items() if want - have}


def module_at(layer_type_: str, index: int) -> str:
    """The module path of ``layer_type_`` (with ``*``) in layer ``index``."""
    return layer_type_.replace("*", str(index), 1)


@rule("zero_adapter")
def zero_adapter(like: ModuleDelta) -> ModuleDelta:
    """A = 0, B = 0 shaped like ``like``: ΔW = s·B·A = 0 for every s, exactly a no-op.

    The layer then computes exactly what its base layer computes, which is what it computed under the source
    adapter, which had no LoRA there. It completes a layer type for LoRAX (which otherwise drops the type in every
    layer)."""
    def zeros(t):
        return None if t is None else torch.zeros(t.shape, dtype=t.dtype)

    return ModuleDelta(module=like.module, A=zeros(like.A), B=zeros(like.B), scale=like.scale,
                       provenance=like.provenance, kind=like.kind, fused=like.fused)
