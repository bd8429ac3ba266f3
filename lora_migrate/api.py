"""The Python API. Every function mirrors a CLI command and returns the pydantic object that ``--json`` prints.

    >>> import lora_migrate
    >>> r = lora_migrate.convert("at31_adapter", "out", to="adapters-1.0")
    >>> r.adapters[0].verify.ok
    True
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from .detect import open_source
from .errors import LoraMigrateError, VerificationFailed
from .formats import adapterhub as ah
from .io import atomic_output, refuse_overlap
from .io._common import few_threads, release_memory
from .plan import AdapterPlan, Execution, plan_adapter
from .schemas import CONVENTIONS, get_convention
from .source import Source, SourceAdapter
from .rules.values import refuse_nonfinite
from .verify import VerifyReport, WriteCheck, build_report, compare, extra, missing


class AdapterResult(BaseModel):
    plan: AdapterPlan
    output: str  # absolute path of the adapter's output folder
    bytes: int
    notes: list[str]
    verify: VerifyReport | None


class ConvertResult(BaseModel):
    source: str
    output: str
    source_convention: str
    target_convention: str
    layout: str
    reasons: list[str]
    dry_run: bool
    adapters: list[AdapterResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(a.verify is None or a.verify.ok for a in self.adapters)


# ------------------------------------------------------------------------------------------------ convert


def _plans(source: Source, target, adapter: str | None, safetensors: bool, keep_head: bool) -> list[Execution]:
    from .rules.select import select_adapters

    names = select_adapters([a.info.name for a in source.adapters], adapter)
    single = len(source.adapters) == 1 or adapter is not None
    out = []
    for a in source.adapters:
        if a.info.name in names:
            sub = "." if single else a.info.name
            if sub != "." and (sub in ("..", "") or "/" in sub or "\\" in sub or "\0" in sub):
                raise LoraMigrateError(f"adapter name {sub!r} cannot be a folder name")
            out.append(plan_adapter(a, target, sub, safetensors=safetensors, keep_head=keep_head))
    return out


def _read_back(folder: Path, target) -> SourceAdapter:
    cands, _, wrapper = ah.detect_adapter_dir(folder)
    if target not in cands:
        raise VerificationFailed(f"{folder}: the written config would be read as "
                                 f"{', '.join(c.name for c in cands)}, not {target.name}")
    return ah.read_adapter_dir(folder, target, wrapper)


def verify_adapters(src: SourceAdapter, out: SourceAdapter, *, probes: int = 4) -> VerifyReport:
    """Compare every module of ``src`` (under its convention) with ``out`` (under its own), one module at a time."""
    t0 = time.perf_counter()
    out_by = {e.module: e for e in out.modules}
    checks = []
    for e in src.modules:
        o = out_by.pop(e.module, None)
        if o is None:
            checks.append(missing(e.module))
            continue
        checks.append(compare(src.load(e), out.load(o), probes=probes))
        release_memory()
    checks += [extra(m) for m in out_by]
    return build_report(checks, time.perf_counter() - t0)


def _checked_deltas(ex: Execution, check: WriteCheck | None, allow_nonfinite: bool, notes: list[str]):
    """The output deltas in write order; each is checked against its source module while both are in memory."""
    for e in ex.source.modules:
        d = ex.source.load(e)
        bad = refuse_nonfinite(d, allow=allow_nonfinite)
        notes += bad
        o = ex.apply(d, e.kind)
        if check is not None:
            check.module(d, o, nonfinite=bool(bad))
        yield o
        nbytes = sum(t.nbytes for t in (d.A, d.B, d.bias) if t is not None)
        del d, o
        release_memory(nbytes)


def _write(ex: Execution, folder: Path, check: WriteCheck | None = None, allow_nonfinite: bool = False) -> list[str]:
    notes: list[str] = []
    notes += ah.write_adapter(folder, ex.target, ex.source.info, _checked_deltas(ex, check, allow_nonfinite, notes),
                              ex.plan.r, ex.plan.alpha_out, ex.tensors, safetensors=ex.safetensors,
                              head=ex.source.head, keep_head=ex.keep_head)
    return notes


def convert(src: str | Path, out: str | Path, *, to: str, from_: str | None = None, adapter: str | None = None,
            verify: bool = True, overwrite: bool = False, dry_run: bool = False, safetensors: bool = False,
            keep_head: bool = False, allow_nonfinite: bool = False) -> ConvertResult:
    """Convert SRC into the ``to`` convention at OUT, checking every module numerically.

    Each module is compared with its source while both are in memory, as it is written; the written folder is
    then read back as the target convention and must hold exactly what was checked (:class:`verify.WriteCheck`).
    A tensor holding NaN/Inf is refused unless ``allow_nonfinite``.

    Raises :class:`LoraMigrateError` for bad input (nothing is written) and :class:`VerificationFailed` when the
    check fails (nothing is left at OUT).
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    target = get_convention(to)
    refuse_overlap(src, out)
    source = open_source(src, from_)
    try:
        execs = _plans(source, target, adapter, safetensors, keep_head)
        results = []
        if dry_run:
            results = [AdapterResult(plan=ex.plan, output=str((out / ex.plan.output).resolve()), bytes=0,
                                     notes=ex.plan.notes, verify=None) for ex in execs]
        else:
            with few_threads(), atomic_output(out, overwrite=overwrite) as tmp:
                for ex in execs:
                    folder = tmp / ex.plan.output
                    check = WriteCheck() if verify else None
                    notes = [*ex.source.notes, *_write(ex, folder, check, allow_nonfinite)]
                    report = None
                    if check is not None:
                        back = _read_back(folder, target)
                        try:
                            report = check.confirm(((o.module, o) for o in back.modules), back.load)
                        finally:
                            back.store.close()
                        if not report.ok:
                            raise VerificationFailed(f"{ex.plan.adapter}: numeric check failed: {report.summary()}",
                                                     report)
                    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                    results.append(AdapterResult(plan=ex.plan, output=str((out / ex.plan.output).resolve()),
                                                 bytes=size, notes=notes, verify=report))
        return ConvertResult(source=str(src), output=str(out), source_convention=source.convention.name,
                             target_convention=target.name, layout=source.layout, reasons=source.reasons,
                             dry_run=dry_run, adapters=results, seconds=time.perf_counter() - t0)
    finally:
        source.close()


# ------------------------------------------------------------------------------------------------ verify


class VerifyResult(BaseModel):
    source: str
    output: str
    source_convention: str
    output_convention: str
    adapters: dict[str, VerifyReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.adapters.values())


def verify(src: str | Path, out: str | Path, *, from_: str | None = None, to: str | None = None) -> VerifyResult:
    """Check that OUT (read as ``to``, or as detected) holds the same ΔW as SRC (read as ``from_``)."""
    a = open_source(src, from_)
    try:
        b = open_source(out, to)
        try:
            names_a = {x.info.name: x for x in a.adapters}
            names_b = {x.info.name: x for x in b.adapters}
            if len(names_a) == 1 and len(names_b) == 1:
                pairs = [(next(iter(names_a.values())), next(iter(names_b.values())))]
            else:
                if set(names_a) != set(names_b):
                    raise LoraMigrateError(f"the two sides hold different adapters: {sorted(names_a)} vs "
                                           f"{sorted(names_b)}")
                pairs = [(names_a[n], names_b[n]) for n in sorted(names_a)]
            reports = {x.info.name: verify_adapters(x, y) for x, y in pairs}
            return VerifyResult(source=str(src), output=str(out), source_convention=a.convention.name,
                                output_convention=b.convention.name, adapters=reports)
        finally:
            b.close()
    finally:
        a.close()


# ------------------------------------------------------------------------------------------------ inspect


class ModuleInfo(BaseModel):
    module: str
    kind: str
    r: int
    shapes: dict[str, list[int]]
    dtype: str
    scale: float


class LoadCheck(BaseModel):
    """What another library version computes if it loads this file as it is."""

    convention: str
    library: str
    versions: str
    same: bool
    detail: str


class AdapterInspection(BaseModel):
    name: str
    convention: str
    r: int | None
    alpha: float | None
    scales: dict[str, str]  # layer kind → "s (rule)"
    gated: bool
    convertible: bool
    why_not: str | None
    modules: int
    layer_kinds: dict[str, int]
    dtypes: list[str]
    bytes: int
    head: str | None
    notes: list[str]
    as_loaded: list[LoadCheck]
    module_list: list[ModuleInfo]


class InspectResult(BaseModel):
    path: str
    layout: str
    convention: str
    library: str
    library_versions: str
    reasons: list[str]
    files: list[str]
    adapters: list[AdapterInspection]


def _as_loaded(a: SourceAdapter) -> list[LoadCheck]:
    """For each other convention of the family: the scales it would apply to this file, loaded as is."""
    version = a.info.wrapper.get("version")
    r, alpha = a.info.r, a.info.alpha
    out = []
    if a.gated or r is None or alpha is None:
        return out
    true = {e.kind: e.scale for e in a.modules}
    for c in CONVENTIONS:
        if c.family != a.convention.family or c is a.convention:
            continue
        if any(k not in c.scaling for k in true):
            continue
        shim = c.load_shim is not None and c.load_shim.applies(version, alpha, r)
        used = float(r) if shim else alpha
        wrong = [f"{k} ×{c.scale(k, used, r):g} instead of ×{s:g}" for k, s in sorted(true.items())
                 if abs(c.scale(k, used, r) / s - 1) > 1e-12]
        why = f" (its load shim sets alpha := r for version {version!r})" if shim else ""
        detail = ("same ΔW" + why) if not wrong else ("WRONG: " + ", ".join(wrong) + why +
                                                      f"; convert with --to {c.name}")
        out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=not wrong,
                             detail=detail))
    return out


def _inspect_adapter(a: SourceAdapter) -> AdapterInspection:
    kinds: dict[str, int] = {}
    scales: dict[str, str] = {}
    for e in a.modules:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
        scales.setdefault(e.kind, f"{e.scale:g} ({e.provenance.describe()})")
    dtypes = sorted({str(m.dtype).removeprefix("torch.") for e in a.modules for m in e.metas.values()})
    why = None
    if a.gated:
        why = "gated LoRA: the gate replaces alpha/r per input; no fixed-scale convention can express it"
    mods = [ModuleInfo(module=e.module, kind=e.kind, r=e.rank, shapes={p: list(m.shape) for p, m in e.metas.items()},
                       dtype=str(e.metas["b"].dtype).removeprefix("torch."), scale=e.scale) for e in a.modules]
    head = None
    if a.head is not None:
        head = f"{', '.join(f.name for f in a.head.files)}: {a.head.reason}"
    return AdapterInspection(name=a.info.name, convention=a.convention.name, r=a.info.r, alpha=a.info.alpha,
                             scales=scales, gated=a.gated, convertible=why is None, why_not=why,
                             modules=len(a.modules), layer_kinds=kinds, dtypes=dtypes, bytes=a.nbytes, head=head,
                             notes=a.notes, as_loaded=_as_loaded(a), module_list=mods)


def inspect(path: str | Path, *, from_: str | None = None) -> InspectResult:
    """Name the convention and version of PATH with the reasons, and describe every adapter in it."""
    s = open_source(path, from_)
    try:
        files = sorted({str(f) for a in s.adapters for f in a.files})
        return InspectResult(path=str(path), layout=s.layout, convention=s.convention.name,
                             library=s.convention.library, library_versions=s.convention.versions,
                             reasons=s.reasons, files=files, adapters=[_inspect_adapter(a) for a in s.adapters])
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ conventions


class ConventionInfo(BaseModel):
    name: str
    library: str
    versions: str
    aliases: list[str]
    scaling: dict[str, str]
    notes: str
    writes: str
    version_written: str


def conventions() -> list[ConventionInfo]:
    """Every convention lora-migrate reads and writes, with its scaling rule."""
    return [ConventionInfo(name=c.name, library=c.library, versions=c.versions, aliases=list(c.aliases),
                           scaling={k: v.value for k, v in c.scaling.items()}, notes=c.scaling_notes,
                           writes=f"{c.config_file} + {c.weights_write}", version_written=c.version_to_write)
            for c in CONVENTIONS]


__all__ = ["ConvertResult", "InspectResult", "VerifyResult", "convert", "conventions", "inspect", "verify"]
