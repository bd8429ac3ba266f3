"""Reading and writing the PEFT family (PEFT by era, and the LoRAX / vLLM serving profiles).

Everything version-specific comes from the :class:`Convention` (pattern matching, known config fields); this module
walks files and keys. Every tensor key is either claimed by the LoRA templates or is a non-LoRA tensor the config
explains (modules_to_save copies, trained base biases, trainable tokens, saved embeddings); anything else fails.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from packaging.version import InvalidVersion, Version
from pydantic import ValidationError

from ...adapter import AdapterInfo, ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...io import BackgroundWriter, BinWriter, SafetensorsWriter
from ...schemas import Convention
from ...schemas.base import Scaling
from ...schemas.peft import (FIELDS_SINCE, PEFT_0_13, PEFT_ERAS, PEFT_PREFIX,
                            PeftLoraConfig, embed_scale, mutating_init, not_rebuildable_reason, rebuild_rule,
                            saved_by_modules_to_save)
from ..base import pick
from ..shared import canonical_meta
from . import experts as ex
from ...source import ModuleEntry, SourceAdapter, TensorStore, base_model_config, read_json, validation_message

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# First version of each era, in order, from the schemas' ``versions`` (the era spans up to the next one's first
# version); releases before the oldest era we describe read as that era.
_ERA_STARTS = tuple(("0" if i == 0 else str(c.version_bounds()[0]), c) for i, c in enumerate(PEFT_ERAS))


# ----------------------------------------------------------------------------------------------- detection


def _raw_config(path: Path) -> dict | None:
    try:
        raw = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def is_peft_config(path: Path) -> bool:
    """``path/adapter_config.json`` is PEFT's (it has ``peft_type``)."""
    raw = _raw_config(path) if (path / "adapter_config.json").is_file() else None
    return raw is not None and "peft_type" in raw


def is_peft_dir(path: Path) -> bool:
    return is_peft_config(path) and any((path / w).is_file() for w in WEIGHTS)


def read_peft_one(path: Path, from_: Convention | None, name: str = "default"):
    cands, reasons, raw = detect_peft_dir(path)
    conv, reasons = pick(path, cands, reasons, from_)
    return read_peft_dir(path, conv, raw, name), reasons


def read_peft_tree(path: Path, from_: Convention | None):
    """PEFT's multi-adapter layout: the default adapter at the top (if any), every other one in a subfolder
    named after it (``save_pretrained`` of several adapters, or a folder of adapter folders)."""
    adapters, reasons = [], []
    try:
        if is_peft_dir(path):
            a, why = read_peft_one(path, from_)
            adapters.append(a)
            extra = f" (+{len(a.extras)} non-LoRA tensors)" if a.extras else ""
            reasons += why + [f"{sum(len(e.keys) for e in a.modules)} tensor keys are all claimed by "
                              f"base_model.model.<module>.lora_A|lora_B…{extra}"]
        for d in sorted(p for p in path.iterdir() if p.is_dir() and is_peft_dir(p)):
            a, why = read_peft_one(d, from_, d.name)
            adapters.append(a)
            reasons.append(f"{d.name}/: {a.convention.name}: " + "; ".join(why[1:]))
    except BaseException:
        for a in adapters:
            a.store.close()
        raise
    if len(adapters) > 1:
        reasons.insert(0, f"{len(adapters)} PEFT adapters: " + ", ".join(a.info.name for a in adapters))
    return adapters, reasons


def eras_for(raw: dict) -> tuple[list[Convention], list[str]]:
    """The PEFT eras that can have written this config, with the evidence.

    From 0.18 ``peft_version`` says it. Before that, PEFT writes every field of its release (``to_dict`` of the
    dataclass), so the newest field present is a lower bound and the oldest field absent an upper bound.
    """
    pv = raw.get("peft_version")
    if isinstance(pv, str) and pv:
        try:
            v = Version(pv.split("@")[0])
        except InvalidVersion:
            v = None
        if v is not None:
            era = [c for start, c in _ERA_STARTS if Version(start) <= v][-1]
            return [era], [f"peft_version {pv!r}"]
    present = [f for f in raw if f in FIELDS_SINCE]
    lo = max((Version(FIELDS_SINCE[f]) for f in present), default=Version("0"))
    newest = max(present, key=lambda f: Version(FIELDS_SINCE[f]), default=None)
    absent = [f for f, since in FIELDS_SINCE.items() if f not in raw and Version(since) > lo]
    hi = min((Version(FIELDS_SINCE[f]) for f in absent), default=None)
    cands = []
    for i, (start, c) in enumerate(_ERA_STARTS):
        end = Version(_ERA_STARTS[i + 1][0]) if i + 1 < len(_ERA_STARTS) else None
        if (hi is None or Version(start) < hi) and (end is None or lo < end):
            cands.append(c)
    why = f"fields date it to PEFT ≥ {lo}" + (f" (has {newest!r})" if newest else "")
    if hi is not None:
        first_absent = min(absent, key=lambda f: Version(FIELDS_SINCE[f]))
        why += f" and < {hi} (no {first_absent!r})"
    return cands or [PEFT_0_13], [why]


def detect_peft_dir(path: Path) -> tuple[list[Convention], list[str], dict]:
    raw = read_json(path / "adapter_config.json")
    if raw.get("peft_type") != "LORA":
        raise UnsupportedFeature(f"{path}: a PEFT {raw.get('peft_type')!r} adapter, not LoRA")
    cands, why = eras_for(raw)
    reasons = ["adapter_config.json has peft_type \"LORA\" (PEFT)", *why]
    if len(cands) > 1 and (raw.get("rank_pattern") or raw.get("alpha_pattern")):
        reasons.append("eras " + ", ".join(c.name for c in cands) + " match rank/alpha patterns differently")
    elif len(cands) > 1:
        reasons.append("no rank/alpha patterns, so every candidate era reads it the same; taken as "
                       + cands[-1].name)
        cands = [cands[-1]]
    weights = [w for w in WEIGHTS if (path / w).is_file()]
    reasons.append("weights: " + ", ".join(weights))
    return cands, reasons, raw


# ------------------------------------------------------------------------------------------ pattern matching


def _pattern_key(matching: str, keys, name: str) -> str:
    for k in keys:
        try:
            rx = rf".*\.{k}$" if matching in ("combined", "split") else rf"(.*\.)?({k})$"
            if re.match(rx, name):
                return k
        except re.error as e:
            raise LoraMigrateError(f"rank_pattern/alpha_pattern key {k!r} is not a valid regex: {e}") from None
    return name


def module_r_alpha(matching: str, name: str, r: int, alpha: float, rank_pattern: dict,
                   alpha_pattern: dict) -> tuple[int, float]:
    """(r, alpha) that PEFT of this matching era gives module ``name`` (peft.md §1.3)."""
    if matching == "combined":  # ≤ 0.13: one chained list; the first key matching decides both lookups
        k = _pattern_key(matching, [*rank_pattern, *alpha_pattern], name)
        return rank_pattern.get(k, r), alpha_pattern.get(k, alpha)
    kr = _pattern_key(matching, list(rank_pattern), name)
    ka = _pattern_key(matching, list(alpha_pattern), name)
    return rank_pattern.get(kr, r), alpha_pattern.get(ka, alpha)


def pattern_key_for(matching: str, module: str) -> str:
    """A pattern key that matches exactly ``module`` in this era: the full path (escaped where keys are regexes;
    ≤ 0.14 falls back to an exact dict lookup of the full name, which an escaped key would defeat)."""
    return re.escape(module) if matching == "regex" else module


# ------------------------------------------------------------------------------------------------- reading

_SAVED_EMBEDDING_RX = re.compile(
    r"(^|\.)(embed_tokens|wte|shared|embed_in|word_embeddings|lm_head|embed_out)(\.base_layer)?\.weight$")
_EXTRA_RX = (
    (re.compile(r"\.token_adapter\.trainable_tokens_delta$"), "trainable tokens"),
    (_SAVED_EMBEDDING_RX, "saved embedding/lm_head weights"),
)


def is_frozen_base_copy(key: str) -> bool:
    """A full embedding/lm_head weight that PEFT saved beside an adapter which has LoRA on that layer
    (``...embed_tokens.base_layer.weight``): a copy of the frozen base weight, not a trained tensor."""
    return key.endswith(".base_layer.weight") and _SAVED_EMBEDDING_RX.search(key) is not None


# Config fields that change the forward pass in a way only PEFT itself can reproduce.
PEFT_ONLY = {
    "use_qalora": "QALoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routing mixes several LoRA experts per token",
    "use_bdlora": "BD-LoRA shares block-diagonal factors",
    "layer_replication": "replicated layers share base weights but not adapters",
}


def on_parameter(module: str, target_parameters) -> bool:
    """Whether PEFT put a ``ParamWrapper`` (LoRA on a raw parameter, ``target_parameters``, 0.17 #2638) at
    ``module``: matched as ``BaseTuner._inject_parameters`` matches (peft 0.21.2), ``<module>.<param>`` equal to
    an entry or ending in ``.<entry>``, with the ``.base_layer`` of nested wrappers (several parameters of one
    module) removed from the path."""
    path = module.replace(".base_layer", "")
    for t in target_parameters or ():
        owner = t.rpartition(".")[0]
        if not owner or path == owner or path.endswith("." + owner):
            return True
    return False


def _classify_extra(key: str, module_set: list[str], bias_mode: str) -> str | None:
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
    if body is None:
        return None
    path = body.rsplit(".", 1)[0]
    if saved_by_modules_to_save(path, module_set):
        return "modules_to_save"
    for rx, what in _EXTRA_RX:
        if rx.search(body):
            return what
    if bias_mode != "none" and body.endswith(".bias"):
        return f"trained base biases (bias={bias_mode!r})"
    return None


def set_embed_scales(a: SourceAdapter, model_config: dict | None, type_only: bool = False) -> None:
    """Each embedding module's base-layer factor (``embed_scale``, from the base model's config.json, or with
    ``type_only`` from its model type alone), and for an era that multiplies embedding LoRA by it
    (``lora_embedding_scaled``) the effective scale s·factor."""
    a.base_config = model_config
    on = bool(a.convention.lora_embedding_scaled)
    unknown = []
    for e in a.modules:
        if e.kind != "embedding":
            continue
        old = e.embed_scale if on and e.embed_scale else 1.0
        f = embed_scale(model_config, e.module, e.metas["b"].shape[0], type_only)
        e.embed_scale = f
        e.scale = e.scale / old * (f if on and f else 1.0)
        if on and f is None:
            unknown.append(e.module)
        elif on and f != 1.0:
            e.provenance = replace(e.provenance, rule=f"{e.provenance.rule.split(' ×')[0]} × embed_scale {f:g}")
    if unknown:
        a.notes.append(f"embedding LoRA on {unknown[0]}: {a.convention.name} multiplies it by the base layer's "
                       "embed_scale (Gemma3, BART with scale_embedding: √d; #2825), and without the base model's "
                       "config.json that factor is unknown (--base-model DIR gives it; --model-type for a type that "
                       "never scales, e.g. llama)")


def read_peft_dir(path: Path, conv: Convention, raw: dict, name: str = "default",
                  model_config: dict | None = None) -> SourceAdapter:
    """One PEFT adapter folder as ``save_pretrained`` writes it. ``model_config``: the base model's config.json;
    by default the one ``base_model_name_or_path`` names (a local folder or the Hugging Face cache)."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = PeftLoraConfig.model_validate(raw)
    except ValidationError as e:
        raise LoraMigrateError(validation_message(str(cfg_path), e) + f" (read as {conv.name})") from None
    for f in ("enable_lora", "merge_weights"):
        if raw.get(f):
            raise UnsupportedFeature(f"{cfg_path}: {f} (PEFT ≤ 0.2 MergedLinear) is not supported")
    weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise LoraMigrateError(f"{path}: no weights file (expected {' or '.join(WEIGHTS)})")
    matching = conv.pattern_matching or "regex"
    store = TensorStore()
    notes: list[str] = []
    features: set[str] = set()
    try:
        store.add(weights)
        by_module: dict[str, dict[str, str]] = defaultdict(dict)
        unclaimed = []
        for k in store.keys():
            c = conv.keys.claim(k)
            if c:
                by_module[c[0]][c[2]] = k
            else:
                unclaimed.append(k)
        extras, unknown = [], []
        kinds_of_extra: dict[str, list[str]] = defaultdict(list)
        for k in unclaimed:
            what = _classify_extra(k, list(cfg.modules_to_save or []), cfg.bias)
            if what is None:
                unknown.append(k)
            else:
                extras.append(k)
                kinds_of_extra[what].append(k[len(PEFT_PREFIX):])
        if unknown:
            raise LoraMigrateError(f"{weights}: {len(unknown)} tensor keys no PEFT LoRA schema claims, e.g. "
                                   f"{unknown[0]!r}")
        if not by_module:
            raise LoraMigrateError(f"{weights}: holds no LoRA tensors")
        wrapped = {m: (tuple(store.meta(p["a"]).shape), tuple(store.meta(p["b"]).shape))
                   for m, p in by_module.items() if on_parameter(m, cfg.target_parameters) and "a" in p and "b" in p}
        names = ex.resolve(wrapped, cfg.target_parameters, str(weights)) if wrapped else {}
        entries = [plan_module(conv, store, names.get(module, module), params, cfg, matching, str(weights), notes,
                               features, experts=module in names) for module, params in by_module.items()]
        for param, flag, feature, key_name in (("magnitude", cfg.use_dora, "dora", "lora_magnitude_vector"),
                                                ("bias", cfg.lora_bias, "lora_bias", "lora_B.bias")):
            if any(param in e.keys for e in entries):
                if flag:
                    features.add(feature)
                    continue
                for e in entries:
                    e.keys.pop(param, None)
                    e.metas.pop(param, None)
                field = "use_dora" if feature == "dora" else "lora_bias"
                notes.append(f"{key_name} tensors left out: {field} is false, so PEFT ignores them")
        if cfg.use_dora and "dora" not in features:
            raise LoraMigrateError(f"{cfg_path}: use_dora is true but {weights.name} has no lora_magnitude_vector")
        for what, keys in kinds_of_extra.items():
            features.add("bias" if what.startswith("trained base") else
                         "trainable_tokens" if what == "trainable tokens" else
                         "saved_embeddings" if what.startswith("saved embedding") else "modules_to_save")
            notes.append(f"{len(keys)} non-LoRA tensors ({what}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")
        if cfg.use_rslora:
            features.add("rslora")
        if cfg.rank_pattern or cfg.alpha_pattern:
            features.add("patterns")
        for f, why in PEFT_ONLY.items():
            if raw.get(f) not in (None, False, [], {}):
                features.add(f)
                notes.append(f"{f}={raw[f]!r}: {why}")
        init = cfg.init_lora_weights if isinstance(cfg.init_lora_weights, str) else None
        known = set(conv.config_write_fields) | set(FIELDS_SINCE)
        unknown_fields = sorted(set(raw) - known)
        if unknown_fields:
            notes.append(f"config fields no PEFT release we know has: {', '.join(unknown_fields)}")
        info = AdapterInfo(name=name, convention=conv.name, r=cfg.r, alpha=float(cfg.lora_alpha), config=raw,
                           base_model=raw.get("base_model_name_or_path"), task_type=raw.get("task_type"),
                           fan_in_fan_out=bool(cfg.fan_in_fan_out), coverage_unproven=_coverage_unproven(raw),
                           dropout=raw.get("lora_dropout"))
    except BaseException:
        store.close()
        raise
    mutates = mutating_init(init)
    a = ex.PeftAdapter(info=info, convention=conv, store=store, modules=entries, files=[cfg_path, weights],
                      notes=notes, extras=extras, features=features, init=init, init_mutates=mutates,
                      init_rebuild=rebuild_rule(init) if mutates else None,
                      init_why_not=not_rebuildable_reason(init) if mutates else None, peft=cfg)
    if "embedding" in features:
        set_embed_scales(a, model_config or base_model_config(raw.get("base_model_name_or_path")))
    return a


def _coverage_unproven(cfg: dict) -> str | None:
    """Why the config does not prove that each adapted layer type covers every layer of the model, or None when
    it does: ``target_modules`` as a list of names (or "all-linear", or None: the model type's defaults), with no
    ``layers_to_transform`` / ``exclude_modules``."""
    # layers_pattern only matters with layers_to_transform (PEFT refuses it alone)
    for f, what in (("layers_to_transform", "adapts only those layers"), ("exclude_modules", "leaves modules out")):
        if cfg.get(f) not in (None, [], ""):
            return f"{f}={cfg[f]!r} {what}"
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear":
        return f"target_modules is a regex ({tm!r}), which may match only some layers"
    return None


def plan_module(conv, store, module, params, cfg, matching, where, notes, features, experts=False) -> ModuleEntry:
    metas = {p: store.meta(k) for p, k in params.items()}
    emb = "emb_a" in params or "emb_b" in params
    if emb:
        if "a" in params or "b" in params:
            raise LoraMigrateError(f"{where}: module {module!r} has both lora_A/B and lora_embedding_A/B")
        params = {("a" if p == "emb_a" else "b" if p == "emb_b" else p): k for p, k in params.items()}
        metas = {("a" if p == "emb_a" else "b" if p == "emb_b" else p): m for p, m in metas.items()}
    for need in ("a", "b"):
        if need not in params:
            other = "A" if need == "b" else "B"
            raise LoraMigrateError(f"{where}: module {module!r} has lora_{other} but no lora_{need.upper()}")
    A, B = metas["a"].shape, metas["b"].shape
    if emb:
        kind = "embedding"
        features.add("embedding")
        if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
            raise LoraMigrateError(f"{where}: embedding module {module!r}: lora_embedding_A {list(A)}, "
                                   f"lora_embedding_B {list(B)} do not fit (r, vocab) / (dim, r)")
    elif experts:  # a ParamWrapper: E blocks of rank r (experts.py), r from the config
        kind = "experts"
        if len(A) != 2 or len(B) != 2 or A[0] != B[1] or "bias" in params:
            raise LoraMigrateError(f"{where}: {module}: lora_A {list(A)} / lora_B {list(B)}"
                                   f"{' with lora_B.bias' * ('bias' in params)} are not PEFT's stacked experts")
    elif len(A) == 2 and len(B) == 2:
        kind = "linear"
        if A[0] != B[1]:
            raise LoraMigrateError(f"{where}: module {module!r}: rank mismatch, lora_A {list(A)} vs lora_B {list(B)}")
    elif 3 <= len(A) <= 5 and len(B) == len(A):
        kind = "conv"
        features.add("conv")
        if any(d != 1 for d in B[2:]):
            raise LoraMigrateError(f"{where}: conv module {module!r}: lora_B {list(B)} must have a 1×… kernel")
        if B[1] != A[0]:
            raise UnsupportedFeature(f"{where}: conv module {module!r}: grouped conv LoRA (lora_B {list(B)} for "
                                     f"r={A[0]}) is not a plain product B·A")
    else:
        raise LoraMigrateError(f"{where}: module {module!r}: lora_A {list(A)} / lora_B {list(B)} have no LoRA shape")
    if "bias" in metas and tuple(metas["bias"].shape) != (B[0],):
        raise LoraMigrateError(f"{where}: module {module!r}: lora_B.bias {list(metas['bias'].shape)} for {B[0]} outputs")
    for p, m in metas.items():
        if not m.dtype.is_floating_point:
            raise LoraMigrateError(f"{where}: module {module!r}: tensor {m.key!r} has dtype {m.dtype}")
    r = int(A[0])
    if "patterns" in conv.features:
        r_cfg, alpha = module_r_alpha(matching, module, cfg.r, float(cfg.lora_alpha), cfg.rank_pattern,
                                      cfg.alpha_pattern)
    else:  # serving profiles: one global r and alpha (peft.md §7.3, §8.1)
        r_cfg, alpha = cfg.r, float(cfg.lora_alpha)
    if experts and r == r_cfg and module.endswith(".weight"):  # a 2-D parameter (a MoE router): a Linear's ΔW
        kind, module = "linear", module[:-len(".weight")]
    elif experts:
        if r % r_cfg:
            raise LoraMigrateError(f"{where}: {module}: lora_A has {r} rows, not a multiple of r={r_cfg}")
        E, r = r // r_cfg, r_cfg  # the entry holds the canonical shapes load() returns (experts.PeftAdapter)
        metas = {**metas, "a": canonical_meta(metas["a"], (E, r, A[1])),
                 "b": canonical_meta(metas["b"], (E, B[0], r))}
    if r_cfg != r and "patterns" in conv.features:
        raise LoraMigrateError(f"{where}: module {module!r} has rank {r} but the config gives r={r_cfg} "
                               f"(read as {conv.name}: {conv.pattern_matching} pattern matching)")
    # the scale uses the config's r: the tensor's own for PEFT (checked above), the global one for a server
    rule = Scaling.ALPHA_OVER_SQRT_R if cfg.use_rslora and "rslora" in conv.features else Scaling.ALPHA_OVER_R
    prov = ScaleProvenance(alpha=alpha, r=r_cfg, rule=f"{rule.value} ({kind})", convention=conv.name)
    return ModuleEntry(module=module, kind=kind, keys=dict(params), metas=metas, scale=rule.scale(alpha, r_cfg),
                       provenance=prov, alpha=alpha)


# ------------------------------------------------------------------------------------------------- writing


def tensor_param(kind: str, param: str) -> str:
    """The key template of a delta's tensor: embedding factors are PEFT's bare lora_embedding_A/B."""
    return "emb_" + param if kind == "embedding" and param in ("a", "b") else param


def write_peft(out_dir: Path, target: Convention, config: dict, tensors, planned, *, safetensors: bool = True,
               extras=None) -> list[str]:
    """Write one PEFT adapter folder: adapter_config.json (sorted keys, as PEFT writes it) and the weights,
    streamed in the planned order. ``tensors`` yields (key, tensor); ``planned`` is [(key, shape, dtype)]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / target.config_file).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    name = "adapter_model.safetensors" if safetensors else "adapter_model.bin"
    writer = SafetensorsWriter(out_dir / name, metadata={"format": "pt"}) if safetensors \
        else BinWriter(out_dir / name)
    with BackgroundWriter(writer) as w:
        for key, shape, dtype in planned:
            w.add(key, dtype, shape)
        w.write_header()
        for k, t in tensors:
            w.write(k, t)
    return []
