"""Planning and writing a kohya file from any canonical adapter.

Per output module: alpha = s·r written exactly (its dtype is the factors' when it holds s·r exactly, as
sd-scripts' save_weights casts it, else float32), the factors copied. Flux modules that are fused in BFL's model
(``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``) are fused back: compact rank r (one down, the ups stacked) when
the parts' A are bit-identical, else rank Σr with a block-diagonal up; a fused module has one alpha, so parts
with different scales get one common scale (the most common one) and the others' B is rescaled (a Step says so
with its rounding). A module no kohya name map holds is refused, unless ``--drop`` names it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from ...adapter import ScaleProvenance
from ...errors import LoraMigrateError, UnsupportedFeature
from ...execution import AdapterPlan, Execution, ModuleOut, Step, mode, rescale_steps
from ...io import SafetensorsWriter, safetensors_order
from ...schemas import Convention
from ...schemas import kohya as S
from ...source import json_number
from . import hashes as H
from . import names as N

PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


@dataclass
class OutModule:
    """One kohya module to write, and the canonical modules (in source order) it is made of."""

    name: str
    split: str | None = None
    parts: dict[int, str] = field(default_factory=dict)  # part index → canonical module present in the source
    n_parts: int = 1
    rows: list[int] = field(default_factory=list)  # rows of every part (missing parts: zeros)
    compact: bool = True
    r: int = 0
    in_shape: tuple = ()
    alpha: float = 0.0
    alpha_dtype: torch.dtype = torch.float32
    dtype: torch.dtype = torch.float32  # of the up (B) factor
    dtype_a: torch.dtype = torch.float32  # of the down (A) factor
    conv: bool = False
    part_ranks: list[int] = field(default_factory=list)  # block-diagonal: each part's rank (0: absent)

    def keys(self) -> tuple[str, str, str]:
        return (S.ALPHA_KEY.format(module=self.name), S.KEYS.key("a", self.name), S.KEYS.key("b", self.name))


def _grammar_ok(path: str, grammar: str) -> bool:
    return re.fullmatch(S.GRAMMARS[grammar], path) is not None


def locate(module: str, family: str | None, from_kohya: bool = False) -> tuple[str, int, int, str | None] | str:
    """(kohya module name, part index, number of parts, split) of a canonical module, or why it has none.
    ``from_kohya``: the source is a kohya file, whose layers every kohya loader treats as it did before."""
    comp, _, path = module.partition(".")
    if comp not in N.COMPONENT_PREFIX:
        return ("not an image-model layer (kohya holds U-Net, Flux transformer and text-encoder layers; for an "
                "adapter of one pipeline component saved without its prefix pass --component NAME)")
    if comp == "transformer":
        if family not in (None, "flux"):
            return f"a transformer module in a {family} adapter"
        fp = N.diffusers_to_flux(path)
        if fp is None:
            return "no Flux BFL module holds it"
        if fp.bfl.startswith(S.SDSCRIPTS_SKIPS_FLUX) and not from_kohya:
            return f"kohya name {N.underscored(fp.bfl)}: sd-scripts' Flux network never builds it (nor does " \
                   "diffusers' kohya loader), so it would be skipped without a word"
        return f"{S.UNET_PREFIX}_{N.underscored(fp.bfl)}", fp.index, len(fp.parts), fp.split
    if comp == "unet" and family is None:  # diffusers names: sd-scripts, diffusers and ComfyUI read them for both
        if not _grammar_ok(path, "unet_diffusers"):
            return "not a U-Net layer sd-scripts' network holds"
        return f"{S.UNET_PREFIX}_{N.underscored(path)}", 0, 1, None
    if family is None:
        return "the model family is unknown (keys and shapes cannot tell SD1 from SDXL): pass --model-type"
    spec = S.FAMILIES[family]
    if comp == "unet":
        if spec["denoiser"] != "unet" or not _grammar_ok(path, "unet_diffusers"):
            return f"not a {family} U-Net layer sd-scripts' network holds"
        name = path
        if spec["unet_names"] == "sai":
            name = N.diffusers_to_sai(path, spec["up_blocks_with_attentions"])
            if name is None:
                return "SAI (sgm) U-Net names have no place for it"
        return f"{S.UNET_PREFIX}_{N.underscored(name)}", 0, 1, None
    te = {c: p for p, c in spec["te"].items()}
    if comp in te:
        grammar = "t5" if (family == "flux" and comp == "text_encoder_2") else "clip"
        if grammar == "clip":
            path = "text_model." + path.removeprefix("text_model.")
        if not _grammar_ok(path, grammar):
            return f"not a {comp} layer sd-scripts' network holds"
        return f"{te[comp]}_{N.underscored(path)}", 0, 1, None
    return f"{family} has no component {comp!r} in kohya's key space"


def _family_from_widths(src) -> str | None:
    """SD1/SD2/SDXL from the U-Net's cross-attention width (attn2.to_k in-features), where it is a real model's."""
    ctx = {spec["context_dim"]: fam for fam, spec in S.FAMILIES.items() if "context_dim" in spec}
    for e in src.modules:
        if e.module.startswith("unet.") and e.module.endswith("attn2.to_k"):
            return ctx.get(e.metas["a"].shape[1])
    return None


def _dropped(module: str, drop: tuple[str, ...]) -> bool:
    return any(module == d or module.startswith(d + ".") or fnmatch.fnmatchcase(module, d) for d in drop)


def _alpha_dtype(alpha: float, dtype: torch.dtype) -> torch.dtype:
    """The factors' dtype when it holds alpha exactly (as save_weights writes it), else float32."""
    if dtype.is_floating_point and float(torch.tensor(alpha, dtype=dtype).double()) == alpha:
        return dtype
    return torch.float32


def plan_kohya(src, target: Convention, opts, steps: list[Step], output: str) -> Execution:
    family = opts.model_type or src.info.model_type
    if family is not None and family not in S.FAMILIES:
        raise LoraMigrateError(f"--model-type {family}: kohya knows {', '.join(S.FAMILIES)}")
    comps = {e.module.partition(".")[0] for e in src.modules}
    if family is None and "transformer" in comps:
        family = "flux"
    elif family is None and comps >= {"unet", "text_encoder_2"}:
        family = "sdxl"
    elif family is None:
        family = _family_from_widths(src)
    for e in src.modules:
        if e.kind not in ("linear", "conv") or set(e.keys) - {"a", "b"} or e.fused is not None:
            what = {"bias": "a LoRA bias (lora_B.bias)", "magnitude": "DoRA (lora_magnitude_vector)"}
            feat = next((what[k] for k in e.keys if k in what), f"a {e.kind} LoRA")
            raise UnsupportedFeature(f"{e.module}: kohya's LoRAModule has no {feat}; refusing rather than dropping")
    outs: dict[str, OutModule] = {}
    where: dict[str, tuple[str, int]] = {}
    dropped, refused = [], []
    for e in src.modules:
        loc = locate(e.module, family, src.convention.family == "kohya")
        if isinstance(loc, str):
            (dropped if _dropped(e.module, opts.drop) else refused).append((e.module, loc))
            continue
        name, idx, n, split = loc
        o = outs.setdefault(name, OutModule(name=name, split=split, n_parts=n))
        o.parts[idx] = e.module
        where[e.module] = (name, idx)
    if refused:
        m, why = refused[0]
        more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
        hint = "" if len(refused) == len(src.modules) else f"; pass --drop {m} to convert without it"
        raise UnsupportedFeature(f"{m}: kohya cannot hold it ({why}){more}{hint}")
    by_mod = {e.module: e for e in src.modules}
    src.modules[:] = sorted((by_mod[m] for m in where), key=lambda e: where[e.module])  # write order: names
    notes = [f"dropped (--drop): {m} ({why})" for m, why in dropped]
    lost = getattr(src, "missing_alpha", [])
    if lost:
        notes.append(f"{len(lost)} modules had no .alpha (e.g. {lost[0]}): written with alpha = r, the scale 1 "
                     "every kohya loader used for them")
    if family is None:
        notes.append("model family unknown: U-Net layers written with diffusers names (sd-scripts, diffusers and "
                     "ComfyUI read them for SD1 and SDXL); --model-type gives SAI names for SDXL and "
                     "ss_base_model_version")
    out: dict[str, ModuleOut] = {}
    for o in outs.values():
        _plan_module(o, [by_mod[o.parts[i]] for i in sorted(o.parts)], src, out, notes)
    unet = [(o.name, o.alpha, m) for o in outs.values() for m in o.parts.values() if m.startswith("unet.")]
    common = Counter(al for _, al, _ in unet).most_common(1)[0][0] if unet else None
    odd = [m for _, al, m in unet if al != common and m.endswith(S.DIFFUSERS_ALPHA_LOST)]
    if odd:
        notes.append(f"{len(odd)} U-Net attention modules keep their own alpha (≠ the most common {common:g}), e.g. "
                     f"{odd[0]}: exact for sd-scripts and ComfyUI; diffusers' kohya loader applies {common:g} to "
                     "them (finding alpha-diffusers-ignores) — for diffusers, convert to its own format")
    kind_of = {e.module: e.kind for e in src.modules}
    rescale_steps(steps, src, kind_of, out)
    steps.append(Step(rule="kohya_names", what=f"module paths → kohya names ({family or 'family from keys'}; "
                                               f"{len(outs)} kohya modules from {len(src.modules)})"))
    fused = [o for o in outs.values() if o.n_parts > 1]
    if fused:
        c = sum(o.compact for o in fused)
        steps.append(Step(rule="kohya_fuse", what=f"{len(fused)} Flux fused modules: {c} compact (A shared, ups "
                                                  f"stacked), {len(fused) - c} block-diagonal (rank Σr)"))
    metadata = _metadata(src, family, outs)
    st = {"modules": sorted(outs.values(), key=lambda o: o.name), "metadata": metadata, "family": family}
    plan = AdapterPlan(adapter=src.info.name, source_convention=src.convention.name, target_convention=target.name,
                       output=output, files=[output], modules=len(src.modules),
                       r=mode([o.r for o in outs.values()]) if outs else 0, alpha_in=src.info.alpha,
                       alpha_out=float(mode([o.alpha for o in outs.values()])) if outs else 0.0,
                       scales_in={k: e.scale for e in src.modules for k in [e.kind]},
                       scales_out={e.kind: out[e.module].scale for e in src.modules},
                       rescaled=sum(abs(e.scale / out[e.module].scale - 1) > 1e-12 for e in src.modules),
                       steps=steps, notes=notes)
    ex = Execution(plan=plan, source=src, target=target, out=out, codec_state=st)
    ex.tensors = [(o.name, "conv" if o.conv else "lora", p, s, dt) for o in st["modules"] for p, s, dt in _shapes(o)]
    return ex


def _plan_module(o: OutModule, parts, src, out: dict[str, ModuleOut], notes: list[str]) -> None:
    ma = [e.metas["a"] for e in parts]
    o.conv = parts[0].kind == "conv"
    o.in_shape = tuple(ma[0].shape[1:])
    o.dtype, o.dtype_a = parts[0].metas["b"].dtype, ma[0].dtype
    scales = [e.scale for e in parts]
    s = Counter(scales).most_common(1)[0][0]
    if s == 0 or not math.isfinite(s):
        raise UnsupportedFeature(f"{parts[0].module}: scale {s} cannot be written (kohya reads alpha 0 as alpha = r)")
    if o.n_parts == 1:
        o.rows, o.r = [parts[0].metas["b"].shape[0]], parts[0].rank
    else:
        o.rows = _part_rows(o, parts, notes)
        o.compact = src.init is None and _same_a(src, parts)
        o.r = parts[0].rank if o.compact else sum(e.rank for e in parts)
        ranks = {i: e.rank for i, e in zip(sorted(o.parts), parts)}
        o.part_ranks = [ranks.get(i, 0) for i in range(o.n_parts)]
        if len({e.metas["b"].dtype for e in parts} | {m.dtype for m in ma}) > 1:
            raise UnsupportedFeature(f"{o.name}: its parts have different dtypes; kohya fuses them into one tensor")
    o.alpha = s * o.r
    o.alpha_dtype = _alpha_dtype(o.alpha, o.dtype)
    if float(torch.tensor(o.alpha, dtype=o.alpha_dtype).double()) != o.alpha:
        notes.append(f"{o.name}: alpha {o.alpha!r} rounded to float32 (relative error ≤ 6e-8)")
    prov = ScaleProvenance(alpha=o.alpha, r=o.r, rule="alpha/r", convention="kohya")
    for e in parts:
        out[e.module] = ModuleOut(scale=s, provenance=prov, alpha=o.alpha, r=o.r)


def _part_rows(o: OutModule, parts, notes) -> list[int]:
    have = {i: e.metas["b"].shape[0] for i, e in zip(sorted(o.parts), parts)}
    hidden = parts[0].metas["a"].shape[1]
    if o.split == "equal":
        size = set(have.values())
        if len(size) != 1:
            raise UnsupportedFeature(f"{o.name}: q, k, v parts of different widths {sorted(size)}")
        return [size.pop()] * o.n_parts
    rows = [have.get(i, hidden) for i in range(3)]
    if any(r != hidden for r in rows):
        raise UnsupportedFeature(f"{o.name}: q/k/v widths {rows} differ from the layer's in-features {hidden}")
    if 3 not in have:
        mlp = int(hidden * S.FLUX_MLP_RATIO)
        notes.append(f"{o.name}: no proj_mlp in the source; its rows ({mlp} = {S.FLUX_MLP_RATIO:g} × {hidden}, "
                     f"Flux's mlp_ratio) are written as zeros")
        return rows + [mlp]
    return rows + [have[3]]


def _same_a(src, parts) -> bool:
    keys = {e.keys["a"] for e in parts}
    if len(keys) == 1:
        return True
    first = src.store.get(parts[0].keys["a"])
    return all(torch.equal(first, src.store.get(e.keys["a"])) for e in parts[1:])


def _shapes(o: OutModule):
    k_alpha, k_a, k_b = o.keys()
    rows = sum(o.rows)
    tail = (1, 1) if o.conv else ()
    return [(k_alpha, (), o.alpha_dtype), (k_a, (o.r, *o.in_shape), o.dtype_a), (k_b, (rows, o.r, *tail), o.dtype)]


def _metadata(src, family, outs: dict[str, OutModule]) -> dict[str, str]:
    native = src.info.config.get("metadata", {}) if src.convention.family == "kohya" else {}
    md = {k: v for k, v in native.items() if k not in S.HASH_KEYS}
    if family is not None:
        spec = S.FAMILIES[family]
        md.setdefault("ss_network_module", spec["network_module"])
        md.setdefault("ss_base_model_version", spec["base_model_version"])
        md.setdefault("ss_v2", str(spec["v2"]))
    lin = [o for o in outs.values() if not (o.conv and o.in_shape[1:] != (1, 1))]
    conv = [o for o in outs.values() if o.conv and o.in_shape[1:] != (1, 1)]
    if lin:
        md.setdefault("ss_network_dim", str(mode([o.r for o in lin])))
        md.setdefault("ss_network_alpha", str(float(mode([o.alpha for o in lin]))))
    if conv and "ss_network_args" not in md:
        md["ss_network_args"] = ('{"conv_dim": "%s", "conv_alpha": "%s"}'
                                 % (mode([o.r for o in conv]), json_number(mode([o.alpha for o in conv]))))
    blocks = {o.name: o.part_ranks for o in outs.values() if o.n_parts > 1 and not o.compact}
    if blocks:  # how to read each part back as its own block (sd-scripts ignores the key)
        md[S.FUSED_RANKS_KEY] = json.dumps(dict(sorted(blocks.items())), separators=(",", ":"))
    md.update(PLACEHOLDERS)
    return md


def fuse(o: OutModule, deltas) -> tuple[torch.Tensor, torch.Tensor]:
    """The kohya (down, up) of one output module from its parts' checked deltas (in part order)."""
    if o.n_parts == 1:
        d = deltas[0]
        B = d.B
        if o.split == "swap":
            h = B.shape[0] // 2
            B = torch.cat([B[h:], B[:h]])
        return d.A, B
    idx = sorted(o.parts)
    by = dict(zip(idx, deltas))
    first = deltas[0]
    if o.compact:  # the ups stacked (zero rows for a part the source lacks): one memcpy each
        if any(not torch.equal(first.A, d.A) for d in deltas[1:]):
            raise AssertionError(f"{o.name}: the parts' A differ after planning them shared")
        return first.A, torch.cat([by[i].B if i in by else torch.zeros(o.rows[i], o.r, dtype=o.dtype)
                                   for i in range(o.n_parts)])
    down = torch.cat([by[i].A for i in idx])
    blocks, c = [], 0  # block-diagonal: part i's B in its rows and its own rank columns
    for i in range(o.n_parts):
        r = by[i].A.shape[0] if i in by else 0
        row = torch.zeros(o.rows[i], o.r, dtype=o.dtype)
        if i in by:
            row[:, c:c + r] = by[i].B
        blocks.append(row)
        c += r
    return down, torch.cat(blocks)


def write_kohya(ex: Execution, dest, deltas) -> list[str]:
    st = ex.codec_state
    plan = [(k, dt, s) for o in st["modules"] for k, s, dt in _shapes(o)]
    in_order = [k for k, _, _ in plan] == safetensors_order((k, dt) for k, dt, _ in plan)
    sink = H.HashSink(H.ss_header(st["metadata"], plan), background=in_order)  # overlaps reading the next module
    with SafetensorsWriter(dest, st["metadata"]) as w:
        for k, dt, s in plan:
            w.add(k, dt, s)
        w.write_header()
        it = iter(deltas)
        for o in st["modules"]:
            got = [next(it) for _ in o.parts]
            down, up = fuse(o, got)
            alpha = torch.tensor(o.alpha, dtype=o.alpha_dtype)
            for key, t in zip(o.keys(), (alpha, down.contiguous(), up.contiguous())):
                w.write(key, t)
                if in_order:
                    sink.update(H.raw(t))
            del got, down, up
    if not in_order:  # mixed dtypes: hash the written tensors again in safetensors' order
        sink = _rehash(dest, st["metadata"], plan)
    model, legacy = sink.hexdigests()
    H.patch_header(dest, PLACEHOLDERS, {"sshs_model_hash": model, "sshs_legacy_hash": legacy})
    return [f"sshs_model_hash {model[:12]}…, sshs_legacy_hash {legacy} (as sd-scripts computes them)"]


def _rehash(dest, metadata, plan) -> H.HashSink:
    from ...io import open_tensors

    sink = H.HashSink(H.ss_header(metadata, plan))
    with open_tensors(dest) as tf:
        for k in safetensors_order((k, dt) for k, dt, _ in plan):
            for chunk in tf.stream(k):
                sink.update(chunk)
    return sink
