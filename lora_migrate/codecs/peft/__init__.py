"""The PEFT codec: PEFT's adapter folders by era (0.6 → 0.21) and the servers that read them (LoRAX, vLLM)."""

from __future__ import annotations

from pathlib import Path

from packaging.version import InvalidVersion, Version

from ...errors import LoraMigrateError, VerificationFailed
from ...execution import Step
from ...findings import Finding
from ...schemas import Convention
from ...schemas.peft import FAMILY
from ...source import Source
from ..base import Claim, Codec, PlanOptions
from ..shared import model_type_of
from . import experts
from . import format as pf
from .loaded import as_loaded
from .plan import lorax_drops, plan_peft

_FILES = ("adapter_config.json", *pf.WEIGHTS)


class PeftCodec(Codec):
    id = FAMILY
    display = "a PEFT"

    def claim(self, path: Path) -> Claim | None:
        if path.is_file():
            return Claim(f"{path.name} of a PEFT adapter folder", 2) \
                if path.name in _FILES and pf.is_peft_config(path.parent) else None
        if pf.is_peft_config(path):
            return Claim("adapter_config.json has peft_type", 2)
        if any(p.is_dir() and pf.is_peft_dir(p) for p in path.iterdir()):
            return Claim("folders of PEFT adapters", 2)
        return None

    def open(self, path: Path, from_: Convention | None) -> Source:
        if path.is_file():
            path = path.parent
        if not pf.is_peft_dir(path) and pf.is_peft_config(path) and \
                not any(p.is_dir() and pf.is_peft_dir(p) for p in path.iterdir()):
            raw = pf.read_json(path / "adapter_config.json")
            raise LoraMigrateError(f"{path}: a PEFT adapter (adapter_config.json has peft_type="
                                   f"{raw.get('peft_type')!r}) but no adapter_model.safetensors or adapter_model.bin")
        adapters, reasons = pf.read_peft_tree(path, from_)
        layout = "adapter" if len(adapters) == 1 and pf.is_peft_dir(path) else "adapter-folders"
        return Source(path, adapters[0].convention, layout, adapters, reasons)

    def prepare(self, a, opts: PlanOptions) -> None:
        """Embedding LoRA on a scaled embedding: the factor from the base model's config.json, or the model type
        alone (a type that never scales)."""
        if "embedding" not in a.features:
            return
        if opts.base_config is not None:
            pf.set_embed_scales(a, opts.base_config)
        elif opts.model_type and a.base_config is None:
            pf.set_embed_scales(a, {"model_type": opts.model_type}, type_only=True)

    def as_loaded(self, a):
        return as_loaded(a)

    def expect_findings(self, source, want: Convention):
        """``--expect lorax|vllm`` on PEFT files: what the server computes loading them as they are (the same
        prediction as ``inspect``: ignored use_rslora, one global r and alpha, dropped DoRA/bias/modules_to_save)."""
        if want.family != self.id or want.serving is None:
            return None
        out = []
        for a in source.adapters:
            row = next((c for c in as_loaded(a) if c.convention == want.name), None)
            if row is not None and not row.same:
                out.append(Finding(level="error", code="misdeclared", adapter=a.info.name,
                                   message=f"{want.name} would not compute this adapter's ΔW: {row.detail}"))
            drops = lorax_drops(a) if want.serving.drops_partial_layer_types else None
            if drops is not None and not drops[0]:  # some layers by config: dropped unless the model has only those
                out.append(Finding(level="warning", code="lorax-coverage", adapter=a.info.name,
                                   message=drops[1] + "; convert with --to lorax --num-layers N to fill the other "
                                                      "layers with zero adapters"))
        return out

    def findings(self, a):
        """use_rslora (PEFT ≥ 0.8, #1244) in a config whose peft_version predates it: that release does not apply
        alpha/√r (0.6–0.7 even refuse the field)."""
        cfg = a.peft
        pv = (cfg.peft_version or "").split("@")[0] if cfg is not None else ""
        try:
            old = bool(pv) and Version(pv) < Version("0.8")
        except InvalidVersion:
            old = False
        if cfg is not None and cfg.use_rslora and old:
            return [Finding(level="error", code="rslora-unknown", adapter=a.info.name,
                            message=f"use_rslora=true, but peft_version {cfg.peft_version!r} predates rsLoRA "
                                    "(PEFT 0.8): that release scales by alpha/r")]
        return []

    def plan(self, src, target: Convention, opts: PlanOptions, steps: list[Step], output: str):
        experts.refuse_renamed_linears(src, model_type_of(src, opts), target.name)
        return plan_peft(src, target, output, steps, doubled=opts.doubled, num_layers=opts.num_layers)

    @staticmethod
    def _layout(ex):
        """(key, stored shape, dtype) per planned tensor; experts modules under their ParamWrapper path, flat."""
        paths = experts.stored_paths([m for m, k, _, _, _ in ex.tensors if k == "experts"])
        keys = ex.target.keys
        return [(keys.key(pf.tensor_param(k, p), paths.get(m, m)), experts.flat_shape(p, shape) if m in paths
                 else shape, dtype) for m, k, p, shape, dtype in ex.tensors], paths

    def tensor_names(self, ex):
        return [k for k, _, _ in self._layout(ex)[0]]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        keys = ex.target.keys
        planned, paths = self._layout(ex)
        store = ex.source.store
        planned += [(k, tuple(store.meta(k).shape), store.meta(k).dtype) for k in ex.extras]

        def tensors():
            for d in deltas:
                for p, t in (("a", d.A), ("b", d.B), ("bias", d.bias), ("magnitude", d.magnitude)):
                    if t is not None and d.kind == "experts":
                        yield keys.key(p, paths[d.module]), experts.flat(p, t).contiguous()
                    elif t is not None:
                        yield keys.key(pf.tensor_param(d.kind, p), d.module), t
            for k in ex.extras:
                yield k, store.get(k)

        pf.write_peft(dest, ex.target, ex.config, tensors(), planned,
                      safetensors=not ex.target.weights_write.endswith(".bin"))
        return [f"copied {len(ex.extras)} non-LoRA tensors unchanged"] if ex.extras else []

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions):
        raw = pf.read_json(dest / "adapter_config.json")
        if target.serving is None:  # a server reads any era's file its own way
            cands, _ = pf.eras_for(raw)
            if target not in cands:
                raise VerificationFailed(f"{dest}: the written config would be read as "
                                         f"{', '.join(c.name for c in cands)}, not {target.name}")
        return pf.read_peft_dir(dest, target, raw, name, opts.base_config)

    def extras_to_check(self, src, out) -> list[str]:
        """The source's non-LoRA tensors the output must carry bit for bit: all, except the frozen base copies a
        server takes from the base model (``plan._without_base_copies``)."""
        serving = out.convention.serving
        return [k for k in src.extras if not (serving and serving.skips_frozen_base_copies
                                              and pf.is_frozen_base_copy(k))]


PEFT = PeftCodec()
