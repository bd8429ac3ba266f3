"""The Python API. Every function mirrors a CLI command and returns the pydantic object that ``--json`` prints.

    >>> import lora_migrate
    >>> r = lora_migrate.convert("at31_adapter", "out", to="adapters-1.0")
    >>> r.adapters[0].verify.ok
    True
"""

from __future__ import annotations

import time
from dataclasses import replace
from contextlib import contextmanager
from pathlib import Path

import torch

from pydantic import BaseModel, computed_field

from .codecs import PlanOptions, codec_for
from .detect import open_source
from .errors import LoraMigrateError, VerificationFailed
from .findings import LoadCheck
from .resolve import resolve_source
from .io import atomic_file, atomic_output, refuse_overlap
from .io._common import few_threads, release_memory
from .execution import AdapterPlan, Execution
from .plan import plan_adapter
from .schemas import CONVENTIONS, get_convention
from .schemas.base import plain_folder_name
from .source import Source, SourceAdapter, base_model_config
from .rules.values import refuse_nonfinite, refuse_overflow
from .check.compare import compare
from .check.report import VerifyReport, build_report, extra, missing
from .check.written import WriteCheck


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

    @computed_field
    @property
    def ok(self) -> bool:
        return all(a.verify is None or a.verify.ok for a in self.adapters)


# ------------------------------------------------------------------------------------------------ convert


@contextmanager
def _initials(initial_adapter: str | Path | None, base_model: str | Path | None, out: Path | None = None,
              reads_config=lambda a: False):
    """Yields ``adapter → its initial adapter or None`` for PiSSA-style sources: the one saved before training
    (``initial_adapter``), or one rebuilt from the original base model (``base_model``); closes them after.
    ``reads_config(a)``: a codec reads the base model's config.json for ``a`` (then ``base_model`` is for that,
    and with both given the initial adapter is the saved one)."""
    from .initial import open_base, rebuilt_initial, saved_initial

    initial = None
    opened = []  # the base model's weights, opened when an adapter needs its initial adapter rebuilt

    def base():
        if not opened:
            opened.append(open_base(base_model))
            if out is not None:
                refuse_overlap(opened[0].path, out)
        return opened[0]

    try:
        if initial_adapter is not None:
            initial = open_source(resolve_source(initial_adapter))
            if out is not None:
                refuse_overlap(initial.path, out)

        def initial_for(a: SourceAdapter) -> SourceAdapter | None:
            config_only = "embedding" in a.features or reads_config(a)  # what --base-model is for besides PiSSA
            if initial is not None and base_model is not None and a.init_mutates and not config_only:
                raise LoraMigrateError("--initial-adapter and --base-model are two ways to the same initial adapter "
                                       "(the target needs no base config.json); pass one")
            if base_model is not None and initial is None and (a.init_mutates or not config_only):
                return rebuilt_initial(a, base() if a.init_mutates else None)
            if initial is None:
                return None
            by = {x.info.name: x for x in initial.adapters}
            init = by.get(a.info.name) or (initial.adapters[0] if len(initial.adapters) == 1 else None)
            if init is None:
                raise LoraMigrateError(f"--initial-adapter holds no adapter named {a.info.name!r}")
            return saved_initial(a, init)

        yield initial_for
    finally:
        for x in (initial, *opened):
            if x is not None:
                x.close()


def _plans(source: Source, target, adapter: str | None, opts: PlanOptions,
           initial_for=lambda a: None) -> list[Execution]:
    from .rules.select import select_adapters

    names = select_adapters([a.info.name for a in source.adapters], adapter)
    single = len(source.adapters) == 1 or adapter is not None
    out = []
    for a in source.adapters:
        if a.info.name in names:
            sub = "." if single else a.info.name
            if sub != "." and not plain_folder_name(sub):
                raise LoraMigrateError(f"adapter name {sub!r} cannot be a folder name")
            out.append(plan_adapter(a, target, sub, replace(opts), initial=initial_for(a)))
    return out


def verify_adapters(src: SourceAdapter, out: SourceAdapter, *, probes: int = 4, initial: SourceAdapter | None = None
                    ) -> VerifyReport:
    """Compare every module of ``src`` (under its convention) with ``out`` (under its own), one module at a time.

    With ``initial`` (PiSSA-style sources) the reference is the update relative to the original weights,
    s·(BA − B₀A₀), which the rank-2r output must reproduce. A module only the output has is compared with no
    update at all: it passes only as a zero adapter (A or B all zero, e.g. LoRAX's layer fills), else it fails."""
    from .rules.coverage import zero_adapter
    from .rules.shape import pissa_to_lora

    init_by = {e.module: e for e in initial.modules} if initial is not None else {}
    t0 = time.perf_counter()
    out_by = {e.module: e for e in out.modules}
    checks = []
    for e in src.modules:
        o = out_by.pop(e.module, None)
        if o is None:
            checks.append(missing(e.module))
            continue
        d_src, d_out = src.load(e), out.load(o)
        if e.module in init_by:
            d_src = pissa_to_lora(d_src, initial.load(init_by[e.module]))
        checks.append(compare(d_src, d_out, probes=probes))
        release_memory()
    for m, o in out_by.items():
        d = out.load(o)
        zero = d.A is not None and d.kind != "ia3" and not (d.A.any() and d.B.any())
        checks.append(compare(zero_adapter(d), d, probes=probes) if zero else extra(m))
    checks += _extras_checks(src, out)
    return build_report(checks, time.perf_counter() - t0)


def _checked_deltas(ex: Execution, check: WriteCheck | None, allow_nonfinite: bool, notes: list[str]):
    """The output deltas in write order. Each source module is refused if it holds NaN/Inf (unless allowed) and,
    with ``check``, compared with its output while both are in memory (see :class:`check.written.WriteCheck`)."""
    for e in ex.entries():
        d = ex.load(e)
        bad = refuse_nonfinite(d, allow=allow_nonfinite)
        notes += bad
        ref = ex.reference(d, e)
        o = ex.apply(d, e)
        if not bad and o.B is not d.B:  # B was rescaled: c·B may overflow its dtype
            refuse_overflow(o, e.scale, d.B)
        if check is not None:
            # refuse_nonfinite scanned d; a PiSSA reference also holds the initial factors, unscanned
            check.module(ref, o, nonfinite=bool(bad), finite_source=not bad and ex.initial is None)
        yield o
        nbytes = sum(t.nbytes for t in (d.A, d.B, d.bias) if t is not None)
        del d, o
        release_memory(nbytes)


def _extras_checks(src: SourceAdapter, out: SourceAdapter, keys: list[str] | None = None) -> list:
    """Non-LoRA tensors (PEFT ``modules_to_save`` and the like) must be carried over bit for bit: ``keys``, by
    default those the output's codec says it carries (:meth:`Codec.extras_to_check`)."""
    if keys is None:
        keys = codec_for(out.convention).extras_to_check(src, out)
    out_extras = set(out.extras)
    return [missing(k, "non-LoRA tensor not carried over bit for bit") for k in keys
            if not (k in out_extras and torch.equal(src.store.get(k), out.store.get(k)))]


def convert(src: str | Path, out: str | Path, *, to: str, from_: str | None = None, adapter: str | None = None,
            verify: bool = True, overwrite: bool = False, dry_run: bool = False, safetensors: bool = False,
            keep_head: bool = False, initial_adapter: str | Path | None = None, base_model: str | Path | None = None,
            model_type: str | None = None, allow_nonfinite: bool = False,
            num_layers: int | None = None, outtype: str | None = None,
            drop: tuple[str, ...] = (), component: str | None = None) -> ConvertResult:
    """Convert SRC into the ``to`` convention at OUT, checking every module numerically.

    Each module is compared with its source while both are in memory, as it is written; the written folder is
    then read back as the target convention and must hold exactly what was checked (:class:`check.written.WriteCheck`).
    For PiSSA-style sources the reference is the source expressed against the original weights, s·(BA − B₀A₀),
    with the initial adapter saved before training (``initial_adapter``) or rebuilt from the original base model
    (``base_model``; full-SVD PiSSA and OLoRA): each module's initial factors are read or computed once.
    A tensor holding NaN/Inf is refused unless ``allow_nonfinite``. ``num_layers`` (``--to lorax`` only): the base
    model's layer count, for an adapter on only some layers (each layer type is completed with zero adapters).
    ``outtype``: the written factors' dtype, for targets that choose it (GGUF). ``drop``: layers the user lets the
    target leave out where its loader has no place for them (the report names each). ``component``: SRC is an
    adapter of one pipeline component saved without its prefix (PEFT on a bare UNet): its modules go into that
    component (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``), for targets that have components.

    Raises :class:`LoraMigrateError` for bad input (nothing is written) and :class:`VerificationFailed` when the
    check fails (nothing is left at OUT).
    """
    t0 = time.perf_counter()
    src, out = Path(resolve_source(src)), Path(out)
    target = get_convention(to)
    if num_layers is not None and not (target.serving and target.serving.drops_partial_layer_types):
        fill = [c.name for c in CONVENTIONS if c.serving and c.serving.drops_partial_layer_types]
        raise LoraMigrateError(f"--num-layers is for --to {' / '.join(fill)} (which drops a layer type missing from "
                               f"any layer); {target.name} loads each module on its own")
    codec = codec_for(target)
    if codec.output == "file" and codec.file_suffix and out.suffix != codec.file_suffix:
        raise LoraMigrateError(f"{target.name} writes one file: OUT must end in {codec.file_suffix} (got {out})")
    refuse_overlap(src, out)
    base_config = base_model_config(resolve_source(base_model)) if base_model is not None else None
    opts = PlanOptions(safetensors=safetensors, keep_head=keep_head, model_type=model_type, num_layers=num_layers,
                       base_model=None if base_model is None else str(base_model), base_config=base_config,
                       outtype=outtype, drop=tuple(drop), component=component)
    source = open_source(src, from_)
    try:
        for a in source.adapters:  # what the user supplied that the source's own codec needs (embedding scales)
            codec_for(a.convention).prepare(a, opts)
            if component is not None:  # the pipeline component of a bare adapter, named as the target names it
                codec.place_in_component(a, target, component)
        reads = lambda a: codec.uses_base_config(a, target) or codec_for(a.convention).uses_base_config(a, target)  # noqa: E731
        with _initials(initial_adapter, base_model, out, reads) as initial_for:
            execs = _plans(source, target, adapter, opts, initial_for)
            if codec.output == "file" and len(execs) > 1:
                raise LoraMigrateError(f"{target.name} holds one adapter per file, and {src} has "
                                       f"{len(execs)} ({', '.join(ex.plan.adapter for ex in execs)}); pick one "
                                       "with --adapter")
            results = []
            if dry_run:
                results = [AdapterResult(plan=ex.plan, output=str((out / ex.plan.output).resolve()), bytes=0,
                                         notes=ex.plan.notes, verify=None) for ex in execs]
            elif codec.output == "file":
                with few_threads(), atomic_file(out, overwrite=overwrite) as dest:
                    results = [_write_checked(ex, dest, out, opts, verify, allow_nonfinite) for ex in execs]
            else:
                with few_threads(), atomic_output(out, overwrite=overwrite) as tmp:
                    results = [_write_checked(ex, tmp / ex.plan.output, out / ex.plan.output, opts, verify,
                                              allow_nonfinite) for ex in execs]
        return ConvertResult(source=str(src), output=str(out), source_convention=source.convention.name,
                             target_convention=target.name, layout=source.layout, reasons=source.reasons,
                             dry_run=dry_run, adapters=results, seconds=time.perf_counter() - t0)
    finally:
        source.close()


def _write_checked(ex: Execution, dest: Path, final: Path, opts: PlanOptions, verify: bool,
                   allow_nonfinite: bool) -> AdapterResult:
    """Write one adapter to ``dest`` (its folder or file in the temporary output) checking every module, then
    confirm the check on what was written, read back as the target reads it. ``final``: where it will be."""
    codec = codec_for(ex.target)
    check = WriteCheck() if verify else None
    notes = list(ex.plan.notes)
    notes += codec.write(ex, dest, _checked_deltas(ex, check, allow_nonfinite, notes))
    report = None
    if verify:
        back = codec.read_back(dest, ex.target, ex.source.info.name,
                               replace(opts, base_config=ex.source.base_config if ex.source.base_config is not None
                                       else opts.base_config))
        try:
            report = check.confirm(back, _extras_checks(ex.source, back, ex.extras))
        finally:
            back.store.close()
        if not report.ok:
            raise VerificationFailed(f"{ex.plan.adapter}: numeric check failed: {report.summary()}", report)
    size = dest.stat().st_size if dest.is_file() else sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return AdapterResult(plan=ex.plan, output=str(final.resolve()), bytes=size, notes=notes,
                         verify=report)


# ------------------------------------------------------------------------------------------------ verify


class VerifyResult(BaseModel):
    source: str
    output: str
    source_convention: str
    output_convention: str
    adapters: dict[str, VerifyReport]

    @computed_field
    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.adapters.values())


def verify(src: str | Path, out: str | Path, *, from_: str | None = None, to: str | None = None,
           initial_adapter: str | Path | None = None, base_model: str | Path | None = None,
           component: str | None = None) -> VerifyResult:
    """Check that OUT (read as ``to``, or as detected) holds the same ΔW as SRC (read as ``from_``);
    ``component``: SRC's modules belong to that pipeline component of OUT (as ``convert --component``).

    For a PiSSA-style SRC, OUT is compared with s·(BA − B₀A₀), the initial adapter saved (``initial_adapter``) or
    rebuilt from the original base model (``base_model``), as ``convert`` does."""
    a = open_source(resolve_source(src), from_)
    try:
        b = open_source(resolve_source(out), to)
        try:
            # what each side's codec needs of the base model (GGUF's and torchtune's q/k heads): --base-model,
            # else the config.json the source found
            cfg = base_model_config(resolve_source(base_model)) if base_model is not None else None
            cfg = cfg or next((x.base_config for x in a.adapters if x.base_config is not None), None)
            opts = PlanOptions(base_model=None if base_model is None else str(base_model), base_config=cfg)
            for x in (*a.adapters, *b.adapters):
                codec_for(x.convention).prepare(x, opts)
            for x in a.adapters if component is not None else ():
                codec_for(b.convention).place_in_component(x, b.convention, component)
            names_a = {x.info.name: x for x in a.adapters}
            names_b = {x.info.name: x for x in b.adapters}
            if len(names_a) == 1 and len(names_b) == 1:
                pairs = [(next(iter(names_a.values())), next(iter(names_b.values())))]
            else:
                if set(names_a) != set(names_b):
                    raise LoraMigrateError(f"the two sides hold different adapters: {sorted(names_a)} vs "
                                           f"{sorted(names_b)}")
                pairs = [(names_a[n], names_b[n]) for n in sorted(names_a)]
            reads = lambda x: any(codec_for(c).uses_base_config(x, b.convention)  # noqa: E731
                                  for c in (x.convention, b.convention))
            with _initials(initial_adapter, base_model, reads_config=reads) as initial_for:
                reports = {x.info.name: verify_adapters(x, y, initial=initial_for(x)) for x, y in pairs}
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
    model_type: str | None = None  # the base model's type (llama, sd1, sdxl, flux, …), where known
    components: list[str] = []  # image models: the pipeline components it adapts


class InspectResult(BaseModel):
    path: str
    layout: str
    convention: str
    library: str
    library_versions: str
    reasons: list[str]
    files: list[str]
    adapters: list[AdapterInspection]


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
                             notes=a.notes + _init_notes(a), as_loaded=codec_for(a.convention).as_loaded(a),
                             module_list=mods, model_type=a.info.model_type, components=list(a.info.components))


def _init_notes(a: SourceAdapter) -> list[str]:
    """What an init that mutated W means for whoever loads the adapter (peft.md §5.1)."""
    if not a.init_mutates:
        return []
    how = "--base-model BASE (the original model) or --initial-adapter DIR" if a.init_rebuild else \
        "--initial-adapter DIR (the adapter saved before training)"
    return [f"init_lora_weights={a.init!r} changed the base weights: the adapter holds only on the residual model "
            "(PEFT rebuilds it on load; other libraries and servers apply it to the original weights); convert with "
            f"{how} for rank-2r LoRA against the original weights"]


def inspect(path: str | Path, *, from_: str | None = None) -> InspectResult:
    """Name the convention and version of PATH with the reasons, and describe every adapter in it."""
    s = open_source(resolve_source(path), from_)
    try:
        files = sorted({str(f) for a in s.adapters for f in a.files})
        return InspectResult(path=str(path), layout=s.layout, convention=s.convention.name,
                             library=s.convention.library, library_versions=s.convention.versions,
                             reasons=s.reasons, files=files, adapters=[_inspect_adapter(a) for a in s.adapters])
    finally:
        s.close()


__all__ = ["ConvertResult", "InspectResult", "VerifyResult", "convert", "inspect", "verify"]
