"""The AdapterHub codec: adapter-transformers 3.1 and adapters 0.x–1.3 adapter folders and full-model checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import LoraMigrateError, VerificationFailed
from ...execution import Step
from ...findings import Finding, LoadCheck
from ...schemas import CONVENTIONS, Convention
from ...schemas.adapterhub import FAMILY
from ...source import Source, SourceAdapter
from ..base import Claim, Codec, PlanOptions, pick
from . import format as ah
from .plan import plan_adapterhub

_FILES = ("adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors")


def _keys_reason(a) -> str:
    n = sum(len(e.keys) for e in a.modules)
    tmpl = a.convention.keys.b.format(module="<module>", adapter=a.info.name)
    return f"{n} tensor keys of adapter {a.info.name!r} are all claimed by {tmpl.replace('lora_B', 'lora_A|lora_B')}"


class AdapterHubCodec(Codec):
    id = FAMILY
    display = "an AdapterHub"

    def claim(self, path: Path) -> Claim | None:
        if path.is_file():
            return Claim(f"{path.name} of an AdapterHub adapter folder") if path.name in _FILES else None
        if ah.is_adapter_dir(path):
            return Claim("adapter_config.json and AdapterHub weights")
        if ah.is_full_model_dir(path):
            return Claim("a full model whose config.json has an \"adapters\" section")
        if (path / "adapter_config.json").is_file():
            return Claim("adapter_config.json", 0)
        if any(p.is_dir() and ah.is_adapter_dir(p) for p in path.iterdir()):
            return Claim("folders of AdapterHub adapters")
        return None

    def open(self, path: Path, from_: Convention | None) -> Source:
        if path.is_file():
            path = path.parent
        if ah.is_adapter_dir(path):
            cands, reasons, wrapper = ah.detect_adapter_dir(path)
            conv, reasons = pick(path, cands, reasons, from_)
            adapter = ah.read_adapter_dir(path, conv, wrapper)
            return Source(path, conv, "adapter", [adapter], [*reasons, _keys_reason(adapter)])
        if ah.is_full_model_dir(path):
            cands, reasons, cfg = ah.detect_full_model(path)
            conv, reasons = pick(path, cands, reasons, from_)
            adapters = ah.read_full_model(path, conv, cfg)
            return Source(path, conv, "full-model", adapters, [*reasons, *(_keys_reason(a) for a in adapters)])
        if (path / "adapter_config.json").is_file():
            ah.detect_adapter_dir(path)  # says what it is (e.g. PEFT) when it can
            raise LoraMigrateError(f"{path}: adapter_config.json but no weights file (pytorch_adapter.bin or "
                                   "adapter.safetensors)")
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and ah.is_adapter_dir(p))
        adapters, reasons = [], []
        try:
            for d in subdirs:
                cands, why, wrapper = ah.detect_adapter_dir(d)
                conv, why = pick(d, cands, why, from_)
                adapters.append(ah.read_adapter_dir(d, conv, wrapper))
                reasons.append(f"{d.name}/: {conv.name}: " + "; ".join(why[1:]))
            names = [a.info.name for a in adapters]
            if len(set(names)) != len(names):
                raise LoraMigrateError(f"{path}: two adapter folders hold adapters of the same name")
        except BaseException:
            for a in adapters:
                a.store.close()
            raise
        return Source(path, adapters[0].convention, "adapter-folders", adapters,
                      [f"{len(subdirs)} adapter folders", *reasons])

    def as_loaded(self, a):
        return as_loaded(a)

    def config_findings(self, path: Path) -> list[Finding]:
        """adapter_config.json files with the AdapterHub wrapper (at ``path`` or one folder down) whose
        ``version`` no AdapterHub release wrote, or that have none: the scaling convention cannot be told."""
        if path.is_file():
            path = path.parent
        files = [path / "adapter_config.json"] if (path / "adapter_config.json").is_file() else \
            [d / "adapter_config.json" for d in sorted(path.iterdir()) if (d / "adapter_config.json").is_file()]
        out = []
        for f in files:
            try:
                raw = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # reading the adapter reports it, with the reason
            if not (isinstance(raw, dict) and "peft_type" not in raw and isinstance(raw.get("config"), dict)
                    and "name" in raw):
                continue
            v = raw.get("version")
            if v is None:
                msg = f"{f}: no \"version\"; the scaling convention cannot be told"
            elif not ah.conventions_for_version(str(v)):
                msg = f"{f}: version {v!r} is not one any AdapterHub release wrote"
            else:
                continue
            out.append(Finding(level="error", code="unknown-version", message=msg, adapter=raw.get("name")))
        return out

    def check_options(self, target: Convention, opts: PlanOptions) -> None:
        if opts.safetensors and target.weights_write_safetensors is None:
            raise LoraMigrateError(f"{target.name} cannot read safetensors weights")

    def plan(self, src, target: Convention, opts: PlanOptions, steps: list[Step], output: str):
        return plan_adapterhub(src, target, output, steps, opts.model_type, opts.safetensors, opts.keep_head,
                               opts.doubled)

    def tensor_names(self, ex):
        return [ex.target.keys.key(p, m, ex.source.info.name) for m, _, p, _, _ in ex.tensors]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        info = ex.source.info
        if ex.source.convention.family == FAMILY:
            wrapper = info.wrapper
        else:  # a foreign source: the wrapper from the canonical fields
            wrapper = {"model_name": info.base_model, "model_type": ex.codec_state.get("model_type")}
        return ah.write_adapter(dest, ex.target, info, wrapper, deltas, ex.plan.r, ex.plan.alpha_out, ex.tensors,
                                safetensors=ex.safetensors, head=ex.source.head, keep_head=ex.keep_head,
                                config=ex.config)

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions):
        cands, _, wrapper = ah.detect_adapter_dir(dest)
        if target not in cands:
            raise VerificationFailed(f"{dest}: the written config would be read as "
                                     f"{', '.join(c.name for c in cands)}, not {target.name}")
        return ah.read_adapter_dir(dest, target, wrapper)


def as_loaded(a: SourceAdapter) -> list[LoadCheck]:
    """For each other AdapterHub convention: the scales it computes loading this file as it is, found by reading
    the file's modules as that convention reads them (its scaling table, after its load shim rewrote the config)."""
    version = a.info.wrapper.get("version")
    r, alpha = a.info.r, a.info.alpha
    out = []
    if a.gated or r is None or alpha is None:
        return out
    keys = [k for e in a.modules for k in e.keys.values()]
    config = a.convention.config_model.model_validate(a.info.config)
    for c in CONVENTIONS:
        if c.family != a.convention.family or c is a.convention:
            continue
        if any(e.kind not in c.scaling for e in a.modules):
            continue
        shim = c.load_shim is not None and c.load_shim.applies(version, alpha, r)
        seen = config.model_copy(update={"alpha": float(r)}) if shim else config
        read = {e.module: e for e in ah.plan_modules(c, a.store, keys, a.info.name, seen, a.info.model_type,
                                                     str(a.files[0]))[0]}
        wrong: dict[str, str] = {}
        for e in a.modules:
            s = read[e.module].scale
            if abs(s / e.scale - 1) > 1e-12:
                wrong.setdefault(e.kind, f"{e.kind} ×{s:g} instead of ×{e.scale:g}")
        why = f" (its load shim sets alpha := r for version {version!r})" if shim else ""
        detail = ("same ΔW" + why) if not wrong else ("WRONG: " + ", ".join(v for _, v in sorted(wrong.items()))
                                                      + why + f"; convert with --to {c.name}")
        out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=not wrong,
                             detail=detail))
    return out


ADAPTERHUB = AdapterHubCodec()
