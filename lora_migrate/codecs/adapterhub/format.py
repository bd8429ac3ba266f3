"""Reading and writing the AdapterHub family (adapter-transformers 3.x, adapters 0.x–1.x).

Everything library-specific comes from the :class:`Convention`; this module only walks files and keys.
Every tensor key must be claimed by the convention's templates, or the read fails naming what is left.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

from pydantic import ValidationError

from ...adapter import AdapterInfo, FusedQKV, ScaleProvenance
from ...errors import DetectionError, LoraMigrateError
from ...io import BackgroundWriter, BinWriter, SafetensorsWriter, open_tensors
from ...schemas import CONVENTIONS, Convention
from ...schemas.base import CONV1D_MODEL_TYPES
from ...schemas.adapterhub import FAMILY, FUSED_QKV_MODULES, OTHER_METHOD_KEYS, AdapterHubWrapper
from ...source import (HeadFiles, ModuleEntry, SourceAdapter, TensorStore, json_number, read_json,
                      validation_message)

ADAPTERHUB = tuple(c for c in CONVENTIONS if c.family == FAMILY)
FULL_MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FULL_MODEL_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------- detection


def conventions_for_version(version: str | None) -> list[Convention]:
    """The conventions whose version patterns claim an adapter_config.json ``version`` string."""
    if not version:
        return []
    return [c for c in ADAPTERHUB if any(p.matches(version) for p in c.version_patterns)]


def conventions_for_transformers(version: str | None) -> list[Convention]:
    """Full-model checkpoints carry no adapter version: infer it from config.json's ``transformers_version``."""
    from ...schemas.base import VersionPattern

    if not version:
        return []
    return [c for c in ADAPTERHUB
            if c.transformers_versions and VersionPattern(specifier=c.transformers_versions).matches(version)]


def is_adapter_dir(path: Path) -> bool:
    cfg = path / "adapter_config.json"
    return cfg.is_file() and any((path / w).is_file() for c in ADAPTERHUB for w in c.weights_read)


def is_full_model_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        has = "adapters" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return has and any((path / w).is_file() for w in (*FULL_MODEL_WEIGHTS, *FULL_MODEL_INDEXES))


def detect_adapter_dir(path: Path) -> tuple[list[Convention], list[str], AdapterHubWrapper]:
    """Candidate conventions for an adapter folder, with the reasons for them."""
    raw = read_json(path / "adapter_config.json")
    if "peft_type" in raw:
        raise DetectionError(f"{path}: a PEFT adapter (adapter_config.json has peft_type={raw['peft_type']!r}) "
                             "but no adapter_model.safetensors or adapter_model.bin")
    try:
        wrapper = AdapterHubWrapper.model_validate(raw)
    except ValidationError as e:
        raise LoraMigrateError(validation_message(f"{path / 'adapter_config.json'}", e)) from None
    reasons = ["adapter_config.json has the AdapterHub wrapper (config, model_type, name, version)"]
    cands = conventions_for_version(wrapper.version)
    if cands:
        reasons.append(f"version {wrapper.version!r} was written by "
                       + " or ".join(f"{c.library} {c.versions}" for c in cands))
    else:
        cands = list(ADAPTERHUB)
        reasons.append(f"version {wrapper.version!r} is not one any AdapterHub release wrote")
    weights = [w for w in ("adapter.safetensors", "pytorch_adapter.bin") if (path / w).is_file()]
    if "adapter.safetensors" in weights:
        narrowed = [c for c in cands if "adapter.safetensors" in c.weights_read]
        if narrowed != cands:
            reasons.append("adapter.safetensors exists (adapters ≥ 0.2.1 only)")
            cands = narrowed
    reasons.append("weights: " + ", ".join(weights))
    return cands, reasons, wrapper


# ------------------------------------------------------------------------------------------------- reading


def _classify_unclaimed(keys: list[str]) -> str:
    for k in keys:
        for rx, what in OTHER_METHOD_KEYS:
            if rx.search(k):
                return f"holds {what} weights ({k!r}), not LoRA"
    shown = ", ".join(repr(k) for k in keys[:3])
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return f"keys no AdapterHub LoRA template claims: {shown}{more}"


def _fused_groups(attn_matrices: list[str]) -> tuple[int, ...]:
    return tuple(i for i, m in enumerate("qkv") if m in attn_matrices)


def plan_modules(conv: Convention, store: TensorStore, keys: list[str], adapter: str, config,
                 model_type: str | None, where: str) -> tuple[list[ModuleEntry], bool]:
    """Group ``keys`` of one adapter by module and check each module's tensors against the config.

    Returns the module entries (scale from the convention) and whether the adapter is gated.
    """
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for k in keys:
        module, _, param = conv.keys.claim(k)
        by_module[module][param] = k
    ia3 = config.composition_mode == "scale"
    fused_rx = FUSED_QKV_MODULES.get(model_type or "")
    alpha, r = float(config.alpha), int(config.r)
    entries = []
    for module, params in by_module.items():
        metas = {p: store.meta(k) for p, k in params.items()}
        need = {"b"} if ia3 else {"a", "b"}
        if config.use_gating:
            need |= {"gate_weight", "gate_bias"}
        missing = need - params.keys()
        extra = params.keys() - need
        if missing:
            raise LoraMigrateError(f"{where}: module {module!r} has no {', '.join(sorted(missing))} tensor")
        if extra:
            raise LoraMigrateError(f"{where}: module {module!r} has unexpected {', '.join(sorted(extra))} "
                                   f"(composition_mode={config.composition_mode}, use_gating={config.use_gating})")
        B = metas["b"].shape
        fused = None
        if ia3:
            kind = "ia3"
            if len(B) != 2 or B[1] != 1:
                raise LoraMigrateError(f"{where}: (IA)³ module {module!r}: lora_B has shape {list(B)}, expected [out, 1]")
            if fused_rx and fused_rx.search(module):
                raise LoraMigrateError(f"{where}: (IA)³ on fused-QKV layer {module!r} is not supported")
        else:
            A = metas["a"].shape
            if len(A) != 2 or len(B) != 2:
                raise LoraMigrateError(f"{where}: module {module!r}: lora_A {list(A)} / lora_B {list(B)} are not matrices")
            if fused_rx and fused_rx.search(module):
                kind = "fused_qkv"
                groups = _fused_groups(config.attn_matrices)
                n = len(groups)
                if n == 0 or A[0] != n * r or B[1] != r or B[0] % n:
                    raise LoraMigrateError(
                        f"{where}: fused-QKV module {module!r}: lora_A {list(A)}, lora_B {list(B)} do not fit "
                        f"r={r} with attn_matrices={config.attn_matrices} (expected [{n}·r, in], [{n}·E, r])")
                fused = FusedQKV(groups)
            else:
                kind = "linear"
                if A[0] != r or B[1] != r:
                    raise LoraMigrateError(f"{where}: module {module!r}: lora_A {list(A)}, lora_B {list(B)} "
                                           f"contradict the config's r={r}")
        rule = conv.scaling[kind]
        prov = ScaleProvenance(alpha=alpha, r=r, rule=f"{rule.value} ({kind})", convention=conv.name)
        entries.append(ModuleEntry(module=module, kind=kind, keys=params, metas=metas,
                                   scale=rule.scale(alpha, r), provenance=prov, fused=fused))
    for e in entries:
        for m in e.metas.values():
            if not m.dtype.is_floating_point:
                raise LoraMigrateError(f"{where}: module {e.module!r}: tensor {m.key!r} has dtype {m.dtype}")
    return entries, bool(config.use_gating)


def _validate_config(conv: Convention, raw: dict, where: str):
    try:
        return conv.config_model.model_validate(raw)
    except ValidationError as e:
        raise LoraMigrateError(validation_message(where, e) + f" (read as {conv.name})") from None


def read_head(path: Path, conv: Convention) -> HeadFiles | None:
    """Head files beside an adapter; a static-head model's are a copy of the base model's own head."""
    files = [path / f for f in conv.head_files if (path / f).is_file()]
    weights = [f for f in files if f.suffix in (".bin", ".safetensors")]
    if not files:
        return None
    keys: list[str] = []
    for w in weights:
        with open_tensors(w) as tf:
            keys += tf.keys()
    flex = [k for k in keys if k.startswith("heads.") or ".heads." in k]
    if flex:
        return HeadFiles(files, keys, False, f"a prediction head of its own ({len(flex)} tensors under heads.)")
    return HeadFiles(files, keys, True,
                     f"only a copy of the base model's head ({', '.join(keys[:3]) or 'no tensors'}), "
                     "which a static-head model saves with every adapter")


def _typed(wrapper: dict, config) -> dict:
    """The canonical adapter-level fields of an AdapterHub adapter (:class:`~lora_migrate.adapter.AdapterInfo`)."""
    mt = wrapper.get("model_type")
    leave_out = getattr(config, "leave_out", None)
    return {"base_model": wrapper.get("model_name"), "model_type": mt,
            "fan_in_fan_out": mt in CONV1D_MODEL_TYPES, "dropout": getattr(config, "dropout", None),
            "coverage_unproven": f"leave_out={leave_out} leaves layers out" if leave_out else None}


def read_adapter_dir(path: Path, conv: Convention, wrapper: AdapterHubWrapper) -> SourceAdapter:
    """One adapter folder written by ``save_adapter``."""
    cfg_path = path / "adapter_config.json"
    config = _validate_config(conv, wrapper.config, f"{cfg_path}: config")
    if config.architecture != "lora":
        raise LoraMigrateError(f"{cfg_path}: architecture {config.architecture!r} is not LoRA")
    weights = next((path / w for w in conv.weights_read if (path / w).is_file()), None)
    if weights is None:
        raise LoraMigrateError(f"{path}: no weights file for {conv.name} (expected {' or '.join(conv.weights_read)})")
    store = TensorStore()
    try:
        store.add(weights)
        claimed, unclaimed = defaultdict(list), []
        for k in store.keys():
            c = conv.keys.claim(k)
            (claimed[c[1]].append(k) if c else unclaimed.append(k))
        if unclaimed:
            raise LoraMigrateError(f"{weights}: {_classify_unclaimed(unclaimed)}")
        others = sorted(set(claimed) - {wrapper.name})
        if others:
            raise LoraMigrateError(f"{weights}: holds adapters {others} besides {wrapper.name!r}, the one "
                                   "adapter_config.json names")
        if not claimed:
            raise LoraMigrateError(f"{weights}: holds no LoRA tensors")
        entries, gated = plan_modules(conv, store, claimed[wrapper.name], wrapper.name, config,
                                      wrapper.model_type, str(weights))
        info = AdapterInfo(name=wrapper.name, convention=conv.name, r=int(config.r), alpha=float(config.alpha),
                           config=config.model_dump(exclude_unset=True),
                           wrapper=wrapper.model_dump(exclude={"config"}), **_typed(wrapper.model_dump(), config))
        head = read_head(path, conv)
    except BaseException:
        store.close()
        raise
    return SourceAdapter(info=info, convention=conv, store=store, modules=entries, gated=gated,
                         head=head, files=[cfg_path, weights])


def detect_full_model(path: Path) -> tuple[list[Convention], list[str], dict]:
    cfg = read_json(path / "config.json")
    tv = cfg.get("transformers_version")
    cands = conventions_for_transformers(tv)
    reasons = ["config.json holds an \"adapters\" section (a full model saved with adapters inside)"]
    if cands:
        reasons.append(f"transformers_version {tv!r} is what "
                       + " or ".join(f"{c.library} {c.versions}" for c in cands) + " shipped with")
    else:
        cands = list(ADAPTERHUB)
        reasons.append(f"transformers_version {tv!r} matches no AdapterHub release; the adapters' scaling is "
                       "ambiguous")
    return cands, reasons, cfg


def read_full_model(path: Path, conv: Convention, cfg: dict) -> list[SourceAdapter]:
    """Every LoRA adapter in a full-model checkpoint (``save_pretrained``), side by side under ``loras.<name>``."""
    section = cfg.get("adapters") or {}
    names = section.get("adapters") or {}
    config_map = section.get("config_map") or {}
    if not isinstance(names, dict) or not isinstance(config_map, dict):
        raise LoraMigrateError(f"{path / 'config.json'}: \"adapters\" section is malformed")
    store = TensorStore()
    try:
        index = next((path / i for i in FULL_MODEL_INDEXES if (path / i).is_file()), None)
        if index is not None:
            idx = read_json(index)
            shards = sorted(set((idx.get("weight_map") or {}).values()))
            if not shards:
                raise LoraMigrateError(f"{index}: empty weight_map")
            for s in shards:
                if "/" in s or "\\" in s or s.startswith("."):
                    raise LoraMigrateError(f"{index}: shard name {s!r} is not a plain file name")
                store.add(path / s)
            files = [index, *(path / s for s in shards)]
        else:
            w = next(path / w for w in FULL_MODEL_WEIGHTS if (path / w).is_file())
            store.add(w)
            files = [w]
        claimed, base, other = defaultdict(list), 0, []
        for k in store.keys():
            c = conv.keys.claim(k)
            if c:
                claimed[c[1]].append(k)
            elif any(rx.search(k) for rx, _ in OTHER_METHOD_KEYS):
                other.append(k)
            else:
                base += 1
        if other:
            raise LoraMigrateError(f"{path}: {_classify_unclaimed(other)}; only LoRA adapters can be converted")
        unknown = sorted(set(claimed) - set(names))
        if unknown:
            raise LoraMigrateError(f"{path}: LoRA tensors for adapters {unknown} that config.json does not list")
        hidden = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd")
        wrapper = {"hidden_size": hidden, "model_class": (cfg.get("architectures") or [None])[0],
                   "model_name": cfg.get("_name_or_path") or None, "model_type": cfg.get("model_type")}
        adapters = []
        for name, cid in names.items():
            if name not in claimed:
                continue  # a non-LoRA adapter (no loras.* keys) would have been refused above
            raw = conv.string_config_ids.get(cid) if isinstance(cid, str) and cid in conv.string_config_ids \
                else config_map.get(cid)
            if raw is None:
                raise LoraMigrateError(f"{path / 'config.json'}: adapter {name!r} refers to config {cid!r}, "
                                       "which config_map does not hold")
            config = _validate_config(conv, raw, f"{path / 'config.json'}: adapters.{name}")
            if config.architecture != "lora":
                continue
            entries, gated = plan_modules(conv, store, claimed[name], name, config, cfg.get("model_type"),
                                          f"{path}: adapter {name!r}")
            info = AdapterInfo(name=name, convention=conv.name, r=int(config.r), alpha=float(config.alpha),
                               config=config.model_dump(exclude_unset=True), wrapper={**wrapper, "name": name},
                               **_typed(wrapper, config))
            adapters.append(SourceAdapter(info=info, convention=conv, store=store, modules=entries, gated=gated,
                                          files=[path / "config.json", *files],
                                          notes=[f"{base} base-model tensors in the checkpoint are not part of "
                                                 "the adapter and were left out"]))
        if not adapters:
            raise LoraMigrateError(f"{path}: the full-model checkpoint holds no LoRA adapter")
    except BaseException:
        store.close()
        raise
    return adapters


# ------------------------------------------------------------------------------------------------- writing


def target_config(target: Convention, info: AdapterInfo, r: int, alpha: float) -> tuple[dict, list[str]]:
    """The adapter's config block in the target version's fields, and notes on what could not carry over.

    Fields the target lacks are dropped only when they change nothing; otherwise the conversion is refused.
    """
    src = dict(info.config)
    notes = []
    out = {}
    for f in target.config_write_fields:
        out[f] = src.pop(f) if f in src else target.config_defaults[f]
    out["r"], out["alpha"] = int(r), json_number(alpha)
    for f, v in src.items():
        if v in (None, False, []):
            continue
        if f == "leave_out":
            # Left-out layers have no keys; the target builds LoRA there too and keeps its init.
            if not (out["composition_mode"] == "add" and out["init_weights"] == "lora"):
                raise LoraMigrateError(
                    f"{info.name}: leave_out={v} cannot be expressed in {target.name}: it would build LoRA "
                    f"layers there with init_weights={out['init_weights']!r}, which is not a no-op")
            notes.append(f"leave_out={v} dropped: {target.name} has no such field; those layers get LoRA with "
                         "B = 0 (no effect)")
        elif f == "dtype":
            notes.append(f"dtype={v!r} dropped: {target.name} has no such field (the tensors keep their dtype)")
        else:
            raise LoraMigrateError(f"{info.name}: config field {f}={v!r} cannot be expressed in {target.name}")
    return out, notes


def write_adapter(out_dir: Path, target: Convention, info: AdapterInfo, wrapper: dict, deltas, r: int, alpha: float,
                  planned: list[tuple[str, str, str, tuple, object]], *, safetensors: bool = False,
                  head: HeadFiles | None = None, keep_head: bool = False, config: dict | None = None) -> list[str]:
    """Write one adapter folder: adapter_config.json and the weights, streaming one module at a time.

    ``planned`` lists (module, kind, param, shape, dtype) in write order; ``deltas`` yields the output ModuleDelta in
    the same module order. Returns notes for the report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config, notes = target_config(target, info, r, alpha)
    else:
        notes = []
    wrapper = {k: v for k, v in wrapper.items() if k in AdapterHubWrapper.model_fields and k != "config_id"}
    wrapper.update(config=config, name=info.name, version=target.version_to_write)
    for k in ("hidden_size", "model_class", "model_name", "model_type"):
        wrapper.setdefault(k, None)
    (out_dir / target.config_file).write_text(json.dumps(wrapper, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def tensors():
        for d in deltas:
            if d.A is not None:
                yield target.keys.key("a", d.module, info.name), d.A
            yield target.keys.key("b", d.module, info.name), d.B

    name = target.weights_write_safetensors if safetensors else target.weights_write  # AdapterHubCodec.check_options
    writer = SafetensorsWriter if name.endswith(".safetensors") else BinWriter
    with BackgroundWriter(writer(out_dir / name)) as w:  # plan the whole header, then stream one tensor at a time
        for module, _kind, param, shape, dtype in planned:
            w.add(target.keys.key(param, module, info.name), dtype, shape)
        w.write_header()
        for k, t in tensors():
            w.write(k, t)

    if head is not None:
        if head.static_copy and not keep_head:
            notes.append(f"left out {', '.join(f.name for f in head.files)}: {head.reason}; "
                         "the base model supplies it (--keep-head copies it)")
        else:
            for f in head.files:
                shutil.copy2(f, out_dir / f.name)
            notes.append(f"copied {', '.join(f.name for f in head.files)} unchanged ({head.reason})")
    return notes
