"""Reading the diffusers LoRA file: keys → modules, ``lora_adapter_metadata`` → per-module (r, alpha), as each
diffusers era's loader computes them (schemas/diffusers.py says what changed when)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...adapter import AdapterInfo, ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...io import open_tensors
from ...io.safetensors_reader import read_safetensors_header
from ...schemas import Convention
from ...schemas.base import Scaling
from ...schemas.diffusers import (ALPHA_IS_R_SINCE, BIAS_SUFFIX, COMPONENTS, LYCORIS_DORA, MAGNITUDE_SUFFIXES,
                                  METADATA_KEY, METADATA_SINCE, OLD_PROCESSOR, REFUSED_FIELDS, SPELLINGS, TEXT_ENCODERS,
                                  TEXT_MODEL, TEXT_MODEL_CHILDREN, WEIGHTS, WEIGHTS_BIN)
from ...source import ModuleEntry, SourceAdapter, TensorStore
from ..peft.format import module_r_alpha  # PEFT's own pattern matching (the regex era, as diffusers loads)

# LoraConfig defaults (PEFT) for the fields the loader reads from a metadata block
_DEFAULT_R, _DEFAULT_ALPHA = 8, 8


def weights_file(path: Path) -> Path | None:
    """The diffusers weights file of ``path`` (a folder holding it, or a .safetensors/.bin file), else None."""
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return None
        return next((path / w for w in (WEIGHTS, WEIGHTS_BIN) if (path / w).is_file()), None)
    return path if path.is_file() and path.suffix in (".safetensors", ".bin") else None


def canonical(component: str, rel: str) -> str:
    """The canonical module name: component prefix + diffusers module path, CLIP paths with ``text_model.``."""
    if component in TEXT_ENCODERS and rel.startswith(TEXT_MODEL_CHILDREN):
        rel = TEXT_MODEL + rel
    return f"{component}.{rel}"


def place_in_component(a: SourceAdapter, component: str) -> None:
    """``--component``: every module of ``a`` (an adapter of one pipeline component saved without its prefix, e.g.
    PEFT's ``get_peft_model(unet, cfg).save_pretrained``) gets the canonical name of ``component`` (CLIP paths with
    ``text_model.``, as the diffusers and kohya readers name them); refused for an unknown component and for a
    source whose modules name their component already (rather than guess which are meant)."""
    if component not in COMPONENTS:
        raise LoraMigrateError(f"--component {component}: one of {', '.join(COMPONENTS)}")
    named = next((e.module for e in a.modules if e.module.partition(".")[0] in COMPONENTS), None)
    if named is not None:
        raise LoraMigrateError(f"{a.info.name}: --component {component}, but module {named!r} names its pipeline "
                               "component already; --component is for an adapter of one component saved without "
                               "the prefix")
    for e in a.modules:
        e.module = canonical(component, e.module)
    a.info.components = (component,)


def pattern_name(module: str) -> tuple[str, str]:
    """(component, path PEFT matches patterns and targets against): CLIP paths without ``text_model.``, whose
    presence depends on the transformers version (a suffix match finds the module either way)."""
    comp, _, rel = module.partition(".")
    return comp, rel.removeprefix(TEXT_MODEL) if comp in TEXT_ENCODERS else rel


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, relative module path, spelling, "a"/"b"/"magnitude") of a LoRA key, or None."""
    comp, _, rest = key.partition(".")
    if comp not in COMPONENTS:
        return None
    for suf in MAGNITUDE_SUFFIXES:
        if rest.endswith(suf) and len(rest) > len(suf):
            return comp, rest[: -len(suf)], "", "magnitude"
    m = _OLD_RX.match(rest)
    if m:
        to, te = OLD_PROCESSOR[m.group("proc")]
        return comp, f"{m.group('path')}.{te if comp in TEXT_ENCODERS else to}", "processor", \
            "a" if m.group("p") == "down" else "b"
    for spelling, sa, sb in SPELLINGS:
        for p, suf in (("a", sa), ("b", sb)):
            if rest.endswith(suf) and len(rest) > len(suf):
                return comp, rest[: -len(suf)], spelling, p
    return None


_OLD_RX = re.compile(rf"^(?P<path>.+?)(\.processor)?\.(?P<proc>{'|'.join(OLD_PROCESSOR)})\.(?P<p>down|up)\.weight$")


def claims_keys(keys) -> bool:
    """Every key is a diffusers LoRA key (or one this codec refuses by name: dora_scale, lora bias), and some are
    LoRA."""
    lora = 0
    for k in keys:
        if split_key(k):
            lora += 1
        elif not (k.partition(".")[0] in COMPONENTS and k.endswith((LYCORIS_DORA, BIAS_SUFFIX))):
            return False
    return lora > 0


def header(path: Path) -> tuple[list[str], dict]:
    """Tensor keys and header metadata, without reading tensor data."""
    if path.suffix == ".bin":
        with open_tensors(path) as tf:
            return list(tf.keys()), {}
    metas, metadata = read_safetensors_header(path, path.stat().st_size)
    return list(metas), dict(metadata or {})


@dataclass
class Parsed:
    """A diffusers file, read from its header: modules, their spellings, the metadata per component."""

    path: Path
    store: TensorStore
    modules: dict[str, dict[str, str]]  # canonical module → "a"/"b" → key
    rel: dict[str, str]  # canonical module → its path in the file, relative to the component
    spelling: dict[str, str]  # canonical module → spelling
    metadata: dict[str, dict] | None  # component → its LoraConfig dict; None: no lora_adapter_metadata key
    first_spelling: dict[str, str] = field(default_factory=dict)  # component → spelling of its first key


def parse(path: Path) -> Parsed:
    weights = weights_file(path)
    if weights is None:
        raise LoraMigrateError(f"{path}: no {WEIGHTS} or {WEIGHTS_BIN} (diffusers LoRA)")
    store = TensorStore()
    try:
        tf = store.add(weights)
        raw_meta = dict(tf.metadata or {})
        modules: dict[str, dict[str, str]] = {}
        rel, spelling, first = {}, {}, {}
        for k in sorted(store.keys()):  # the loaders see load_file's dict: keys in name order
            s = split_key(k)
            if s is None:
                if k.endswith(LYCORIS_DORA):
                    raise UnsupportedFeature(f"{weights}: {k!r}: LyCORIS DoRA (dora_scale), which every diffusers "
                                             "pipeline loader drops with a warning (it loads as plain LoRA)")
                if k.endswith(BIAS_SUFFIX):
                    raise UnsupportedFeature(f"{weights}: {k!r}: {REFUSED_FIELDS['lora_bias']}")
                raise LoraMigrateError(f"{weights}: tensor key {k!r} is not a diffusers LoRA key "
                                       f"(<{'|'.join(COMPONENTS)}>.<module>.lora_A.weight / lora_B.weight)")
            comp, r, sp, p = s
            m = canonical(comp, r)
            if p == "magnitude":
                modules.setdefault(m, {})[p] = k
                continue
            first.setdefault(comp, sp)
            if m in spelling and spelling[m] != sp:
                raise LoraMigrateError(f"{weights}: module {m!r} has tensors in two spellings ({spelling[m]}, {sp})")
            if p in modules.setdefault(m, {}):
                raise LoraMigrateError(f"{weights}: module {m!r} has two lora_{p.upper()} tensors "
                                       f"({modules[m][p]!r}, {k!r})")
            modules[m][p], rel[m], spelling[m] = k, r, sp
        metadata = None
        if METADATA_KEY in raw_meta:
            try:
                flat = json.loads(raw_meta[METADATA_KEY])
            except ValueError as e:
                raise LoraMigrateError(f"{weights}: header {METADATA_KEY!r} is not JSON: {e}") from None
            if not isinstance(flat, dict):
                raise LoraMigrateError(f"{weights}: header {METADATA_KEY!r} is not a JSON object")
            metadata = {}
            for k, v in flat.items():
                comp, _, f = k.partition(".")
                metadata.setdefault(comp, {})[f] = v
    except BaseException:
        store.close()
        raise
    if not modules:
        store.close()
        raise LoraMigrateError(f"{weights}: holds no LoRA tensors")
    return Parsed(weights, store, modules, rel, spelling, metadata, first)


def reads_metadata(conv: Convention) -> bool:
    """Whether every release of ``conv`` reads ``lora_adapter_metadata`` (diffusers ≥ 0.34)."""
    return conv.releases_with(METADATA_SINCE) == "all"


def no_metadata_alpha_is_r(conv: Convention) -> bool:
    """≥ 0.40 (#14409): without metadata every module gets alpha = r; before, alpha = the first module's rank."""
    return conv.releases_with(ALPHA_IS_R_SINCE) == "all"


_TE_ORDER = {n: i for i, n in enumerate(("k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"))}
_TE_RANKED = tuple("." + n for n in _TE_ORDER)


def _model_order(module: str):
    """CLIP ``named_modules()`` order (layers by number; k, v, q, out_proj, fc1, fc2): the text encoder loader
    takes its ranks in that order."""
    parts = re.split(r"(\d+)", module)
    key = [int(p) if p.isdigit() else p for p in parts]
    return key[:-1] + [_TE_ORDER.get(module.rsplit(".", 1)[-1], 99), key[-1]]


def first_rank(comp: str, mods: list[str], rank_of) -> int | None:
    """The rank a < 0.40 loader without metadata takes as lora_alpha for a whole component: its first lora_B's
    (the unet/transformer state dict in name order; a text encoder's attention/MLP modules in model order)."""
    if comp in TEXT_ENCODERS:
        ranked = sorted((m for m in mods if m.endswith(_TE_RANKED)), key=_model_order)
    else:
        ranked = sorted(mods, key=lambda m: m + ".lora_B")
    return rank_of(ranked[0]) if ranked else None


def module_scales(p: Parsed, conv: Convention, ranks: dict[str, int], where: str) -> dict[str, tuple]:
    """Per canonical module: (r, alpha, rule) as ``conv``'s loader computes them (rule: Scaling)."""
    out = {}
    use_meta = p.metadata is not None and reads_metadata(conv)
    by_comp: dict[str, list[str]] = {}
    for m in p.modules:
        by_comp.setdefault(m.partition(".")[0], []).append(m)
    for comp, mods in by_comp.items():
        if use_meta:
            cfg = p.metadata.get(comp)
            if cfg is None:
                raise LoraMigrateError(f"{where}: {METADATA_KEY} has no entries for {comp!r}, whose alphas are "
                                       "then unknown: diffusers builds LoraConfig() for it and fails (\"Please "
                                       "specify `target_modules`\", 0.42.1)")
            for f, why in REFUSED_FIELDS.items():
                if cfg.get(f) not in (None, False, [], {}):
                    raise UnsupportedFeature(f"{where}: {comp}.{f}={cfg[f]!r}: {why}")
            r0, a0 = cfg.get("r", _DEFAULT_R), float(cfg.get("lora_alpha", _DEFAULT_ALPHA))
            rule = Scaling.ALPHA_OVER_SQRT_R if cfg.get("use_rslora") else Scaling.ALPHA_OVER_R
            for m in mods:
                name = p.rel[m]
                r, a = module_r_alpha(conv.pattern_matching or "regex", name, r0, a0, cfg.get("rank_pattern") or {},
                                      cfg.get("alpha_pattern") or {})
                if r != ranks[m]:
                    raise LoraMigrateError(f"{where}: module {m!r} has rank {ranks[m]} but {METADATA_KEY} gives "
                                           f"r={r} (diffusers fails to load it: size mismatch)")
                out[m] = (r, float(a), rule)
        elif no_metadata_alpha_is_r(conv):
            for m in mods:
                out[m] = (ranks[m], float(ranks[m]), Scaling.ALPHA_OVER_R)
        else:
            a = first_rank(comp, mods, ranks.get)
            for m in mods:
                out[m] = (ranks[m], float(a if a is not None else ranks[m]), Scaling.ALPHA_OVER_R)
    return out


def to_source(p: Parsed, conv: Convention, name: str) -> SourceAdapter:
    """The canonical adapter ``conv`` reads from ``p``."""
    where = str(p.path)
    entries, ranks, metas = [], {}, {}
    for m, keys in p.modules.items():
        for need in ("a", "b"):
            if need not in keys:
                other = "lora_A" if need == "b" else "lora_B"
                raise LoraMigrateError(f"{where}: module {m!r} has {other} but no {'lora_' + need.upper()}")
        metas[m] = {q: p.store.meta(k) for q, k in keys.items()}
        A, B = metas[m]["a"].shape, metas[m]["b"].shape
        if not (len(A) == len(B) and len(A) in (2, 4) and A[0] == B[1] and all(d == 1 for d in B[2:])):
            raise LoraMigrateError(f"{where}: module {m!r}: lora_A {list(A)} / lora_B {list(B)} are not a LoRA pair")
        for q, t in metas[m].items():
            if not t.dtype.is_floating_point:
                raise LoraMigrateError(f"{where}: module {m!r}: tensor {t.key!r} has dtype {t.dtype}")
        ranks[m] = int(A[0])
    scales = module_scales(p, conv, ranks, where)
    features: set[str] = set()
    notes = _dora(p, conv, metas, where, features)
    for m, keys in p.modules.items():
        r, a, rule = scales[m]
        kind = "conv" if len(metas[m]["a"].shape) == 4 else "linear"
        if kind == "conv":
            features.add("conv")
        if rule is Scaling.ALPHA_OVER_SQRT_R:
            features.add("rslora")
        prov = ScaleProvenance(alpha=a, r=r, rule=f"{rule.value} ({kind})", convention=conv.name)
        keys = {q: k for q, k in keys.items() if q in metas[m]}
        entries.append(ModuleEntry(module=m, kind=kind, keys=keys, metas=metas[m], scale=rule.scale(a, r),
                                   provenance=prov, alpha=a))
    md = p.metadata or {}
    if any(c.get("rank_pattern") or c.get("alpha_pattern") for c in md.values()):
        features.add("patterns")
    comps = tuple(c for c in COMPONENTS if any(m.startswith(c + ".") for m in p.modules))
    r_all, a_all = {e.rank for e in entries}, {e.alpha for e in entries}  # one r / alpha only where all share it
    info = AdapterInfo(name=name, convention=conv.name, r=r_all.pop() if len(r_all) == 1 else None,
                       alpha=a_all.pop() if len(a_all) == 1 else None, config=md, components=comps,
                       model_type=guess_model_type(p, metas))
    return SourceAdapter(info=info, convention=conv, store=p.store, modules=entries, files=[p.path],
                         features=features, notes=notes)


def _dora(p: Parsed, conv: Convention, metas: dict, where: str, features: set) -> list[str]:
    """Which components the loader runs as DoRA (metadata ``use_dora``; without metadata, any magnitude key):
    their modules must all have a magnitude of B's output size; others' magnitudes are left out (ignored)."""
    notes = []
    use_meta = p.metadata is not None and reads_metadata(conv)
    for comp in {m.partition(".")[0] for m in p.modules}:
        mods = [m for m in p.modules if m.startswith(comp + ".")]
        have = [m for m in mods if "magnitude" in metas[m]]
        on = bool((p.metadata.get(comp) or {}).get("use_dora")) if use_meta else bool(have)
        if not on:
            if have:
                notes.append(f"{comp}: {len(have)} lora_magnitude_vector tensors left out: use_dora is false, so "
                             "diffusers does not load them")
            for m in have:
                metas[m].pop("magnitude")
            continue
        features.add("dora")
        for m in mods:
            if "magnitude" not in metas[m]:
                raise LoraMigrateError(f"{where}: {comp} is DoRA (use_dora) but module {m!r} has no "
                                       "lora_magnitude_vector")
            if metas[m]["magnitude"].shape and math.prod(metas[m]["magnitude"].shape) != metas[m]["b"].shape[0]:
                raise LoraMigrateError(f"{where}: module {m!r}: lora_magnitude_vector "
                                       f"{list(metas[m]['magnitude'].shape)} for {metas[m]['b'].shape[0]} outputs")
    return notes


def guess_model_type(p: Parsed, metas) -> str | None:
    """sd1 / sd2 / sdxl / flux from module names and shapes (None: the keys cannot tell; --model-type)."""
    mods = list(p.modules)
    comps = {m.partition(".")[0] for m in mods}
    if "transformer" in comps:
        flux = any(".single_transformer_blocks." in m or ".attn.add_q_proj" in m or ".norm1_context." in m
                   for m in mods)
        return "flux" if flux else None
    if "text_encoder_2" in comps or any(m.startswith("unet.add_embedding.") for m in mods):
        return "sdxl"
    ctx = {metas[m]["a"].shape[1] for m in mods if m.startswith("unet.") and m.endswith(".attn2.to_k")}
    if ctx & {768}:
        return "sd1"
    if ctx & {1024}:
        return "sd2"
    if ctx & {2048}:
        return "sdxl"
    if any(m.startswith("unet.down_blocks.0.attentions.") for m in mods):
        return "sd1"  # SDXL's first down block has no attention
    return None
