"""Reading a kohya file into the canonical form: names through the grammars and maps, Flux fused modules split by
rows (A shared), scale = alpha/r per module (no ``.alpha``, or 0: scale 1, as sd-scripts reads it)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...adapter import AdapterInfo, ModuleDelta, ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...io import TensorMeta
from ...schemas import Convention
from ...schemas import kohya as S
from ...source import ModuleEntry, Source, SourceAdapter, TensorStore
from . import names as N

TE_PREFIXES = ("lora_te1", "lora_te2", "lora_te3", "lora_te")
PREFIXES = (S.UNET_PREFIX, *TE_PREFIXES)


def split_key(key: str) -> tuple[str, str] | None:
    """(kohya module name, suffix) of a key, or None when it is not in the kohya key space."""
    name, dot, rest = key.partition(".")
    if not dot or not name.startswith(tuple(p + "_" for p in PREFIXES)):
        return None
    return name, "." + rest


def prefix_of(name: str) -> tuple[str, str]:
    for p in PREFIXES:
        if name.startswith(p + "_"):
            return p, name[len(p) + 1:]
    raise AssertionError(name)


def refuse_lycoris(keys) -> None:
    """LyCORIS algorithms in the kohya key space: one line naming the algorithm and why."""
    for k in keys:
        for suffix, feature, why in S.LYCORIS:
            if k.endswith(suffix):
                raise UnsupportedFeature(f"{k}: {feature} (LyCORIS) cannot be converted exactly: {why}")


@dataclass
class Part:
    """A canonical module that is a row block of a fused kohya module's up (B)."""

    rows: tuple[int, int]
    swap: bool = False  # (shift, scale) halves exchanged
    cols: tuple[int, int] | None = None  # block-diagonal up: this part's rank columns (and rows of the down)


@dataclass
class KohyaAdapter(SourceAdapter):
    parts: dict[str, Part] = field(default_factory=dict)  # canonical module → its rows of the fused B
    missing_alpha: list[str] = field(default_factory=list)  # kohya module names without .alpha (or alpha 0)
    naming: dict[str, str] = field(default_factory=dict)  # component → "diffusers" | "sai" | "bfl" | "clip" | …
    kohya_names: dict[str, str] = field(default_factory=dict)  # canonical module → kohya module name
    _cache: dict = field(default_factory=dict)

    def _get(self, key: str):
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.clear()
            self._cache[key] = self.store.get(key)
        return self._cache[key]

    def load(self, e: ModuleEntry) -> ModuleDelta:
        part = self.parts.get(e.module)
        if part is None:
            return super().load(e)
        A, B = self._get(e.keys["a"]), self._get(e.keys["b"])
        B = B[part.rows[0]:part.rows[1]]
        if part.cols is not None:  # its own block, when every column outside it is zero (as written), else all
            c0, c1 = part.cols
            if not (B[:, :c0].any() or B[:, c1:].any()):
                A, B = A[c0:c1], B[:, c0:c1]
        if part.swap:
            h = B.shape[0] // 2
            B = torch.cat([B[h:], B[:h]])
        return ModuleDelta(module=e.module, A=A, B=B.contiguous(), scale=e.scale, provenance=e.provenance,
                           kind="conv" if e.kind == "conv" else "lora")


    def stored_as_is(self, e: ModuleEntry) -> bool:
        """A module that is a row block of a fused up is not stored as it loads."""
        return e.module not in self.parts


def detect_family(names: dict[str, dict], store: TensorStore, metadata: dict) -> tuple[str | None, str]:
    """(model type, why) from prefixes, U-Net naming, ss_base_model_version and widths; None when nothing tells."""
    prefixes = Counter(prefix_of(n)[0] for n in names)
    if any(N.dotted(prefix_of(n)[1], "flux_bfl") for n in names if n.startswith(S.UNET_PREFIX + "_")) \
            or prefixes["lora_te3"]:
        return "flux", "Flux BFL block names (double_blocks/single_blocks/…)"
    if prefixes["lora_te1"] or prefixes["lora_te2"]:
        return "sdxl", "two text encoders (lora_te1_/lora_te2_)"
    if prefixes["lora_te"]:
        width = _te_width(names, store, "lora_te")
        return ("sd2", "one text encoder of width 1024") if width == 1024 else \
            ("sd1", "one text encoder (lora_te_)")
    version = (metadata or {}).get("ss_base_model_version", "")
    for fam, spec in S.FAMILIES.items():
        if version and version == spec["base_model_version"]:
            return fam, f"ss_base_model_version {version}"
    ctx = {spec["context_dim"]: fam for fam, spec in S.FAMILIES.items() if "context_dim" in spec}
    for n, k in names.items():
        if n.endswith("attn2_to_k") and "a" in k:
            width = store.meta(k["a"]).shape[1]
            if width in ctx:
                return ctx[width], f"cross-attention width {width}"
    return None, "U-Net only, and neither names, metadata nor widths tell SD1 from SDXL"


def _te_width(names, store, prefix) -> int | None:
    for n, k in names.items():
        if n.startswith(prefix + "_") and n.endswith("q_proj") and "a" in k:
            return store.meta(k["a"]).shape[1]
    return None


def canonical(name: str) -> tuple[str, tuple[str, ...], str | None, str]:
    """(component, canonical paths, split, naming) of a kohya module name; refused when no grammar reads it."""
    prefix, rest = prefix_of(name)
    if prefix == S.UNET_PREFIX:
        for grammar, comp in (("flux_bfl", "transformer"), ("unet_diffusers", "unet"), ("unet_sai", "unet")):
            path = N.dotted(rest, grammar)
            if path is None:
                continue
            if grammar == "flux_bfl":
                mapped = N.flux_to_diffusers(path)
                if mapped is None:
                    break
                return comp, tuple(f"transformer.{p}" for p in mapped[0]), mapped[1], "bfl"
            if grammar == "unet_sai":
                return comp, (f"unet.{N.sai_to_diffusers(path)}",), None, "sai"
            return comp, (f"unet.{path}",), None, "diffusers"
    else:
        comp = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                "lora_te3": "text_encoder_2"}[prefix]
        grammar = "t5" if prefix == "lora_te3" else "clip"
        path = N.dotted(rest, grammar)
        if path is not None:
            if grammar == "clip" and not path.startswith("text_model."):
                path = "text_model." + path  # written with transformers 5 (no text_model level)
            return comp, (f"{comp}.{path}",), None, grammar
    raise LoraMigrateError(f"{name}: not a module path sd-scripts writes (no kohya name map reads it)")


def read_kohya(path: Path, convention: Convention, name: str | None = None) -> KohyaAdapter:
    store = TensorStore()
    tf = store.add(path)
    try:
        return _read(path, store, tf.metadata or {}, convention, name or path.stem)
    except BaseException:
        store.close()
        raise


def _read(path: Path, store: TensorStore, metadata: dict, convention: Convention, name: str) -> KohyaAdapter:
    keys = store.keys()
    refuse_lycoris(keys)
    names: dict[str, dict[str, str]] = {}
    for k in keys:
        sk = split_key(k)
        if sk is None:
            raise LoraMigrateError(f"{path}: tensor {k!r} is not in the kohya key space (lora_unet_/lora_te*_)")
        mod, suffix = sk
        param = {v: p for p, v in S.SUFFIXES.items()}.get(suffix)
        if param is None:
            raise LoraMigrateError(f"{path}: tensor {k!r}: unknown kohya key suffix {suffix!r}")
        names.setdefault(mod, {})[param] = k
    family, why = detect_family(names, store, metadata)
    a = KohyaAdapter(info=AdapterInfo(name=name, convention=convention.name, model_type=family,
                                      config={"metadata": dict(metadata), "family_why": why}),
                     convention=convention, store=store, modules=[], files=[path])
    comps = set()
    fused_ranks = _fused_ranks(metadata)
    for mod in sorted(names):
        k = names[mod]
        if "a" not in k or "b" not in k:
            raise LoraMigrateError(f"{path}: module {mod} has no {'lora_down' if 'a' not in k else 'lora_up'}")
        ma, mb = store.meta(k["a"]), store.meta(k["b"])
        r = ma.shape[0]
        if mb.shape[1] != r or len(ma.shape) not in (2, 4) or len(mb.shape) != len(ma.shape):
            raise LoraMigrateError(f"{path}: module {mod}: lora_down {list(ma.shape)} and lora_up "
                                   f"{list(mb.shape)} are not a rank-{r} pair")
        alpha = None
        if "alpha" in k:
            at = store.get(k["alpha"])
            if at.numel() != 1:
                raise LoraMigrateError(f"{path}: {k['alpha']} has shape {list(at.shape)}, not a scalar")
            alpha = float(at.float().item())
        if not alpha:  # missing or 0: alpha = r (sd-scripts LoRAModule / create_network_from_weights)
            a.missing_alpha.append(mod)
            prov = ScaleProvenance(alpha=None, r=r, rule="1.0 (no .alpha: alpha = r)", convention=convention.name)
            scale = 1.0
        else:
            prov = ScaleProvenance(alpha=alpha, r=r, rule="alpha/r", convention=convention.name)
            scale = alpha / r
        comp, paths, split, naming = canonical(mod)
        comps.add(comp)
        a.naming[comp] = naming
        kind = "conv" if len(ma.shape) == 4 else "linear"
        metas = {"a": ma, "b": mb}
        rows = [(0, mb.shape[0])]
        if split in ("equal", "qkv_mlp"):
            try:
                rows = N.split_rows(split, mb.shape[0], ma.shape[1], len(paths))
            except ValueError as e:
                raise LoraMigrateError(f"{path}: module {mod}: {e}") from None
        cols = _block_columns(fused_ranks.get(mod), len(paths), r)
        for i, (p, (r0, r1)) in enumerate(zip(paths, rows, strict=True)):
            if len(paths) > 1 or split == "swap":
                c = cols[i] if cols else None
                ra = c[1] - c[0] if c else r
                metas = {"a": _meta(ma, (ra, *ma.shape[1:])), "b": _meta(mb, (r1 - r0, ra, *mb.shape[2:]))}
                a.parts[p] = Part(rows=(r0, r1), swap=split == "swap", cols=c)
            a.kohya_names[p] = mod
            a.modules.append(ModuleEntry(module=p, kind=kind, keys={"a": k["a"], "b": k["b"]}, metas=metas,
                                         scale=scale, provenance=prov, alpha=alpha))
    a.info.components = tuple(c for c in ("unet", "transformer", "text_encoder", "text_encoder_2") if c in comps)
    ranks = Counter(e.rank for e in a.modules)
    a.info.r = ranks.most_common(1)[0][0] if ranks else None
    alphas = Counter(e.alpha for e in a.modules if e.alpha is not None)
    a.info.alpha = alphas.most_common(1)[0][0] if alphas else None
    return a


def _meta(m: TensorMeta, shape: tuple) -> TensorMeta:
    n = 1
    for d in shape:
        n *= d
    return TensorMeta(key=m.key, shape=tuple(shape), dtype=m.dtype, nbytes=n * m.dtype.itemsize)


def _fused_ranks(metadata: dict) -> dict:
    """{kohya module: [rank of each part]} this package wrote for its block-diagonal fused modules."""
    try:
        v = json.loads(metadata.get(S.FUSED_RANKS_KEY, "{}"))
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def _block_columns(ranks, n: int, r: int) -> list[tuple[int, int]] | None:
    """Each part's rank columns of a block-diagonal up, from the recorded ranks (when they add up; a part
    without rank keeps the whole module, whose rows of the up are zero)."""
    if not (isinstance(ranks, list) and len(ranks) == n and all(isinstance(x, int) and x >= 0 for x in ranks)
            and sum(ranks) == r):
        return None
    out, c = [], 0
    for x in ranks:
        out.append((c, c + x) if x else None)
        c += x
    return out


def open_source(path: Path, convention: Convention) -> Source:
    a = read_kohya(path, convention)
    return Source(path=path, convention=convention, layout="adapter", adapters=[a],
                  reasons=[f"kohya key space ({len(a.modules)} modules); family {a.info.model_type or 'unknown'}: "
                           f"{a.info.config['family_why']}"])
