"""The Python API. Every function mirrors a CLI command and returns the pydantic object that ``--json`` prints.

    >>> import lora_migrate
    >>> r = lora_migrate.convert("at31_adapter", "out", to="adapters-1.0")
    >>> r.adapters[0].verify.ok
    True
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pydantic import BaseModel, computed_field

from .detect import open_source
from .errors import LoraMigrateError, VerificationFailed
from .formats import adapterhub as ah
from .formats import peft as pf
from .resolve import resolve_source
from .io import atomic_output, refuse_overlap
from .io._common import few_threads, release_memory
from .execution import AdapterPlan, Execution
from .plan import lorax_drops, plan_adapter
from .schemas import CONVENTIONS, Scaling, get_convention
from .schemas.base import plain_folder_name
from .source import Source, SourceAdapter, base_model_config
from .rules.values import refuse_nonfinite
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
def _initials(initial_adapter: str | Path | None, base_model: str | Path | None, out: Path | None = None):
    """Yields ``adapter → its initial adapter or None`` for PiSSA-style sources: the one saved before training
    (``initial_adapter``), or one rebuilt from the original base model (``base_model``); closes them after."""
    from .initial import open_base, rebuilt_initial, saved_initial
    from .schemas.peft import mutating_init

    if initial_adapter is not None and base_model is not None:
        raise LoraMigrateError("--initial-adapter and --base-model are two ways to the same initial adapter; "
                               "pass one")
    initial = base = None
    try:
        if initial_adapter is not None:
            initial = open_source(resolve_source(initial_adapter))
        if base_model is not None:
            base = open_base(base_model)
        for x in (initial, base):
            if x is not None and out is not None:
                refuse_overlap(x.path, out)

        def initial_for(a: SourceAdapter) -> SourceAdapter | None:
            if base is not None and (mutating_init(a.init) or "embedding" not in a.features):
                return rebuilt_initial(a, base)
            if initial is None:
                return None
            by = {x.info.name: x for x in initial.adapters}
            init = by.get(a.info.name) or (initial.adapters[0] if len(initial.adapters) == 1 else None)
            if init is None:
                raise LoraMigrateError(f"--initial-adapter holds no adapter named {a.info.name!r}")
            return saved_initial(a, init)

        yield initial_for
    finally:
        for x in (initial, base):
            if x is not None:
                x.close()


def _plans(source: Source, target, adapter: str | None, safetensors: bool, keep_head: bool,
           initial_for=lambda a: None, model_type: str | None = None,
           num_layers: int | None = None) -> list[Execution]:
    from .rules.select import select_adapters

    names = select_adapters([a.info.name for a in source.adapters], adapter)
    single = len(source.adapters) == 1 or adapter is not None
    out = []
    for a in source.adapters:
        if a.info.name in names:
            sub = "." if single else a.info.name
            if sub != "." and not plain_folder_name(sub):
                raise LoraMigrateError(f"adapter name {sub!r} cannot be a folder name")
            out.append(plan_adapter(a, target, sub, safetensors=safetensors, keep_head=keep_head,
                                    initial=initial_for(a), model_type=model_type,
                                    num_layers=num_layers))
    return out


def _read_back(folder: Path, target, name: str, model_config: dict | None = None) -> SourceAdapter:
    if target.family == "peft":
        raw = pf.read_json(folder / "adapter_config.json")
        if target.serving is None:  # a server reads any era's file its own way
            cands, _ = pf.eras_for(raw)
            if target not in cands:
                raise VerificationFailed(f"{folder}: the written config would be read as "
                                         f"{', '.join(c.name for c in cands)}, not {target.name}")
        return pf.read_peft_dir(folder, target, raw, name, model_config)
    cands, _, wrapper = ah.detect_adapter_dir(folder)
    if target not in cands:
        raise VerificationFailed(f"{folder}: the written config would be read as "
                                 f"{', '.join(c.name for c in cands)}, not {target.name}")
    return ah.read_adapter_dir(folder, target, wrapper)


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
        if check is not None:
            # refuse_nonfinite scanned d; a PiSSA reference also holds the initial factors, unscanned
            check.module(ref, o, nonfinite=bool(bad), finite_source=not bad and ex.initial is None)
        yield o
        nbytes = sum(t.nbytes for t in (d.A, d.B, d.bias) if t is not None)
        del d, o
        release_memory(nbytes)


def _extras_checks(src: SourceAdapter, out: SourceAdapter, keys: list[str] | None = None) -> list:
    """Non-LoRA tensors (PEFT ``modules_to_save`` and the like) must be carried over bit for bit: ``keys``, by
    default all of the source's, except the frozen base copies a server's output leaves out
    (``plan._without_base_copies``)."""
    serving = out.convention.serving
    if keys is None:
        keys = [k for k in src.extras if not (serving and serving.skips_frozen_base_copies
                                               and pf.is_frozen_base_copy(k))]
    out_extras = set(out.extras)
    return [missing(k, "non-LoRA tensor not carried over bit for bit") for k in keys
            if not (k in out_extras and torch.equal(src.store.get(k), out.store.get(k)))]


def _write(ex: Execution, folder: Path, deltas=None) -> list[str]:
    deltas = ex.deltas() if deltas is None else deltas
    if ex.target.family == "peft":
        return _write_peft(ex, folder, deltas)
    return ah.write_adapter(folder, ex.target, ex.source.info, deltas, ex.plan.r, ex.plan.alpha_out,
                            ex.tensors, safetensors=ex.safetensors, head=ex.source.head, keep_head=ex.keep_head,
                            config=ex.config)


def _write_peft(ex: Execution, folder: Path, deltas) -> list[str]:
    keys = ex.target.keys
    planned = [(keys.key(pf.tensor_param(k, p), m), shape, dtype) for m, k, p, shape, dtype in ex.tensors]
    store = ex.source.store
    planned += [(k, tuple(store.meta(k).shape), store.meta(k).dtype) for k in ex.extras]

    def tensors():
        for d in deltas:
            for p, t in (("a", d.A), ("b", d.B), ("bias", d.bias), ("magnitude", d.magnitude)):
                if t is not None:
                    yield keys.key(pf.tensor_param(d.kind, p), d.module), t
        for k in ex.extras:
            yield k, store.get(k)

    pf.write_peft(folder, ex.target, ex.config, tensors(), planned, safetensors=not ex.target.weights_write
                  .endswith(".bin"))
    return [f"copied {len(ex.extras)} non-LoRA tensors unchanged"] if ex.extras else []


def convert(src: str | Path, out: str | Path, *, to: str, from_: str | None = None, adapter: str | None = None,
            verify: bool = True, overwrite: bool = False, dry_run: bool = False, safetensors: bool = False,
            keep_head: bool = False, initial_adapter: str | Path | None = None, base_model: str | Path | None = None,
            model_type: str | None = None, allow_nonfinite: bool = False,
            num_layers: int | None = None) -> ConvertResult:
    """Convert SRC into the ``to`` convention at OUT, checking every module numerically.

    Each module is compared with its source while both are in memory, as it is written; the written folder is
    then read back as the target convention and must hold exactly what was checked (:class:`check.written.WriteCheck`).
    For PiSSA-style sources the reference is the source expressed against the original weights, s·(BA − B₀A₀),
    with the initial adapter saved before training (``initial_adapter``) or rebuilt from the original base model
    (``base_model``; full-SVD PiSSA and OLoRA): each module's initial factors are read or computed once.
    A tensor holding NaN/Inf is refused unless ``allow_nonfinite``. ``num_layers`` (``--to lorax`` only): the base
    model's layer count, for an adapter on only some layers (each layer type is completed with zero adapters).

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
    refuse_overlap(src, out)
    source = open_source(src, from_)
    try:
        for a in source.adapters:  # the factor of scaled embeddings (PEFT sources): the base config.json, or
            if "embedding" not in a.features or a.convention.family != "peft":  # the model type alone
                continue
            if base_model is not None:
                pf.set_embed_scales(a, base_model_config(resolve_source(base_model)))
            elif model_type and a.base_config is None:
                pf.set_embed_scales(a, {"model_type": model_type}, type_only=True)
        with _initials(initial_adapter, base_model, out) as initial_for:
            execs = _plans(source, target, adapter, safetensors, keep_head, initial_for, model_type,
                           num_layers)
            results = []
            if dry_run:
                results = [AdapterResult(plan=ex.plan, output=str((out / ex.plan.output).resolve()), bytes=0,
                                         notes=ex.plan.notes, verify=None) for ex in execs]
            else:
                with few_threads(), atomic_output(out, overwrite=overwrite) as tmp:
                    results = [_write_checked(ex, tmp, out, target, verify, allow_nonfinite) for ex in execs]
        return ConvertResult(source=str(src), output=str(out), source_convention=source.convention.name,
                             target_convention=target.name, layout=source.layout, reasons=source.reasons,
                             dry_run=dry_run, adapters=results, seconds=time.perf_counter() - t0)
    finally:
        source.close()


def _write_checked(ex: Execution, tmp: Path, out: Path, target, verify: bool, allow_nonfinite: bool
                   ) -> AdapterResult:
    """Write one adapter into ``tmp`` checking every module, then confirm the check on the files read back."""
    folder = tmp / ex.plan.output
    check = WriteCheck() if verify else None
    notes = list(ex.plan.notes)
    notes += _write(ex, folder, _checked_deltas(ex, check, allow_nonfinite, notes))
    report = None
    if verify:
        back = _read_back(folder, target, ex.source.info.name, ex.source.base_config)
        try:
            report = check.confirm(back, _extras_checks(ex.source, back, ex.extras))
        finally:
            back.store.close()
        if not report.ok:
            raise VerificationFailed(f"{ex.plan.adapter}: numeric check failed: {report.summary()}", report)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return AdapterResult(plan=ex.plan, output=str((out / ex.plan.output).resolve()), bytes=size, notes=notes,
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
           initial_adapter: str | Path | None = None, base_model: str | Path | None = None) -> VerifyResult:
    """Check that OUT (read as ``to``, or as detected) holds the same ΔW as SRC (read as ``from_``).

    For a PiSSA-style SRC, OUT is compared with s·(BA − B₀A₀), the initial adapter saved (``initial_adapter``) or
    rebuilt from the original base model (``base_model``), as ``convert`` does."""
    a = open_source(resolve_source(src), from_)
    try:
        b = open_source(resolve_source(out), to)
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
            with _initials(initial_adapter, base_model) as initial_for:
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


def _as_loaded_peft(a: SourceAdapter) -> list[LoadCheck]:
    """For each other PEFT-family convention: what it computes loading this folder as it is (peft.md §1.3, §4.5,
    §7, §8): its pattern matching, whether it knows use_rslora, fields it chokes on, tensors it drops."""
    from .formats.peft import PEFT_ONLY, module_r_alpha
    from .schemas.peft import FIELDS_SINCE, conv_requirements, fields_of

    cfg = a.peft
    out = []
    needs = conv_requirements(a.conv_dims, "dora" in a.features)
    for c in CONVENTIONS:
        if c.family != "peft" or c is a.convention:
            continue
        missing = [(what, since) for what, since in needs
                   if c.serving is None and c.releases_with(since) == "none"]
        if missing:
            out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                 detail=f"FAILS to load: {missing[0][0]} needs PEFT ≥ {missing[0][1]} (an older "
                                        "PEFT raises on the target module); no conversion can change that"))
            continue
        problems = []
        if c.strict_config_fields:
            unknown = sorted(k for k, v in a.info.config.items() if k not in fields_of("0.13"))
            if unknown:
                out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                     detail=f"FAILS to load: TypeError: unexpected keyword argument "
                                            f"{unknown[0]!r}; convert with --to {c.name}"))
                continue
        drops = {**c.serving.refuses, **c.serving.drops} if c.serving else {}
        refused = [drops[f] for f in sorted(a.features) if f in drops]
        caveats = []
        for f in sorted(a.features & set(PEFT_ONLY)):  # a field the era lacks is dropped on load (≥ 0.14)
            since = FIELDS_SINCE.get(f, "0")
            have = "none" if c.serving else c.releases_with(since)
            if have == "none":
                refused.append(f"ignores {f} (PEFT ≥ {since}: {PEFT_ONLY[f]}), so those tensors are unused")
            elif have == "some":
                caveats.append(f"{f} needs PEFT ≥ {since}; earlier releases ignore it")
        problems += refused
        rs = cfg.use_rslora and "rslora" in c.features
        wrong = []
        unsure = None
        for e in a.modules:
            if "patterns" in c.features:
                r, alpha = module_r_alpha(c.pattern_matching, e.module, cfg.r, float(cfg.lora_alpha),
                                          cfg.rank_pattern, cfg.alpha_pattern)
            else:
                r, alpha = cfg.r, float(cfg.lora_alpha)
            s = (Scaling.ALPHA_OVER_SQRT_R if rs else Scaling.ALPHA_OVER_R).scale(alpha, r)
            why = ""
            if e.kind == "embedding" and e.embed_scale != 1.0:  # × embed_scale from PEFT 0.18 (#2825)
                if c.lora_embedding_scaled is None and e.embed_scale is not None:
                    refused.append(f"{e.module} is a scaled embedding (embed_scale {e.embed_scale:g}), and whether "
                                   f"{c.name} multiplies its LoRA output by that is not established")
                    problems.append(refused[-1])
                    continue
                if e.embed_scale is None and c.lora_embedding_scaled is not None \
                        and c.lora_embedding_scaled != a.convention.lora_embedding_scaled:
                    unsure = (f"{e.module} differs if the base model scales its embeddings (Gemma3, BART with "
                              "scale_embedding): PEFT ≥ 0.18 multiplies embedding LoRA by that embed_scale (#2825), "
                              "unknown without the base model's config.json (converting needs --base-model DIR)")
                elif c.lora_embedding_scaled and e.embed_scale:
                    s *= e.embed_scale
                elif e.embed_scale:
                    why = f" (embed_scale {e.embed_scale:g} not applied before PEFT 0.18, #2825)"
            if r != e.rank:
                wrong.append(f"{e.module} built at r={r} for a rank-{e.rank} tensor")
            elif abs(s / e.scale - 1) > 1e-12:
                wrong.append(f"{e.module} ×{s:g} instead of ×{e.scale:g}{why}")
        if wrong:
            problems.append(f"{len(wrong)} of {len(a.modules)} modules: {wrong[0]}")
        drops = lorax_drops(a) if c.serving and c.serving.drops_partial_layer_types else None
        if drops is not None and drops[0]:
            problems.append(drops[1])
        if cfg.use_rslora and not rs:
            who = c.serving.rslora_note if c.serving else ""
            problems.append(f"{who}ignores use_rslora (alpha/r, not alpha/√r); the fix is alpha' = alpha·√r "
                            f"= {cfg.lora_alpha * math.sqrt(cfg.r):g}, not the posted alpha·r = "
                            f"{cfg.lora_alpha * cfg.r:g}, which over-scales by √r = {math.sqrt(cfg.r):.3g}")
        fix = f"{c.name} cannot hold it, so converting is refused too" if refused else f"convert with --to {c.name}"
        if drops is not None and drops[0] and not refused:
            fix += " --num-layers N (the model's layer count: each type gets zero adapters where it lacks a layer)"
        detail = "same ΔW" if not problems else "WRONG: " + "; ".join(problems) + f"; {fix}"
        if drops is not None and not drops[0]:
            detail += f"; but {drops[1]}: convert with --to lorax --num-layers N"
        for caveat in [*caveats, *([unsure] if unsure else [])]:
            detail += f"; but {caveat}"
        out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=not problems,
                             detail=detail))
    return out


def _as_loaded(a: SourceAdapter) -> list[LoadCheck]:
    """For each other convention of the family: the scales it would apply to this file, loaded as is."""
    if a.convention.family == "peft":
        return _as_loaded_peft(a)
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
                             notes=a.notes + _init_notes(a), as_loaded=_as_loaded(a), module_list=mods)


def _init_notes(a: SourceAdapter) -> list[str]:
    """What an init that mutated W means for whoever loads the adapter (peft.md §5.1)."""
    from .schemas.peft import mutating_init, rebuild_rule

    if not mutating_init(a.init):
        return []
    how = "--base-model BASE (the original model) or --initial-adapter DIR" if rebuild_rule(a.init) else \
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
