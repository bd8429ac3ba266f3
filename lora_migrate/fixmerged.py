"""Repair a dense model produced by ``merge_and_unload().save_pretrained()`` that was merged wrongly.

Two repairs, both exact given the adapter that was merged:

* PEFT 0.14.0–0.15.2 merged ``lora_B.bias`` unscaled (``b + l`` instead of ``b + s·l``; peft.md §2):
  ``b_fixed = b_merged + (s − 1)·l``.
* A merge at the wrong scale (``--scale-used S``, or the scale the ``--merged-with`` convention computes, e.g.
  alpha/r for an rsLoRA adapter merged by LoRAX's rule): ``W_fixed = W_merged + (s_true − s_used)·ΔW_unit``
  with ``ΔW_unit = B·A`` (transposed for GPT-2 ``Conv1D`` weights and for embeddings, peft.md §1.2, §1.4); a
  LoRA bias merged at the same wrong scale gets ``(s_true − s_used)·l``.

The model is streamed one tensor at a time, file by file; untouched tensors are copied byte for byte. After
writing, every output file is read back and checked: repaired tensors must differ from the input by the
intended correction (to within one rounding to their dtype), every other tensor must be byte-identical.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, computed_field

from .detect import open_source
from .errors import LoraMigrateError, UnsupportedFeature, VerificationFailed
from .io import BinWriter, SafetensorsWriter, atomic_output, open_tensors, refuse_overlap
from .io._common import release_memory
from .schemas import get_convention
from .schemas.base import CONV1D_MODEL_TYPES
from .source import ModuleEntry, SourceAdapter, read_json
from .check.report import tolerance_for

WEIGHT_SETS = (("model.safetensors.index.json", "model.safetensors"),
               ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class RepairedTensor(BaseModel):
    key: str
    module: str
    what: str  # "weight" | "bias"
    file: str
    dtype: str
    shape: list[int]
    scale_true: float
    scale_used: float
    correction_norm: float  # ‖intended correction‖_F (float64)
    error: float  # ‖(W_fixed − W_merged) − correction‖_F as read back
    rel_to_correction: float  # error / ‖correction‖
    rel_to_weight: float  # error / ‖W_merged + correction‖ (the rounding bound is u times this norm)
    tolerance: float  # tolerance_for(dtype), compared with rel_to_weight
    ok: bool


class FixMergedResult(BaseModel):
    merged: str
    output: str
    adapter: str
    adapter_convention: str
    merged_with: str
    scale_used: float | None
    files: list[str]  # weight files rewritten (relative to OUT)
    copied: list[str]  # other files copied as they are
    tensors: int
    repaired: list[RepairedTensor]
    untouched: int
    untouched_identical: bool
    max_rel_to_weight: float
    max_rel_to_correction: float
    notes: list[str]
    seconds: float

    @computed_field
    @property
    def ok(self) -> bool:
        return self.untouched_identical and all(r.ok for r in self.repaired)

    def summary(self) -> str:
        return (f"{len(self.repaired)} tensors repaired (max error {self.max_rel_to_weight:.2g} of the weight, "
                f"{self.max_rel_to_correction:.2g} of the correction), {self.untouched} untouched "
                f"{'byte-identical' if self.untouched_identical else 'NOT identical'}")


@dataclass
class _Fix:
    key: str
    module: str
    what: str
    entry: ModuleEntry
    coef: float  # correction = coef · unit delta
    s_true: float
    s_used: float
    transpose: bool
    shape: tuple[int, ...]


def weight_sets(merged: Path) -> list[list[Path]]:
    """The weight files of each format present, as lists of shard paths (one list per format)."""
    sets = []
    for index_name, single in WEIGHT_SETS:
        index = merged / index_name
        if index.is_file():
            raw = read_json(index)
            wm = raw.get("weight_map")
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise LoraMigrateError(f"{index}: no weight_map of tensor name → shard file")
            shards = []
            for name in dict.fromkeys(wm.values()):
                p = merged / name
                if Path(name).name != name or not p.is_file():
                    raise LoraMigrateError(f"{index}: shard {name!r} is not a file in {merged}")
                shards.append(p)
            sets.append(shards)
        elif (merged / single).is_file():
            sets.append([merged / single])
    if not sets:
        raise LoraMigrateError(f"{merged}: no model weights (expected model.safetensors, sharded "
                               "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")
    return sets


def close_sets(opened: list[list]) -> None:
    for files in opened:
        for f in files:
            f.close()


def model_folder(model: Path, adapter_dir: Path, out: Path) -> tuple[dict, list[list[Path]]]:
    """The config and weight files of a saved transformers model; refuses an OUT that overlaps an input."""
    if not model.is_dir():
        raise LoraMigrateError(f"{model}: not a folder (expected a saved transformers model)")
    config = read_json(model / "config.json")
    refuse_overlap(model, out)
    refuse_overlap(adapter_dir, out)
    return config, weight_sets(model)


def copy_others(root: Path, dest: Path, sets: list[list[Path]]) -> list[str]:
    """Copy every file and folder of ``root`` except the weight files (config, tokenizer, …) to ``dest``."""
    weight_files = {p for shards in sets for p in shards}
    copied = []
    for p in sorted(root.iterdir()):
        if p in weight_files:
            continue
        if p.is_dir():
            shutil.copytree(p, dest / p.name, symlinks=False)
        else:
            shutil.copy2(p, dest / p.name)
        copied.append(p.name)
    return copied


def unit_shape(e: ModuleEntry, transpose: bool) -> tuple[int, ...]:
    A, B = e.metas["a"].shape, e.metas["b"].shape
    if e.fused is not None:
        out = 3 * (B[0] // len(e.fused.groups))
        return (A[1], out) if transpose else (out, A[1])
    if e.kind == "embedding":
        return (A[1], B[0])
    if e.kind == "conv":
        return (B[0], *A[1:])
    return (A[1], B[0]) if transpose else (B[0], A[1])


def _unit(a: SourceAdapter, f: _Fix) -> torch.Tensor:
    """The correction for one tensor, in float64."""
    d = a.load(f.entry)
    if f.what == "bias":
        return f.coef * d.bias.double()
    A, B = d.factors()
    m = B.double() @ A.double()
    if f.entry.kind == "embedding" or f.transpose:
        m = m.T
    return (f.coef * m).reshape(f.shape)


def _plan_fixes(adapter: SourceAdapter, used: SourceAdapter | None, merged_with, scale_used: float | None,
                fan_in_fan_out: bool, metas: dict, notes: list[str]) -> list[_Fix]:
    used_by = {e.module: e for e in used.modules} if used is not None else {}
    fixes = []
    for e in adapter.modules:
        if e.kind == "ia3":
            raise UnsupportedFeature(f"module {e.module!r}: (IA)³ is not a merged LoRA; nothing to repair by "
                                     "adding a delta")
        if e.kind == "experts":
            raise UnsupportedFeature(f"module {e.module!r}: repairing merged stacked-experts (MoE) LoRA is not "
                                     "supported")
        s_true = e.scale
        if scale_used is not None:
            s_w = float(scale_used)
        elif e.module in used_by:
            s_w = used_by[e.module].scale
        else:
            s_w = s_true
        s_b = 1.0 if merged_with.merges_bias_unscaled else s_w
        transpose = fan_in_fan_out and e.kind != "embedding" and e.kind != "conv"
        if not math.isclose(s_true, s_w, rel_tol=1e-12, abs_tol=0.0):
            if "magnitude" in e.keys:
                raise UnsupportedFeature(f"module {e.module!r}: DoRA merged at a wrong scale cannot be repaired by "
                                         "adding a delta (the row norms change); merge again from the base model")
            fixes.append(_Fix(f"{e.module}.weight", e.module, "weight", e, s_true - s_w, s_true, s_w, transpose,
                              unit_shape(e, transpose)))
        if "bias" in e.keys and not math.isclose(s_true, s_b, rel_tol=1e-12, abs_tol=0.0):
            fixes.append(_Fix(f"{e.module}.bias", e.module, "bias", e, s_true - s_b, s_true, s_b, False,
                              tuple(e.metas["bias"].shape)))
    for f in fixes:
        m = metas.get(f.key)
        if m is None:
            raise LoraMigrateError(f"the merged model has no tensor {f.key!r} for adapter module {f.module!r} "
                                   "(is this the model the adapter was merged into?)")
        if tuple(m.shape) != f.shape:
            hint = " (GPT-2 Conv1D? the adapter's fan_in_fan_out decides the layout)" \
                if f.what == "weight" and tuple(m.shape) == f.shape[::-1] else ""
            raise LoraMigrateError(f"the merged model's {f.key!r} has shape {list(m.shape)}, but adapter module "
                                   f"{f.module!r} needs {list(f.shape)}{hint}")
        if not m.dtype.is_floating_point:
            raise LoraMigrateError(f"the merged model's {f.key!r} has dtype {m.dtype}, not a floating dtype")
    return fixes


def open_set(shards: list[Path]):
    files = []
    try:
        for p in shards:
            files.append(open_tensors(p))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def rewrite(files, out_dir: Path, root: Path, target: dict) -> None:
    """Write every file of ``files`` under ``out_dir`` with the same names, order and metadata; a tensor whose
    key is in ``target`` becomes ``target[key](float64 tensor)`` cast back to its dtype once."""
    for tf in files:
        dest = out_dir / tf.path.relative_to(root)
        writer = SafetensorsWriter(dest, metadata=tf.metadata) if tf.format == "safetensors" else BinWriter(dest)
        with writer as w:
            for k in tf.keys():
                m = tf.meta(k)
                w.add(k, m.dtype, m.shape)
            w.write_header()
            for k in tf.keys():
                t = tf.get(k)
                if k in target:
                    t = target[k](t.double()).to(t.dtype)
                w.write(k, t)
                del t
        release_memory()


def check(files_in, out_dir: Path, root: Path, target: dict):
    """Read the written files back. Returns ([(key, file, tensor_in, error, ‖want − in‖, ‖want‖, tol)] for the
    changed tensors, count of untouched ones, whether those are all byte-identical)."""
    changed, untouched, identical = [], 0, True
    for tf in files_in:
        rel = tf.path.relative_to(root)
        with open_tensors(out_dir / rel) as back:
            if back.keys() != tf.keys():
                raise VerificationFailed(f"{rel}: written tensor names differ from the input's")
            for k in tf.keys():
                a, b = tf.get(k), back.get(k)
                if a.dtype != b.dtype or a.shape != b.shape:
                    raise VerificationFailed(f"{rel}: {k!r} changed dtype or shape")
                if k not in target:
                    untouched += 1
                    identical &= torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                             b.contiguous().reshape(-1).view(torch.uint8))
                    continue
                a64 = a.double()
                want = target[k](a64)
                err = float(torch.linalg.vector_norm(b.double() - want))
                cn = float(torch.linalg.vector_norm(want - a64))
                wn = float(torch.linalg.vector_norm(want))
                changed.append((k, str(rel), a, err, cn, wn, tolerance_for(a.dtype)))
                del b, want, a64
        release_memory()
    return changed, untouched, identical


def _repaired(changed, fixes: dict[str, _Fix]) -> list[RepairedTensor]:
    out = []
    for k, rel, a, err, cn, wn, tol in changed:
        f = fixes[k]
        rw = err / wn if wn > 0 else err
        out.append(RepairedTensor(
            key=k, module=f.module, what=f.what, file=rel, dtype=str(a.dtype).removeprefix("torch."),
            shape=list(a.shape), scale_true=f.s_true, scale_used=f.s_used, correction_norm=cn, error=err,
            rel_to_correction=err / cn if cn > 0 else err, rel_to_weight=rw, tolerance=tol,
            ok=math.isfinite(err) and rw <= tol))
    return out


def fix_merged(merged: str | Path, out: str | Path, *, adapter: str | Path, merged_with: str,
               scale_used: float | None = None, adapter_from: str | None = None,
               overwrite: bool = False) -> FixMergedResult:
    """Repair the merged model at MERGED into OUT, given the adapter that was merged and how it was merged.

    Raises :class:`LoraMigrateError` for bad input or when there is nothing to repair (nothing is written), and
    :class:`VerificationFailed` when the read-back check fails (nothing is left at OUT).
    """
    t0 = time.perf_counter()
    merged, out, adapter_dir = Path(merged), Path(out), Path(adapter)
    conv = get_convention(merged_with)
    if scale_used is not None and not (math.isfinite(scale_used) and scale_used != 0):
        raise LoraMigrateError(f"--scale-used {scale_used}: expected a finite, nonzero number")
    config, sets = model_folder(merged, adapter_dir, out)
    src = open_source(adapter_dir, adapter_from)
    used = None
    opened: list = []
    try:
        if len(src.adapters) != 1:
            raise LoraMigrateError(f"{adapter_dir}: holds {len(src.adapters)} adapters; pass the folder of the "
                                   "one that was merged")
        a = src.adapters[0]
        notes: list[str] = []
        if conv.family != a.convention.family:
            raise LoraMigrateError(f"--merged-with {merged_with}: a {conv.library} convention cannot have merged "
                                   f"this {a.convention.library} adapter")
        if scale_used is None and conv is not a.convention:
            # the scales the merging library computed: the adapter read as that convention reads it
            used = open_source(adapter_dir, conv.name).adapters[0]
            if used.modules and any(x.scale != y.scale for x, y in zip(a.modules, used.modules)):
                notes.append(f"{conv.name} scales this adapter as {used.modules[0].provenance.describe()}, "
                             f"not {a.modules[0].provenance.describe()}")
        fan = a.info.fan_in_fan_out or config.get("model_type") in CONV1D_MODEL_TYPES
        for shards in sets:
            opened.append(open_set(shards))
        check_keys = {}
        for files in opened:
            metas = {k: f.meta(k) for f in files for k in f.keys()}
            fixes = _plan_fixes(a, used, conv, scale_used, fan, metas, notes)
            check_keys = {f.key: f for f in fixes}
        if not check_keys:
            why = (f"{conv.name} merges this adapter at its own scale" if scale_used is None
                   else f"--scale-used {scale_used:g} is the adapter's own scale")
            raise LoraMigrateError(f"nothing to repair: {why} (and its lora_B.bias, if any, correctly)")
        written = []
        with atomic_output(out, overwrite=overwrite) as tmp:
            copied = copy_others(merged, tmp, sets)
            repaired, untouched, identical = [], 0, True
            target = {k: (lambda w, f=f: w + _unit(a, f)) for k, f in check_keys.items()}
            for files in opened:
                rewrite(files, tmp, merged, target)
                changed, u, i = check(files, tmp, merged, target)
                repaired += _repaired(changed, check_keys)
                untouched += u
                identical &= i
                written += [str(f.path.relative_to(merged)) for f in files]
            res = FixMergedResult(
                merged=str(merged), output=str(out), adapter=str(adapter_dir), adapter_convention=a.convention.name,
                merged_with=conv.name, scale_used=scale_used, files=written, copied=copied,
                tensors=len(repaired) + untouched, repaired=repaired, untouched=untouched,
                untouched_identical=identical, max_rel_to_weight=max((r.rel_to_weight for r in repaired), default=0),
                max_rel_to_correction=max((r.rel_to_correction for r in repaired), default=0), notes=notes,
                seconds=time.perf_counter() - t0)
            if not res.ok:
                bad = [r for r in repaired if not r.ok][:3]
                raise VerificationFailed("read-back check failed: " + res.summary() + "".join(
                    f"; {r.key}: error {r.rel_to_weight:.2g} > {r.tolerance:.2g}" for r in bad))
        res.seconds = time.perf_counter() - t0
        return res
    finally:
        close_sets(opened)
        src.close()
        if used is not None:
            used.store.close()


__all__ = ["FixMergedResult", "RepairedTensor", "fix_merged"]
