"""Opening SRC: which layout it is, which convention wrote it, and why we think so."""

from __future__ import annotations

from pathlib import Path

from .errors import DetectionError, LoraMigrateError
from .formats import adapterhub as ah
from .formats import peft as pf
from .schemas import Convention, get_convention
from .source import Source

ADAPTER_FILE_NAMES = {"adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors",
                      "adapter_model.safetensors", "adapter_model.bin"}


def _pick(path: Path, cands: list[Convention], reasons: list[str], from_: str | None) -> tuple[Convention, list[str]]:
    if from_:
        conv = get_convention(from_)
        if cands and conv.family != cands[0].family:
            fam = {"peft": "a PEFT", "adapterhub": "an AdapterHub"}
            raise DetectionError(f"{path}: --from {from_} names {fam[conv.family]} convention, but this is "
                                 f"{fam[cands[0].family]} adapter ({reasons[0]})")
        if conv not in cands:
            reasons = [*reasons, f"--from {from_} overrides the detected {' / '.join(c.name for c in cands)}"]
        else:
            reasons = [*reasons, f"--from {from_} agrees"]
        return conv, reasons
    if len(cands) == 1:
        return cands[0], reasons
    raise DetectionError(f"{path}: cannot tell the convention: it could be {', '.join(c.name for c in cands)} "
                         f"({'; '.join(reasons[1:])}); pass --from")


def _keys_reason(a) -> str:
    n = sum(len(e.keys) for e in a.modules)
    tmpl = a.convention.keys.b.format(module="<module>", adapter=a.info.name)
    return f"{n} tensor keys of adapter {a.info.name!r} are all claimed by {tmpl.replace('lora_B', 'lora_A|lora_B')}"


def open_source(path: str | Path, from_: str | None = None) -> Source:
    """Read SRC (an adapter folder, a full-model folder, or a folder of adapter folders) lazily."""
    path = Path(path)
    if not path.exists():
        raise LoraMigrateError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name not in ADAPTER_FILE_NAMES:
            raise LoraMigrateError(f"{path}: expected an adapter folder (with adapter_config.json), not a file")
        path = path.parent
    if pf.is_peft_dir(path):
        adapters, reasons = _read_peft_tree(path, from_)
        layout = "adapter" if len(adapters) == 1 else "adapter-folders"
        return Source(path, adapters[0].convention, layout, adapters, reasons)
    if ah.is_adapter_dir(path):
        cands, reasons, wrapper = ah.detect_adapter_dir(path)
        conv, reasons = _pick(path, cands, reasons, from_)
        adapter = ah.read_adapter_dir(path, conv, wrapper)
        return Source(path, conv, "adapter", [adapter], [*reasons, _keys_reason(adapter)])
    if ah.is_full_model_dir(path):
        cands, reasons, cfg = ah.detect_full_model(path)
        conv, reasons = _pick(path, cands, reasons, from_)
        adapters = ah.read_full_model(path, conv, cfg)
        return Source(path, conv, "full-model", adapters, [*reasons, *(_keys_reason(a) for a in adapters)])
    if (path / "adapter_config.json").is_file():
        ah.detect_adapter_dir(path)  # says what it is (e.g. PEFT) when it can
        raise LoraMigrateError(f"{path}: adapter_config.json but no weights file (pytorch_adapter.bin or "
                               "adapter.safetensors)")
    if any(p.is_dir() and pf.is_peft_dir(p) for p in path.iterdir()):
        adapters, reasons = _read_peft_tree(path, from_)
        return Source(path, adapters[0].convention, "adapter-folders", adapters, reasons)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and ah.is_adapter_dir(p))
    if subdirs:
        adapters, reasons = [], []
        try:
            for d in subdirs:
                cands, why, wrapper = ah.detect_adapter_dir(d)
                conv, why = _pick(d, cands, why, from_)
                adapters.append(ah.read_adapter_dir(d, conv, wrapper))
                reasons.append(f"{d.name}/: {conv.name}: " + "; ".join(why[1:]))
        except BaseException:
            for a in adapters:
                a.store.close()
            raise
        names = [a.info.name for a in adapters]
        if len(set(names)) != len(names):
            for a in adapters:
                a.store.close()
            raise LoraMigrateError(f"{path}: two adapter folders hold adapters of the same name")
        return Source(path, adapters[0].convention, "adapter-folders", adapters,
                      [f"{len(subdirs)} adapter folders", *reasons])
    raise DetectionError(f"{path}: no adapter found: expected adapter_config.json with pytorch_adapter.bin or "
                         "adapter.safetensors, a full model (config.json with an \"adapters\" section and its "
                         "weights), or folders of those")


def read_peft_one(path: Path, from_: str | None, name: str = "default"):
    cands, reasons, raw = pf.detect_peft_dir(path)
    conv, reasons = _pick(path, cands, reasons, from_)
    return pf.read_peft_dir(path, conv, raw, name), reasons


def _read_peft_tree(path: Path, from_: str | None):
    """PEFT's multi-adapter layout: the default adapter at the top (if any), every other one in a subfolder
    named after it (``save_pretrained`` of several adapters, or a folder of adapter folders)."""
    adapters, reasons = [], []
    try:
        if pf.is_peft_dir(path):
            a, why = read_peft_one(path, from_)
            adapters.append(a)
            reasons += why + [_keys_reason_peft(a)]
        for d in sorted(p for p in path.iterdir() if p.is_dir() and pf.is_peft_dir(p)):
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


def _keys_reason_peft(a) -> str:
    n = sum(len(e.keys) for e in a.modules)
    extra = f" (+{len(a.extras)} non-LoRA tensors)" if a.extras else ""
    return f"{n} tensor keys are all claimed by base_model.model.<module>.lora_A|lora_B…{extra}"
