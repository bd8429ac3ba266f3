"""Opening SRC: which layout it is, which convention wrote it, and why we think so."""

from __future__ import annotations

from pathlib import Path

from .errors import DetectionError, LoraMigrateError
from .formats import adapterhub as ah
from .schemas import Convention, get_convention
from .source import Source

ADAPTER_FILE_NAMES = {"adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors"}


def _pick(path: Path, cands: list[Convention], reasons: list[str], from_: str | None) -> tuple[Convention, list[str]]:
    if from_:
        conv = get_convention(from_)
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
