"""The gguf codec: llama.cpp LoRA adapters (one ``.gguf`` file), read and written with ggml's ``gguf`` package.

Reading gives the canonical modules by their transformers names (gguf's name table read backwards), A and B in
PEFT's orientation with the q/k rows un-permuted, and each module's scale as the runtime applies it: alpha/r with
r = lora_b ne[0], or 1 when alpha is 0. Writing: codecs/gguf/plan.py and format.py. Layout and sources:
lora_migrate/schemas/gguf.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...adapter import AdapterInfo, ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature, VerificationFailed
from ...schemas import Convention
from ...schemas.gguf import ARCHS, FAMILY, GGUF, OUTTYPES, REFUSALS
from ...source import ModuleEntry, Source, SourceAdapter
from ..base import Claim, Codec, PlanOptions
from .format import (EMBED, GgufTensors, heads_of, module_name, n_blocks_of, qk_heads, read_arch, storage_error,
                     tensor_map, write_gguf)
from .plan import RUNTIME_RULE, plan_gguf

_MAGIC = b"GGUF"


class GgufCodec(Codec):
    id = FAMILY
    display = "a llama.cpp GGUF"
    output = "file"
    file_suffix = ".gguf"
    reads_base_config = True

    # -------------------------------------------------------------------------------------------- reading

    def claim(self, path: Path) -> Claim | None:
        if not (path.is_file() and path.suffix == ".gguf"):
            return None
        return Claim("a GGUF file with general.type = adapter", 2) if is_adapter(path) else None

    def open(self, path: Path, from_: Convention | None) -> Source:
        a = read_adapter(path, path.stem)
        return Source(path, GGUF, "adapter", [a], [f"{path.name}: GGUF, general.type = adapter, "
                                                   f"general.architecture = {a.store.field('general.architecture')}"])

    def prepare(self, a: SourceAdapter, opts: PlanOptions) -> None:
        """The q/k rows of a permuting architecture need the base model's head counts (its config.json)."""
        set_heads(a, opts.base_config)

    # -------------------------------------------------------------------------------------------- writing

    def check_options(self, target: Convention, opts: PlanOptions) -> None:
        if opts.outtype is not None and opts.outtype not in OUTTYPES:
            raise LoraMigrateError(f"--outtype {opts.outtype!r}: llama.cpp adapters are written as "
                                   f"{', '.join(OUTTYPES)}")

    def plan(self, src, target: Convention, opts: PlanOptions, steps, output: str):
        return plan_gguf(src, target, opts, steps, output)

    def expands_fused(self, target: Convention) -> bool:
        return True

    def tensor_names(self, ex):
        return [row[0] for row in ex.codec_state["layout"]]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        st = ex.codec_state
        n = write_gguf(dest, st["arch"], st["alpha"], ex.plan.adapter, st["layout"], deltas, st["names"],
                       st["heads"])
        return [f"wrote {n} tensors ({st['outtype']}) with adapter.lora.alpha = {st['alpha']:.10g}"]

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions) -> SourceAdapter:
        if not is_adapter(dest):
            raise VerificationFailed(f"{dest}: the written file is not a GGUF adapter")
        a = read_adapter(dest, name)
        set_heads(a, opts.base_config)
        return a


def is_adapter(path: Path) -> bool:
    """GGUF magic, and general.type = adapter (what llama.cpp requires of a LoRA file)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _MAGIC:
                return False
    except OSError:
        return False
    store = GgufTensors(path)
    try:
        return store.field("general.type") == "adapter"
    finally:
        store.close()


def read_adapter(path: Path, name: str) -> SourceAdapter:
    """A GGUF adapter as canonical modules (lazy: only the tensor infos are read here)."""
    store = GgufTensors(path)
    try:
        arch, model_type = read_arch(store)
        alpha = float(store.field("adapter.lora.alpha") or 0.0)
        bases = {}
        for k in store.keys():
            base, dot, suffix = k.rpartition(".")
            if suffix not in ("lora_a", "lora_b"):
                if k.endswith("_norm.weight"):
                    continue  # llama.cpp skips norm vectors too ("TODO: add support for norm vector")
                raise UnsupportedFeature(f"{path}: tensor {k!r} is not a lora_a/lora_b tensor (llama.cpp: 'has "
                                         "unexpected suffix')")
            bases.setdefault(base, {})[suffix] = k
        info = ARCHS[model_type]
        tmap = tensor_map(arch, n_blocks_of(bases, None))
        modules, features = [], set()
        for base, keys in bases.items():
            if set(keys) != {"lora_a", "lora_b"}:
                raise LoraMigrateError(f"{path}: LoRA tensor pair for {base!r} is missing one component")
            module = module_name(tmap, base, info)
            if module is None:
                raise UnsupportedFeature(f"{path}: {base} has no transformers module in gguf's {arch} name table")
            kind = "embedding" if base == EMBED else "linear"
            if kind == "embedding":
                features.add("embedding")
            metas = {"a": store.meta(keys["lora_a"]), "b": store.meta(keys["lora_b"])}
            r = store.stored_shape(keys["lora_b"])[-1]  # lora_b ne[0]: the rank llama.cpp reads
            if metas["a"].shape[0] != r:
                raise LoraMigrateError(f"{path}: {base}: lora_a ne={list(store.stored_shape(keys['lora_a'])[::-1])} "
                                       f"and lora_b ne=[{r}, …] disagree on the rank")
            scale = alpha / r if alpha else 1.0
            prov = ScaleProvenance(alpha=alpha, r=r, rule=RUNTIME_RULE if alpha else "1 (adapter.lora.alpha = 0)",
                                   convention=GGUF.name)
            modules.append(ModuleEntry(module=module, kind=kind, keys={"a": keys["lora_a"], "b": keys["lora_b"]},
                                       metas=metas, scale=scale, provenance=prov,
                                       storage_error=_storage_error(store, keys)))
        if not modules:
            raise LoraMigrateError(f"{path}: a GGUF adapter without lora_a/lora_b tensors")
        if info.permutes_qk:
            for e in modules:
                if qk_heads(e.keys["b"].removesuffix(".lora_b"), (1, 1)):
                    store.pending[e.keys["b"]] = REFUSALS["unknown_heads"].format(model_type=model_type)
        ranks = Counter(e.rank for e in modules)
        # no rank key in the file: the rank is each pair's own (an r only where all agree)
        ai = AdapterInfo(name=name, convention=GGUF.name, r=next(iter(ranks)) if len(ranks) == 1 else None,
                         alpha=alpha, model_type=model_type, task_type="CAUSAL_LM")
        return SourceAdapter(info=ai, convention=GGUF, store=store, modules=modules, files=[path], features=features)
    except BaseException:
        store.close()
        raise


def _storage_error(store: GgufTensors, keys: dict[str, str]) -> float | None:
    """The coarsest storage of the pair (what the check's tolerance must allow, against an F32 source)."""
    errs = [e for e in (storage_error(store.type_name(k)) for k in keys.values()) if e]
    return max(errs) if errs else None


def set_heads(a: SourceAdapter, cfg: dict | None) -> None:
    """Un-permute the q/k lora_b rows of a permuting architecture with the base model's heads, once known."""
    store = a.store
    if not isinstance(store, GgufTensors) or not store.pending:
        return
    hc = heads_of(cfg)
    if hc is None:
        return
    a.base_config = cfg
    for key in list(store.pending):
        n = qk_heads(key.removesuffix(".lora_b"), hc)
        store.unpermute[key] = n
        del store.pending[key]


GGUF_CODEC = GgufCodec()
