"""The initial adapter of a PiSSA / OLoRA source, rebuilt from the original base model (``--base-model``).

PEFT's init replaced each adapted weight W by the residual W − s·B₀A₀ and started training from (A₀, B₀); the
trained adapter holds only on that residual. With the original W, full-SVD PiSSA and OLoRA's (A₀, B₀) can be
computed again exactly as PEFT computed them (``rules/inits.py``), so no saved initial adapter is needed. The
result is a :class:`SourceAdapter` like a loaded initial adapter: the planner, the rank-2r re-expression
(``pissa_to_lora``) and the numeric check take it unchanged. Weights are read one module at a time, when that
module is converted, and dropped after; only names, shapes and dtypes are read up front.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .adapter import AdapterInfo, ModuleDelta
from .errors import LoraMigrateError, UnsupportedFeature
from .fixmerged import weight_sets
from .resolve import resolve_source
from .rules import RULES
from .rules.inits import olora_stored_init
from .source import ModuleEntry, SourceAdapter, TensorStore
from .check.exact import all_finite

# dtypes PEFT's pissa_init / olora_init accept for the base weight (else TypeError)
INIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class BaseWeights:
    """The weights of the original base model: ``model.safetensors``, sharded ``model.safetensors.index.json``
    + shards, or ``pytorch_model.bin`` (read with weights_only), opened lazily."""

    path: Path
    store: TensorStore

    def close(self) -> None:
        self.store.close()


def open_base(path: str | Path) -> BaseWeights:
    """Open the weight files of a saved transformers model (a folder, one weight file, or ``hf://org/name``)."""
    path = Path(resolve_source(path))
    if not path.exists():
        raise LoraMigrateError(f"{path}: no such file or folder (--base-model)")
    files = [path] if path.is_file() else weight_sets(path)[0]
    store = TensorStore()
    try:
        for f in files:
            store.add(f)
    except BaseException:
        store.close()
        raise
    return BaseWeights(path, store)


def base_weight_keys(modules: list[str], keys: list[str]) -> tuple[dict[str, str], str | None]:
    """module → the key of its weight in the base checkpoint, and the prefix rewrite used (None: none).

    The key is ``<module>.weight``. If the checkpoint names tensors from another root, one leading prefix is
    removed from, or added to, every module path alike: a checkpoint of the bare model (``layers.0…``) for an
    adapter of the ``…ForCausalLM`` model (``model.layers.0…``), or the other way round. The rewrite that finds the
    most modules wins (no rewrite on a tie); a module it does not find is an error naming the key looked for.
    """
    keyset = set(keys)
    want = [f"{m}.weight" for m in modules]
    parts = want[0].split(".")
    rewrites = [("", "")] + [(".".join(parts[:i]) + ".", "") for i in range(1, len(parts) - 1)]
    rewrites += [("", k[: -len(want[0])]) for k in sorted(keyset) if k.endswith("." + want[0])]

    def rewrite(w: str, rw: tuple[str, str]) -> str | None:
        old, new = rw
        return new + w[len(old):] if w.startswith(old) else None

    best = max(rewrites, key=lambda rw: sum(rewrite(w, rw) in keyset for w in want))
    out = {}
    for m, w in zip(modules, want):
        k = rewrite(w, best)
        if k not in keyset:
            tail = ".".join(parts[-2:]) if len(parts) > 2 else w
            like = next((x for x in sorted(keyset) if x.endswith(tail)), next(iter(sorted(keyset)), None))
            raise LoraMigrateError(f"the base model has no tensor {k or w!r} for adapter module {m!r} "
                                   f"(its keys look like {like!r}); is it the model the adapter was made for?")
        out[m] = k
    how = None if best == ("", "") else (f"prefix {best[1]!r} added" if best[1] else f"prefix {best[0]!r} removed")
    return out, how


@dataclass
class RebuiltInitial(SourceAdapter):
    """A PiSSA / OLoRA source's initial adapter, computed from the original weights module by module."""

    rule: str = ""
    base_keys: dict[str, str] | None = None
    fan_in_fan_out: bool = False
    where: str = ""  # the base model and how its keys were matched, for the plan

    def load(self, e: ModuleEntry) -> ModuleDelta:
        """(A₀, B₀) of one module from its base weight: the rule's float32 factors, then the roundings PEFT's
        stored ones went through: to the base layer's dtype (``_move_adapter_to_device_of_base_layer``), then to
        the adapter's (``autocast_adapter_dtype`` keeps adapters float32)."""
        key = self.base_keys[e.module]
        W = self.store.get(key)
        if not all_finite(W):
            raise LoraMigrateError(f"the base model's {key!r} holds NaN or Inf; the initial adapter of "
                                   f"{e.module!r} cannot be rebuilt from it")
        A0, B0 = RULES[self.rule](W, e.rank, e.scale, fan_in_fan_out=self.fan_in_fan_out, module=e.module)
        A0, B0 = (t.to(W.dtype).to(e.metas[p].dtype) for t, p in ((A0, "a"), (B0, "b")))
        return ModuleDelta(module=e.module, A=A0, B=B0, scale=e.scale, provenance=e.provenance)


def rebuilt_initial(src: SourceAdapter, base: BaseWeights) -> RebuiltInitial:
    """The initial adapter of ``src`` from the original weights in ``base``; refused (nothing read but names,
    shapes and dtypes) when the init cannot be rebuilt or the base does not fit the adapter."""
    name, init = src.info.name, src.init
    if not src.init_mutates:
        shown = init if init is not None else True
        raise LoraMigrateError(f"{name}: --base-model is for adapters whose init changed the base weights "
                               f"(PiSSA, OLoRA), but init_lora_weights={shown!r} did not; leave it out")
    rule = src.init_rebuild
    if rule is None:
        raise UnsupportedFeature(f"{name}: init_lora_weights={init!r} cannot be rebuilt from the base weights "
                                 f"({src.init_why_not}); it needs the saved initial adapter "
                                 "(--initial-adapter)")
    fan = src.info.fan_in_fan_out
    linear = [e for e in src.modules if e.kind == "linear"]  # the others are refused by the planner
    keys, how = base_weight_keys([e.module for e in linear], base.store.keys()) if linear else ({}, None)
    entries = []
    for e in linear:
        A, B = e.metas["a"].shape, e.metas["b"].shape
        need = (A[1], B[0]) if fan else (B[0], A[1])
        m = base.store.meta(keys[e.module])
        if tuple(m.shape) != need:
            raise LoraMigrateError(f"the base model's {m.key!r} has shape {list(m.shape)}, but adapter module "
                                   f"{e.module!r} (lora_A {list(A)}, lora_B {list(B)}, fan_in_fan_out={fan}) "
                                   f"needs {list(need)}")
        if m.dtype not in INIT_DTYPES:
            raise LoraMigrateError(f"the base model's {m.key!r} is {m.dtype}; PEFT initializes {init} only from "
                                   "float32, float16 or bfloat16 weights")
        entries.append(ModuleEntry(module=e.module, kind=e.kind, keys={},
                                   metas={p: e.metas[p] for p in ("a", "b")}, scale=e.scale,
                                   provenance=e.provenance, alpha=e.alpha))
    where = str(base.path) + (f", keys with {how}" if how else "")
    info = AdapterInfo(name=f"{name} (initial, rebuilt)", convention=src.info.convention, r=src.info.r,
                       alpha=src.info.alpha)
    return RebuiltInitial(info=info, convention=src.convention, store=base.store, modules=entries,
                          files=[f.path for f in base.store.files], init=init,
                          rule=rule, base_keys=keys, fan_in_fan_out=fan, where=where)


@dataclass
class StoredOLoRAInitial(SourceAdapter):
    """A saved OLoRA initial adapter of a fan_in_fan_out model, read as the update PEFT's init removed."""

    def load(self, e: ModuleEntry) -> ModuleDelta:
        return olora_stored_init(super().load(e))


def saved_initial(src: SourceAdapter, init: SourceAdapter) -> SourceAdapter:
    """The initial adapter saved before training (--initial-adapter), as the update of W that the init removed:
    itself, except for OLoRA on fan_in_fan_out layers (GPT-2 ``Conv1D``), where PEFT stored the factors of the
    transposed update (:func:`rules.inits.olora_stored_init`)."""
    if src.init_rebuild == "rebuild_olora_init" and src.info.fan_in_fan_out:
        return StoredOLoRAInitial(**{f.name: getattr(init, f.name) for f in fields(SourceAdapter)})
    return init
