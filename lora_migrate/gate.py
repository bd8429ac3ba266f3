"""``lora-migrate check``: a gate before an upload or a commit.

It fails (``CheckResult.ok`` is False, the CLI exits 1) when the convention is ambiguous or mis-declared, when
ranks or shapes are inconsistent or values are NaN/Inf, and when a declared conversion fails its numeric check.

The checks that hold for every convention are :data:`ADAPTER_CHECKS` (ranks and shapes, NaN/Inf, an alpha the
adapter's own library ignores); each codec adds its own (:meth:`Codec.config_findings` on the raw files before
anything is read, :meth:`Codec.findings` on a read adapter, :meth:`Codec.expect_findings` for ``--expect``), so a
new convention adds its findings without touching the runner.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, computed_field

from .errors import DetectionError, LoraMigrateError, UnsupportedFeature, VerificationFailed
from .findings import Finding
from .resolve import resolve_source


class ConversionCheck(BaseModel):
    target: str
    ok: bool
    summary: str  # the numeric check's figures (or why the conversion was refused)


class CheckResult(BaseModel):
    path: str
    convention: str | None
    expect: str | None
    adapters: list[str]
    modules_checked: int
    findings: list[Finding]
    conversion: ConversionCheck | None
    seconds: float

    @computed_field
    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class AdapterCheck:
    """A check on one read adapter (a :class:`~lora_migrate.source.SourceAdapter`), whatever its convention."""

    code: str
    fn: Callable  # (SourceAdapter) -> list[Finding]


ADAPTER_CHECKS: list[AdapterCheck] = []


def adapter_check(code: str):
    def deco(fn):
        ADAPTER_CHECKS.append(AdapterCheck(code, fn))
        return fn
    return deco


def _err(code, message, adapter=None, module=None) -> Finding:
    return Finding(level="error", code=code, message=message, adapter=adapter, module=module)


# ------------------------------------------------------------------------------------ checks: every family


@adapter_check("alpha-ignored")
def _alpha_ignored(a) -> list[Finding]:
    """Data-driven from the schemas: the adapter's own convention applies a scale of 1 to a layer kind (alpha has
    no effect), yet another version of the same library would apply alpha: the declared alpha is silently dropped
    here and silently used there."""
    from .schemas import CONVENTIONS, Scaling

    conv, alpha, r = a.convention, a.info.alpha, a.info.r
    if alpha is None or r is None:
        return []
    out = []
    for kind in sorted({e.kind for e in a.modules}):
        if conv.scaling.get(kind) is not Scaling.ONE:
            continue
        others = [c for c in CONVENTIONS if c.family == conv.family and c is not conv and kind in c.scaling
                  and not math.isclose(c.scale(kind, alpha, r), 1.0)]
        if others:
            n = sum(e.kind == kind for e in a.modules)
            o = others[0]
            out.append(_err("alpha-ignored",
                            f"alpha={alpha:g}, r={r} is declared, but {conv.library} {conv.versions} ignores alpha "
                            f"on {kind} layers ({n} modules compute ×1, while {o.library} {o.versions} would apply "
                            f"×{o.scale(kind, alpha, r):g}); make it explicit: lora-migrate convert --to {conv.name} "
                            f"folds the scale into B and writes alpha = r", a.info.name))
    return out


@adapter_check("rank-shape")
def _rank_shape(a) -> list[Finding]:
    out = []
    ranks = {}
    for e in a.modules:
        m = e.metas
        if "a" in m:
            A, B = tuple(m["a"].shape), tuple(m["b"].shape)
            # matrices, conv factors (r, in, *k) / (out, r, 1, …) of the same ndim, or experts (E, r, in) / (E, out, r)
            if e.kind == "experts":
                bad = len(A) != 3 or len(B) != 3 or A[0] != B[0] or A[1] != B[2]
            else:
                bad = len(A) != len(B) or not 2 <= len(A) <= 5 or (e.fused is None and A[0] != B[1])
            if bad:
                out.append(_err("rank-shape", f"lora_A {list(A)} and lora_B {list(B)} do not multiply",
                                a.info.name, e.module))
                continue
        if set(e.keys) <= {"a", "b", "bias", "magnitude"}:  # not several stored pairs fused into one module (mlx-lm's
            ranks.setdefault(e.rank, []).append(e.module)  # gate + up at 2r): their reader checked each part's rank
    if a.info.r is not None:
        wrong = {r: ms for r, ms in ranks.items() if r != a.info.r}
        for r, ms in wrong.items():
            out.append(_err("rank-shape", f"{len(ms)} modules have rank {r}, the config says r={a.info.r} "
                            f"(first: {ms[0]})", a.info.name, ms[0]))
    return out


@adapter_check("nonfinite")
def _nonfinite(a) -> list[Finding]:
    from .io._common import release_memory
    from .rules.values import count_nonfinite

    out = []
    for e in a.modules:
        for param, key in e.keys.items():
            t = a.store.get(key)
            nan, inf = count_nonfinite(t)
            if nan or inf:
                what = "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"
                out.append(_err("nonfinite", f"{key}: {nan + inf} of {t.numel()} values are {what}", a.info.name,
                                e.module))
            del t
        release_memory()
    return out


# ------------------------------------------------------------------------------------------------- runner


def _unclaimed_keys(source) -> list[Finding]:
    """Tensor keys that no schema of any family claims and the reader did not take either (readers refuse most;
    this names them whatever the reader). A key the reader mapped to a module (e.g. a spelling its library also
    reads) or carries as an extra is claimed."""
    from .schemas import CONVENTIONS

    out = []
    for a in source.adapters:
        taken = {k for e in a.modules for k in e.keys.values()} | set(a.extras)
        left = [k for k in a.store.keys() if k not in taken and not any(c.keys.claim(k) for c in CONVENTIONS)]
        if left:
            shown = ", ".join(repr(k) for k in left[:3]) + (f" (+{len(left) - 3} more)" if len(left) > 3 else "")
            out.append(_err("unclaimed-keys", f"{len(left)} tensor keys no schema claims: {shown}", a.info.name))
    return out


def _classify_read_error(msg: str) -> str:
    if "claims" in msg or "not LoRA" in msg:
        return "unclaimed-keys"
    if "contradict" in msg or "do not fit" in msg or "not matrices" in msg or "shape" in msg:
        return "rank-shape"
    return "unreadable"


def check(path: str | Path, *, expect: str | None = None, convert_to: str | None = None,
          base_model: str | Path | None = None, model_type: str | None = None) -> CheckResult:
    """Gate PATH: the findings that make it unsafe to upload or commit, and (``convert_to``) whether converting it
    passes the numeric check. ``base_model`` / ``model_type``: what a codec needs to read some modules (a GGUF's or
    torchtune's q/k rows need the base model's head counts); without them such modules are a warning, not checked.
    Bad usage (no such path, an unknown convention name) raises LoraMigrateError."""
    from .codecs import CODECS, PlanOptions, codec_for
    from .source import base_model_config
    from .detect import open_source
    from .schemas import get_convention

    t0 = time.perf_counter()
    shown = str(path)
    local = Path(resolve_source(path))
    if not local.exists():
        raise LoraMigrateError(f"{shown}: no such file or folder")
    want = get_convention(expect) if expect else None
    if convert_to:
        get_convention(convert_to)
    findings = [f for c in CODECS for f in c.config_findings(local)]
    source = None
    try:
        source = open_source(local)
    except DetectionError as e:
        findings.append(_err("convention", str(e)))
        if want is not None:
            try:
                source = open_source(local, want.name)
            except LoraMigrateError:
                pass
    except LoraMigrateError as e:
        msg = str(e)
        findings.append(_err(_classify_read_error(msg), msg))
    conv_name, adapters, n_mod, conversion = None, [], 0, None
    if source is not None:
        try:
            conv_name = source.convention.name
            adapters = [a.info.name for a in source.adapters]
            codec = codec_for(source.convention)
            if base_model is not None or model_type is not None:
                cfg = base_model_config(resolve_source(base_model)) if base_model is not None else None
                if base_model is not None and cfg is None:
                    raise LoraMigrateError(f"--base-model {base_model}: no config.json there (nor in the Hugging "
                                           "Face cache)")
                opts = PlanOptions(base_model=None if base_model is None else str(base_model), base_config=cfg,
                                   model_type=model_type)
                for a in source.adapters:
                    codec.prepare(a, opts)
            served = None if want is None else codec.expect_findings(source, want)
            if served is not None:  # read as it is by ``want`` (a server of this codec's files): same ΔW?
                findings += served
            elif want is not None and source.convention is not want and not any(f.code == "convention"
                                                                                  for f in findings):
                findings.append(_err("expect-mismatch", f"expected {want.name} ({want.library} {want.versions}), "
                                     f"found {conv_name} ({source.convention.library} "
                                     f"{source.convention.versions}): " + "; ".join(source.reasons[:2])))
            if source.layout != "full-model":  # a full model's file also holds the base model's weights
                findings += _unclaimed_keys(source)
            for a in source.adapters:
                n_mod += len(a.modules)
                for c in ADAPTER_CHECKS:
                    try:
                        findings += c.fn(a)
                    except UnsupportedFeature as e:  # e.g. a GGUF's q/k rows without the base model's heads
                        findings.append(Finding(level="warning", code=c.code, adapter=a.info.name,
                                                message=f"not checked: {e}"))
                findings += codec.findings(a)
        finally:
            source.close()
        if convert_to and not any(f.level == "error" for f in findings):
            conversion = _conversion_check(local, convert_to, conv_name)
            if not conversion.ok:
                findings.append(_err("conversion", f"converting to {convert_to}: {conversion.summary}"))
    return CheckResult(path=shown, convention=conv_name, expect=want.name if want else None, adapters=adapters,
                       modules_checked=n_mod, findings=findings, conversion=conversion,
                       seconds=time.perf_counter() - t0)


def _conversion_check(path: Path, to: str, from_: str | None) -> ConversionCheck:
    from . import api
    from .codecs import codec_for
    from .schemas import get_convention

    with tempfile.TemporaryDirectory(prefix="lora-migrate-check-") as tmp:
        try:
            suffix = codec_for(get_convention(to)).file_suffix or ""
            r = api.convert(path, Path(tmp) / f"out{suffix}", to=to, from_=from_)
        except VerificationFailed as e:
            return ConversionCheck(target=to, ok=False, summary=str(e))
        except LoraMigrateError as e:
            return ConversionCheck(target=to, ok=False, summary=f"refused: {e}")
    summary = "; ".join(f"{a.plan.adapter}: {a.verify.summary()}" for a in r.adapters)
    return ConversionCheck(target=r.target_convention, ok=r.ok, summary=summary)


GATE_FILES = ("adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors", "config.json",
              "model.safetensors", "pytorch_model.bin")


def gate_targets(paths) -> list[str]:
    """The folders to check for PATHS as pre-commit passes them (files, possibly several of one adapter), in
    order and without repeats; hf:// ids and folders pass through."""
    from .codecs import CODECS

    out: list[str] = []
    for p in paths:
        q = Path(p)
        if not str(p).startswith("hf://") and q.is_file() and not any(
                c.output == "file" and c.claim(q) is not None for c in CODECS):  # a one-file adapter is itself
            p = str(q.parent) if q.name in GATE_FILES or q.suffix in (".bin", ".safetensors", ".json") else p
        if p not in out:
            out.append(str(p))
    return out
