"""The diffusers codec: ``pytorch_lora_weights.safetensors`` with component prefixes and ``lora_adapter_metadata``.

Reads every spelling diffusers loaders read (PEFT ``lora_A/B``, ``.lora.down/up``, ``.lora_linear_layer.down/up``,
and files that mix them), with per-module (r, alpha) as the convention's era computes them; writes PEFT keys and
per-component metadata whose patterns give every module its (r, alpha) exactly. Module names: the diffusers module
path with its component prefix, CLIP paths with ``text_model.`` (written so: every diffusers/transformers pairing
loads it; patterns and targets are written without it, which PEFT's suffix matching finds in both).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import LoraMigrateError, VerificationFailed
from ...schemas import Convention
from ...findings import Finding, LoadCheck
from ...schemas.diffusers import DIFFUSERS as NEWEST, FAMILY, MAGNITUDE, TEXT_ENCODERS
from ..base import Claim, Codec, PlanOptions
from . import format as fmt
from .write import plan_diffusers, planned, write_diffusers


def _finding(level, code, message, adapter=None, module=None) -> Finding:
    return Finding(level=level, code=code, message=message, adapter=adapter, module=module)


class DiffusersCodec(Codec):
    id = FAMILY
    display = "a diffusers"
    output = "folder"

    def claim(self, path: Path) -> Claim | None:
        w = fmt.weights_file(path)
        if w is None:
            return None
        try:
            keys, meta = fmt.header(w)
        except (OSError, LoraMigrateError, ValueError):
            return None
        if not fmt.claims_keys(keys):
            return None
        comps = sorted({k.partition(".")[0] for k in keys})
        why = f"{w.name}: keys {', '.join(c + '.…' for c in comps)} (diffusers LoRA)"
        if "lora_adapter_metadata" in meta:
            return Claim(why=why + " with lora_adapter_metadata", strength=2)
        return Claim(why=why + ", no lora_adapter_metadata")

    def open(self, path: Path, from_: Convention | None):
        from ...source import Source

        conv = from_ or NEWEST
        p = fmt.parse(path)
        try:
            a = fmt.to_source(p, conv, "default")
        except BaseException:
            p.store.close()
            raise
        a.notes += [f.message for f in self.findings(a, p) if f.level == "warning"]
        claim = self.claim(path)
        reasons = [claim.why if claim else f"read as {conv.name}"]
        return Source(path=path, convention=conv, layout="adapter", adapters=[a], reasons=reasons)

    def prepare(self, a, opts: PlanOptions) -> None:
        if opts.model_type:
            a.info.model_type = opts.model_type

    # -------------------------------------------------------------------------------------------- findings

    def findings(self, a, p: fmt.Parsed | None = None) -> list:
        p = p or fmt.parse(a.files[0])
        out, name = [], a.info.name
        try:
            if p.metadata is None:
                ranks = {e.module: e.rank for e in a.modules}
                old = fmt.module_scales(p, _era("0.34"), ranks, str(p.path))
                mixed = len(set(ranks.values())) > 1
                out.append(_finding("warning", "missing-metadata",
                                    f"{p.path.name} has no lora_adapter_metadata: diffusers loads every module at "
                                    "alpha = r (scale 1); any other alpha the adapter was trained with is lost"
                                    + ("; diffusers < 0.40 takes the first module's rank as alpha for a whole "
                                       f"component (scales {_range(old)})" if mixed else ""), name))
            bare = [m for m, k in p.modules.items() if m.partition(".")[0] in TEXT_ENCODERS
                    and k.get("magnitude", "").endswith(MAGNITUDE) and "magnitude" in _keys_of(a, m)]
            if bare:
                out.append(_finding("warning", "dora-text-encoder-key",
                                    f"{len(bare)} text-encoder DoRA magnitudes are keyed …lora_magnitude_vector: "
                                    "diffusers 0.42.1 on transformers 5 does not load them (the encoder runs "
                                    "without DoRA; 0.73 off on the tiny SD1 golden); converting writes "
                                    "…lora_magnitude_vector.weight", name, bare[0]))
            for comp, first in p.first_spelling.items():
                others = sorted(m for m, s in p.spelling.items() if m.startswith(comp + ".") and s != "peft")
                if comp in ("unet", "transformer") and first == "peft" and others:
                    out.append(_finding("warning", "mixed-spellings",
                                        f"{comp}: {len(others)} modules spelled .lora.down/.lora_linear_layer after a "
                                        "first key spelled lora_A: diffusers' loader decides by the first key and "
                                        f"silently skips them (e.g. {others[0]}); converting writes one spelling",
                                        name, others[0]))
        finally:
            if p is not None and p.store is not a.store:
                p.store.close()
        return out

    def as_loaded(self, a) -> list:
        p = fmt.parse(a.files[0])
        try:
            out = []
            ranks = {e.module: e.rank for e in a.modules}
            mine = {e.module: e.scale for e in a.modules}
            for conv in self.conventions:
                if conv.name == a.convention.name:
                    continue
                s = {m: rule.scale(al, r) for m, (r, al, rule) in fmt.module_scales(p, conv, ranks, str(p.path)).items()}
                diff = [m for m in mine if abs(s[m] / mine[m] - 1) > 1e-12]
                detail = ("every module at the same scale" if not diff else
                          f"{len(diff)} of {len(mine)} modules at another scale (e.g. {diff[0]}: "
                          f"{s[diff[0]]:g} instead of {mine[diff[0]]:g})")
                out.append(LoadCheck(convention=conv.name, library=conv.library, versions=conv.versions,
                                       same=not diff, detail=detail))
            return out
        finally:
            p.store.close()

    # -------------------------------------------------------------------------------------------- writing

    def place_in_component(self, a, target: Convention, component: str) -> None:
        fmt.place_in_component(a, component)

    def check_options(self, target: Convention, opts: PlanOptions) -> None:
        if opts.safetensors or opts.keep_head or opts.outtype:
            raise LoraMigrateError(f"--safetensors/--keep-head/--outtype mean nothing for {target.name}")

    def plan(self, src, target: Convention, opts: PlanOptions, steps: list, output: str):
        return plan_diffusers(src, target, opts, steps, output)

    def tensor_names(self, ex):
        return [k for k, _, _ in planned(ex)]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        return write_diffusers(ex, dest, deltas)

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions):
        if self.claim(dest) is None:
            raise VerificationFailed(f"{dest}: the written files are not claimed as a diffusers LoRA")
        p = fmt.parse(dest)
        try:
            return fmt.to_source(p, target, name)
        except BaseException:
            p.store.close()
            raise


def _keys_of(a, module: str) -> dict:
    return next((e.keys for e in a.modules if e.module == module), {})


def _era(version: str) -> Convention:
    from ...schemas import CONVENTIONS
    from ...schemas.base import VersionPattern

    return next(c for c in CONVENTIONS if c.family == "diffusers"
                and VersionPattern(specifier=c.versions).matches(version))


def _range(scales: dict) -> str:
    v = [rule.scale(a, r) for r, a, rule in scales.values()]
    return f"{min(v):g}…{max(v):g}"


DIFFUSERS = DiffusersCodec()

__all__ = ["DIFFUSERS", "DiffusersCodec"]
