"""``lora-migrate check``: a gate before an upload or a commit.

It fails (``CheckResult.ok`` is False, the CLI exits 1) when the convention is ambiguous or mis-declared, when
ranks or shapes are inconsistent or values are NaN/Inf, and when a declared conversion fails its numeric check.

The convention-specific checks are data: :data:`CONFIG_CHECKS` look at a raw config file before anything is read
(a version string no release wrote, ...), :data:`ADAPTER_CHECKS` at a read adapter (alpha its library silently
ignores, ...). Each entry names the families or conventions it applies to, so another family adds its own entries
(:func:`adapter_check` / :func:`config_check`) without touching the runner.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, computed_field

from .errors import DetectionError, LoraMigrateError, VerificationFailed
from .resolve import resolve_source


class Finding(BaseModel):
    level: Literal["error", "warning"]
    code: str  # stable, for scripts: convention, unknown-version, alpha-ignored, unclaimed-keys, nonfinite, ...
    message: str
    adapter: str | None = None
    module: str | None = None


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
    """A check on one read adapter (a :class:`~lora_migrate.source.SourceAdapter`)."""

    code: str
    fn: Callable  # (SourceAdapter) -> list[Finding]
    families: tuple[str, ...] | None = None  # None: every family
    conventions: tuple[str, ...] | None = None  # None: every convention of those families

    def applies(self, conv) -> bool:
        return ((self.families is None or conv.family in self.families)
                and (self.conventions is None or conv.name in self.conventions))


@dataclass(frozen=True)
class ConfigCheck:
    """A check on a raw config file (a parsed JSON object), before the adapter is read."""

    code: str
    file: str  # e.g. "adapter_config.json"
    claims: Callable  # (dict) -> bool: is this config of the family this check knows?
    fn: Callable  # (dict, Path) -> list[Finding]


ADAPTER_CHECKS: list[AdapterCheck] = []
CONFIG_CHECKS: list[ConfigCheck] = []


def adapter_check(code: str, *, families=None, conventions=None):
    def deco(fn):
        ADAPTER_CHECKS.append(AdapterCheck(code, fn, families and tuple(families), conventions and tuple(conventions)))
        return fn
    return deco


def config_check(code: str, *, file: str, claims):
    def deco(fn):
        CONFIG_CHECKS.append(ConfigCheck(code, file, claims, fn))
        return fn
    return deco


def _err(code, message, adapter=None, module=None) -> Finding:
    return Finding(level="error", code=code, message=message, adapter=adapter, module=module)


# ------------------------------------------------------------------------------------ checks: AdapterHub


def _is_adapterhub_wrapper(raw: dict) -> bool:
    return "peft_type" not in raw and isinstance(raw.get("config"), dict) and "name" in raw


@config_check("unknown-version", file="adapter_config.json", claims=_is_adapterhub_wrapper)
def _adapterhub_version(raw: dict, path: Path) -> list[Finding]:
    from .formats.adapterhub import conventions_for_version

    v = raw.get("version")
    if v is None:
        return [_err("unknown-version", f"{path}: no \"version\"; the scaling convention cannot be told",
                     raw.get("name"))]
    if not conventions_for_version(str(v)):
        return [_err("unknown-version", f"{path}: version {v!r} is not one any AdapterHub release wrote",
                     raw.get("name"))]
    return []


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


# ------------------------------------------------------------------------------------ checks: PEFT


def _served_findings(source, want) -> list[Finding]:
    """``--expect lorax|vllm`` on PEFT files: what the server computes loading them as they are (the same
    prediction as ``inspect``: ignored use_rslora, one global r and alpha, dropped DoRA/bias/modules_to_save)."""
    from .api import _as_loaded_peft
    from .plan import lorax_drops

    out = []
    for a in source.adapters:
        row = next((c for c in _as_loaded_peft(a) if c.convention == want.name), None)
        if row is not None and not row.same:
            out.append(_err("misdeclared", f"{want.name} would not compute this adapter's ΔW: {row.detail}",
                            a.info.name))
        drops = lorax_drops(a) if want.serving and want.serving.drops_partial_layer_types else None
        if drops is not None and not drops[0]:  # some layers by config: dropped unless the model has only those
            out.append(Finding(level="warning", code="lorax-coverage", adapter=a.info.name,
                               message=drops[1] + "; convert with --to lorax --num-layers N to fill the other layers "
                                                  "with zero adapters"))
    return out


@adapter_check("rslora-unknown", families=("peft",))
def _rslora_unknown(a) -> list[Finding]:
    """use_rslora (PEFT ≥ 0.8, #1244) in a config whose peft_version predates it: that release does not apply
    alpha/√r (0.6–0.7 even refuse the field)."""
    from packaging.version import InvalidVersion, Version

    cfg = a.peft
    pv = (cfg.peft_version or "").split("@")[0] if cfg is not None else ""
    try:
        old = bool(pv) and Version(pv) < Version("0.8")
    except InvalidVersion:
        old = False
    if cfg is not None and cfg.use_rslora and old:
        return [_err("rslora-unknown", f"use_rslora=true, but peft_version {cfg.peft_version!r} predates rsLoRA "
                                       "(PEFT 0.8): that release scales by alpha/r", a.info.name)]
    return []


# ------------------------------------------------------------------------------------ checks: every family


@adapter_check("rank-shape")
def _rank_shape(a) -> list[Finding]:
    out = []
    ranks = {}
    for e in a.modules:
        m = e.metas
        if "a" in m:
            A, B = tuple(m["a"].shape), tuple(m["b"].shape)
            # matrices, or conv factors (r, in, *k) / (out, r, 1, …) of the same ndim
            if len(A) != len(B) or not 2 <= len(A) <= 5 or (e.fused is None and A[0] != B[1]):
                out.append(_err("rank-shape", f"lora_A {list(A)} and lora_B {list(B)} do not multiply",
                                a.info.name, e.module))
                continue
        ranks.setdefault(e.rank, []).append(e.module)
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


def _config_files(path: Path) -> list[Path]:
    names = {c.file for c in CONFIG_CHECKS}
    found = [path / n for n in names if (path / n).is_file()]
    if not found and path.is_dir():
        found = [d / n for d in sorted(path.iterdir()) if d.is_dir() for n in names if (d / n).is_file()]
    return found


def _config_findings(path: Path) -> list[Finding]:
    out = []
    for f in _config_files(path):
        try:
            raw = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # reading the adapter reports it, with the reason
        if not isinstance(raw, dict):
            continue
        for c in CONFIG_CHECKS:
            if c.file == f.name and c.claims(raw):
                out += c.fn(raw, f)
    return out


def _unclaimed_keys(source) -> list[Finding]:
    """Tensor keys that no schema of any family claims (readers refuse most; this names them whatever the reader)."""
    from .schemas import CONVENTIONS

    out = []
    for a in source.adapters:
        keys = a.store.keys()
        left = [k for k in keys if not any(c.keys.claim(k) for c in CONVENTIONS)]
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


def check(path: str | Path, *, expect: str | None = None, convert_to: str | None = None) -> CheckResult:
    """Gate PATH: the findings that make it unsafe to upload or commit, and (``convert_to``) whether converting it
    passes the numeric check. Bad usage (no such path, an unknown convention name) raises LoraMigrateError."""
    from .detect import open_source
    from .schemas import get_convention

    t0 = time.perf_counter()
    shown = str(path)
    local = Path(resolve_source(path))
    if not local.exists():
        raise LoraMigrateError(f"{shown}: no such file or folder")
    if local.is_file():
        local = local.parent
    want = get_convention(expect) if expect else None
    if convert_to:
        get_convention(convert_to)
    findings = _config_findings(local)
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
            served = want is not None and want.serving is not None and source.convention.family == "peft"
            if served:  # a PEFT file meant for a server: does the server compute the same thing?
                findings += _served_findings(source, want)
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
                    if c.applies(a.convention):
                        findings += c.fn(a)
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

    with tempfile.TemporaryDirectory(prefix="lora-migrate-check-") as tmp:
        try:
            r = api.convert(path, Path(tmp) / "out", to=to, from_=from_)
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
    out: list[str] = []
    for p in paths:
        q = Path(p)
        if not str(p).startswith("hf://") and q.is_file():
            p = str(q.parent) if q.name in GATE_FILES or q.suffix in (".bin", ".safetensors", ".json") else p
        if p not in out:
            out.append(str(p))
    return out
