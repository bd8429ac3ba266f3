"""The mlx-lm codec: ``adapters.safetensors`` + ``adapter_config.json`` (schema: :mod:`lora_migrate.schemas.mlx_lm`).

Reading: ``lora_a`` (in, r) and ``lora_b`` (r, out) are transposed into A (r, in), B (out, r); the scale each era
applies (absolute ``scale``, or ``scale·alpha/rank`` before 0.14.2) is kept apart. Writing: one rank (zero-padded),
one absolute scale (other modules' scales folded into B), ``keys`` + ``num_layers`` that select exactly the
adapted modules, or a refusal saying why.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...adapter import AdapterInfo, ModuleDelta, ScaleProvenance
from ...errors import DetectionError, LoraMigrateError, UnsupportedFeature, VerificationFailed
from ...execution import Step
from ...findings import Finding
from ...io import BackgroundWriter, SafetensorsWriter
from ...schemas import Convention, get_convention
from ...schemas import mlx_lm as S
from ...source import ModuleEntry, Source, TensorStore, base_model_config, read_json
from ..base import Claim, Codec, PlanOptions
from . import moe
from .loaded import as_loaded
from ..shared import (Blocks, StoredSource, canonical_meta, execution, layer_count, model_type_of, one_rank_one_scale,
                      refuse_fused)


def _config(path: Path) -> dict | None:
    try:
        raw = json.loads((path / S.CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def eras_for(cfg: dict) -> tuple[list[Convention], list[str]]:
    """The eras that can have written ``cfg`` and read it the same way, with the evidence."""
    lp = cfg.get("lora_parameters") or {}
    dated = [f for f in S.DATED_FIELDS if f in cfg]
    alpha, rank = lp.get("alpha"), lp.get("rank")
    later = [get_convention("mlx-lm-2024-06"), get_convention("mlx-lm")]
    if dated:
        newest = max(dated, key=lambda f: S.DATED_FIELDS[f])
        why = f"field {newest!r} dates it to mlx-lm ≥ {S.DATED_FIELDS[newest]} (scale absolute)"
        return [later[1]] if alpha is None else later[:1], [why]
    if alpha is None or alpha == rank:
        return [later[1]], ["no alpha, or alpha = rank: every era reads scale·(1) = scale" if alpha is not None
                            else "no alpha in lora_parameters: scale is the effective scale in every era that loads it"]
    return [get_convention("mlx-lm-2024-03"), later[0]], [
        f"lora_parameters has alpha={alpha} ≠ rank={rank} and no field that dates it: mlx-lm 0.2.0–0.14.1 applies "
        f"scale·alpha/rank, 0.14.2 and later scale alone"]


class MlxLmCodec(Codec):
    id = S.FAMILY
    display = "an mlx-lm"
    output = "folder"

    # ------------------------------------------------------------------------------------------------ reading

    def claim(self, path: Path) -> Claim | None:
        folder = path.parent if path.is_file() else path
        if path.is_file() and path.name != S.WEIGHTS:
            return None
        cfg = _config(folder) if (folder / S.WEIGHTS).is_file() else None
        if cfg is None or not isinstance(cfg.get("lora_parameters"), dict) and cfg.get("fine_tune_type") is None:
            return None
        return Claim(why=f"{S.CONFIG} with lora_parameters (mlx_lm lora's args dict) and {S.WEIGHTS}", strength=2)

    def open(self, path: Path, from_: Convention | None) -> Source:
        folder = path.parent if path.is_file() else path
        cfg = read_json(folder / S.CONFIG)
        if cfg.get("fine_tune_type") == "full":
            raise UnsupportedFeature(f"{folder}: {S.REFUSALS['full']}")
        lp = cfg.get("lora_parameters")
        if not isinstance(lp, dict) or "rank" not in lp:
            raise LoraMigrateError(f"{folder / S.CONFIG}: lora_parameters with rank and scale is missing")
        if "scale" not in lp:
            raise LoraMigrateError(f"{folder / S.CONFIG}: lora_parameters has no scale: mlx-lm raises KeyError "
                                   "\"LoRA config is missing required key 'scale'\"")
        cands, reasons = eras_for(cfg)
        reasons = [f"{S.CONFIG} with lora_parameters and {S.WEIGHTS} (mlx-lm)", *reasons]
        if from_ is not None:
            if from_.family != self.id:
                raise DetectionError(f"{folder}: --from {from_.name} is not an mlx-lm convention")
            reasons.append(f"--from {from_.name} " + ("agrees" if from_ in cands else "overrides the detected "
                                                       + " / ".join(c.name for c in cands)))
            conv = from_
        elif len(cands) > 1:
            raise DetectionError(f"{folder}: cannot tell the mlx-lm era: it could be "
                                 f"{', '.join(c.name for c in cands)} ({reasons[1]}); pass --from")
        else:
            conv = cands[0]
        a = self._read(folder, conv, cfg)
        return Source(folder, conv, "adapter", [a], reasons + [f"{sum(len(e.keys) for e in a.modules)} tensors "
                                                               "<module>.lora_a|lora_b|m"])

    def _read(self, folder: Path, conv: Convention, cfg: dict) -> StoredSource:
        lp = cfg["lora_parameters"]
        rank = int(lp["rank"])
        s, prov = era_scale(conv, lp)
        store = TensorStore()
        try:
            store.add(folder / S.WEIGHTS)
            groups: dict[str, dict[str, str]] = {}
            for k in store.keys():
                module, _, leaf = k.rpartition(".")
                if leaf not in S.ADAPTER_LEAVES or not module:
                    raise LoraMigrateError(f"{folder / S.WEIGHTS}: {k!r} is not an adapter parameter "
                                           "(<module>.lora_a, .lora_b or .m)")
                if moe.switch_part(module) is None and (any(f".{x}." in f".{module}." for x in S.SWITCH_MARKERS)
                                                        or len(store.meta(k).shape) == 3):
                    raise UnsupportedFeature(f"{folder}: {module}: {S.REFUSALS['switch']}")
                groups.setdefault(module, {})[{"lora_a": "a", "lora_b": "b", "m": "magnitude"}[leaf]] = k
            dora = cfg.get("fine_tune_type") == "dora" or bool(cfg.get("use_dora"))
            groups, experts = moe.canonical_groups(groups, folder / S.WEIGHTS)
            if experts and "experts" not in conv.scaling:
                raise UnsupportedFeature(f"{folder}: {S.REFUSALS['switch_era']}, not {conv.name}; pass --from "
                                         "mlx-lm if mlx-lm ≥ 0.25.1 wrote it")
            entries = [self._experts_entry(folder, m, keys, store, s, prov, rank, experts[m]) if m in experts
                       else self._entry(folder, m, keys, store, s, prov, rank, dora)
                       for m, keys in sorted(groups.items())]
        except BaseException:
            store.close()
            raise
        info = AdapterInfo(name="default", convention=conv.name, r=rank, alpha=prov.alpha, config=cfg,
                           base_model=cfg.get("model") if isinstance(cfg.get("model"), str) else None,
                           dropout=lp.get("dropout"))
        feats = {"dora"} if dora else set()
        # the base as mlx_lm lora was given it: a folder (from the working directory) or a hub id in the cache
        return MlxSource(info=info, convention=conv, store=store, modules=entries, files=[folder / S.WEIGHTS],
                         base_config=base_model_config(info.base_model), features=feats, transform=_from_mlx,
                         codec_state={"experts": experts})

    @staticmethod
    def _experts_entry(folder, module, keys, store, s, prov, rank, info) -> ModuleEntry:
        metas = {p: store.meta(k) for p, k in keys.items()}
        for tag in ("", "_gate", "_up"):
            if ("a" + tag in keys) != ("b" + tag in keys):
                raise LoraMigrateError(f"{folder / S.WEIGHTS}: {module}: a SwitchLinear without lora_a or lora_b")
            if "a" + tag in keys:
                ma, mb = metas["a" + tag].shape, metas["b" + tag].shape
                if len(ma) != 3 or len(mb) != 3 or ma[0] != mb[0] or ma[1] != mb[2] or ma[1] != rank:
                    raise LoraMigrateError(f"{folder / S.WEIGHTS}: {module}: SwitchLinear lora_a {tuple(ma)} and "
                                           f"lora_b {tuple(mb)} are not (E, r, in) / (E, out, r) at rank {rank}")
        if len(info["parts"]) == 2:  # gate and up share A when this codec wrote them from a fused gate_up_proj
            info["compact"] = torch.equal(store.get(keys["a_gate"]), store.get(keys["a_up"]))
        a, b = moe.experts_shapes(info, metas)

        def one(p):  # the canonical tensor's meta: the stored dtype, the canonical shape
            return canonical_meta(next(metas[k] for k in (p, p + "_gate", p + "_up") if k in metas), {"a": a, "b": b}[p])

        return ModuleEntry(module=module, kind="experts", keys=keys, metas={"a": one("a"), "b": one("b")}, scale=s,
                           provenance=prov)

    @staticmethod
    def _entry(folder, module, keys, store, s, prov, rank, dora) -> ModuleEntry:
        if "a" not in keys or "b" not in keys:
            raise LoraMigrateError(f"{folder / S.WEIGHTS}: {module} has no {'lora_a' if 'a' not in keys else 'lora_b'}")
        if "magnitude" in keys and not dora:
            raise LoraMigrateError(f"{folder}: {module}.m (DoRA) but fine_tune_type is not \"dora\": mlx-lm "
                                   "rejects it (\"not an adapter parameter in the model\")")
        ma, mb = store.meta(keys["a"]), store.meta(keys["b"])
        if len(ma.shape) != 2 or len(mb.shape) != 2 or ma.shape[1] != mb.shape[0]:
            raise LoraMigrateError(f"{folder / S.WEIGHTS}: {module}: lora_a {tuple(ma.shape)} and lora_b "
                                   f"{tuple(mb.shape)} are not (in, r) and (r, out)")
        if ma.shape[1] != rank:
            raise LoraMigrateError(f"{folder}: {module}: rank {ma.shape[1]} but lora_parameters.rank = {rank}: "
                                   "mlx-lm refuses it (\"adapter shape … does not match\")")
        metas = {"a": canonical_meta(ma, ma.shape[::-1]), "b": canonical_meta(mb, mb.shape[::-1])}
        if "magnitude" in keys:
            metas["magnitude"] = store.meta(keys["magnitude"])
        return ModuleEntry(module=module, kind="linear", keys=keys, metas=metas, scale=s, provenance=prov)

    def as_loaded(self, a):
        return as_loaded(a, self.conventions, era_scale)

    def findings(self, a) -> list[Finding]:
        lp = a.info.config.get("lora_parameters", {})

        def warn(code, message):
            return Finding(level="warning", code=code, adapter=a.info.name, message=message)

        out = []
        if "alpha" in lp and lp["alpha"] != lp.get("rank") and a.convention.name != "mlx-lm-2024-03":
            out.append(warn("alpha-ignored", f"lora_parameters.alpha={lp['alpha']} is ignored by mlx-lm ≥ 0.14.2 "
                            f"(scale alone applies); mlx-lm 0.2.0–0.14.1 would apply scale·alpha/rank = "
                            f"{lp['scale'] * lp['alpha'] / lp['rank']:g}"))
        keys = lp.get("keys")
        if isinstance(keys, list):
            blocks = Blocks.of(sorted({k.rpartition(".")[0] for e in a.modules for k in e.keys.values()}))
            stray = sorted({r for v in blocks.per_block.values() for r in v} - set(keys)) + \
                [m for m in blocks.top if m not in keys]
            if stray:
                out.append(Finding(level="error", code="unselected-modules", adapter=a.info.name, message=(
                    f"tensors for modules lora_parameters.keys does not select ({', '.join(stray)}): mlx-lm "
                    "refuses the file (\"not an adapter parameter in the model\")")))
        if "keys" not in lp:
            out.append(warn("default-keys", "no lora_parameters.keys: the modules mlx-lm adapts by default changed "
                            "(model-type defaults q_proj/v_proj before 0.25, every Linear in 0.32); the tensors in "
                            "the file are what counts"))
        return out

    # ------------------------------------------------------------------------------------------------ writing

    def uses_base_config(self, a, target: Convention) -> bool:
        """The base model's block count, to check that num_layers counts to its last block."""
        return target.family == self.id

    def plan(self, src, target: Convention, opts: PlanOptions, steps: list[Step], output: str):
        refuse_fused(src, target)
        name = src.info.name
        mtype = model_type_of(src, opts)
        names = {e.module: moe.mlx_modules(e.module, e.kind, mtype, name) for e in src.modules}
        blocks, dense_note = moe.fill_dense_blocks(Blocks.of([m for e in src.modules for m, _ in names[e.module]]),
                                                   mtype, opts.base_config or src.base_config)
        why = blocks.uneven()
        if why:
            raise UnsupportedFeature(f"{name}: mlx-lm applies one set of lora_parameters.keys to each of the last "
                                     f"num_layers blocks; {why}")
        idx = list(blocks.per_block)
        if idx and idx != list(range(idx[0], idx[-1] + 1)):
            raise UnsupportedFeature(f"{name}: mlx-lm adapts the last num_layers blocks; the source adapts blocks "
                                     f"{idx}, which are not contiguous")
        L, where = layer_count(src, opts.base_config)
        notes = [dense_note] if dense_note else []
        if idx and L is not None and idx[-1] != L - 1:
            raise UnsupportedFeature(f"{name}: mlx-lm adapts the last num_layers blocks; the source adapts blocks "
                                     f"{idx[0]}–{idx[-1]} of {L} ({where}), not a run ending at the last block")
        if idx and L is None:
            notes.append(f"the base model's block count is not known (pass --base-model): block {idx[-1]} is taken "
                         f"as the last, so num_layers = {len(idx)}")
        if blocks.top and "top_level_keys" not in target.features:
            raise UnsupportedFeature(f"{name}: {blocks.top[0]} is outside the blocks; {target.name} selects "
                                     "modules only inside the last num_layers blocks (full-path keys need mlx-lm ≥ "
                                     "0.21, target mlx-lm)")
        R, s, out = one_rank_one_scale(src, target, steps, "mlx-lm", lambda s, r: ScaleProvenance(
            alpha=s, r=r, rule="scale (absolute)", convention=target.name), opts.doubled)
        keys = sorted(next(iter(blocks.per_block.values()), set())) + blocks.top
        config = self._config(src, target, R, s, len(idx), keys)
        steps.append(Step(rule="write", what=f"write {S.WEIGHTS} with keys <module>.lora_a = Aᵀ (in, r) and .lora_b "
                          f"= Bᵀ (r, out){', .m (DoRA)' if 'dora' in src.features else ''}; {S.CONFIG} with "
                          f"num_layers={len(idx)}, keys={keys}, rank={R}, scale={s:g}"))
        if any(e.kind == "experts" for e in src.modules):
            steps.append(Step(rule="split_gate_up", what="experts: lora_a (E, r, in) and lora_b (E, out, r) as they "
                              "are; gate_up_proj's B split by rows into switch_mlp.gate_proj (first half) and "
                              "up_proj, A shared (exact)"))
        return execution(src, target, out, steps, output, [S.CONFIG, S.WEIGHTS], R, s, config, notes,
                         codec_state={"names": names})

    @staticmethod
    def _config(src, target: Convention, R: int, s: float, n: int, keys: list[str]) -> dict:
        dora = "dora" in src.features
        lp = {"rank": R, "dropout": float(src.info.dropout or 0.0), "scale": s, "keys": keys}
        cfg = dict(S.CONFIG_BASE, model=src.info.base_model, fine_tune_type="dora" if dora else "lora", num_layers=n,
                   lora_parameters=lp)
        if target.name != "mlx-lm":  # older loaders: their spellings, and alpha = rank (scale·rank/rank = scale)
            lp["alpha"] = R
            cfg.update(lora_layers=n, use_dora=dora)
        return cfg

    @staticmethod
    def _stored(ex):
        """(key, shape, dtype, canonical module, param, row half) of every stored tensor, in write order: Linear
        factors transposed, SwitchLinear ones as they are, gate_up_proj as two modules (the row halves of B)."""
        leaf = {"a": "lora_a", "b": "lora_b", "magnitude": "m"}
        names = ex.codec_state["names"]
        out = []
        for m, kind, p, shape, dtype in ex.tensors:
            for mlx, half in names[m]:
                if kind != "experts":
                    out.append((f"{mlx}.{leaf[p]}", shape[::-1] if p in ("a", "b") else shape, dtype, m, p, None))
                else:
                    rows = (shape[0], shape[1] // 2, shape[2]) if half and p == "b" else shape
                    out.append((f"{mlx}.{leaf[p]}", rows, dtype, m, p, half))
        return out

    def tensor_names(self, ex):
        return [k for k, *_ in self._stored(ex)]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / S.CONFIG).write_text(json.dumps(ex.config, indent=4, sort_keys=True) + "\n", encoding="utf-8")
        stored = self._stored(ex)
        by_module: dict[str, list] = {}
        for row in stored:
            by_module.setdefault(row[3], []).append(row)
        with BackgroundWriter(SafetensorsWriter(dest / S.WEIGHTS, metadata={"format": "mlx"})) as w:
            for key, shape, dtype, *_ in stored:
                w.add(key, dtype, shape)
            w.write_header()
            for d in deltas:
                tensors = {"a": d.A, "b": d.B, "magnitude": d.magnitude}
                for key, shape, _, _, p, half in by_module[d.module]:
                    t = tensors[p]
                    if d.kind != "experts" and p in ("a", "b"):
                        t = t.T
                    elif half:
                        t = t[:, :shape[1]] if half == "gate" and p == "b" else t[:, shape[1]:] if p == "b" else t
                    w.write(key, t.contiguous())
        return []

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions):
        cfg = read_json(dest / S.CONFIG)
        lp = cfg["lora_parameters"]
        cands, _ = eras_for(cfg)
        other = [c.name for c in cands if era_scale(c, lp)[0] != era_scale(target, lp)[0]]
        if other:
            raise VerificationFailed(f"{dest}: the written config would be read as {', '.join(other)}, which "
                                     f"applies another scale than {target.name}")
        a = self._read(dest, target, cfg)
        a.info.name = name
        return a


def era_scale(conv: Convention, lp: dict) -> tuple[float, ScaleProvenance]:
    """The effective scale ``conv`` applies for ``lora_parameters`` and its provenance."""
    rank, scale = int(lp["rank"]), float(lp["scale"])
    if S.SCALE_RULES[conv.name] == "scale·alpha/rank":
        alpha = float(lp.get("alpha", 16.0))
        return scale * alpha / rank, ScaleProvenance(alpha=scale * alpha, r=rank, rule="scale·alpha/rank",
                                                     convention=conv.name)
    return scale, ScaleProvenance(alpha=scale, r=rank, rule="scale (absolute)", convention=conv.name)


def _from_mlx(e: ModuleEntry, param: str, t):
    """mlx's stored factors → canonical: lora_a = Aᵀ, lora_b = Bᵀ; m as it is."""
    return t.T.contiguous() if param in ("a", "b") else t


class MlxSource(StoredSource):
    """An mlx-lm adapter: Linear factors transposed (``_from_mlx``), SwitchLinear ones per :mod:`.moe`."""

    def load(self, e: ModuleEntry):
        if e.kind != "experts":
            return super().load(e)
        A, B = moe.load_experts(self.codec_state["experts"][e.module], lambda p: self.store.get(e.keys[p]))
        return ModuleDelta(module=e.module, A=A, B=B, scale=e.scale, provenance=e.provenance, kind="experts")


MLX_LM = MlxLmCodec()
