"""Merge an adapter into its base model, writing a dense checkpoint: the one exact way to move a DoRA adapter
into a library without DoRA (peft.md §3.3).

Per adapted module (peft.md §3.2, §6):

* LoRA: ``W += s·ΔW_unit`` (``ΔW_unit = B·A``, transposed for GPT-2 ``Conv1D`` and embeddings); with a LoRA
  bias, ``b += s·l``.
* DoRA (Linear / Conv1D): ``W' = (m / ‖W + s·BA‖_row) ⊙ (W + s·BA)``, the norm per output row; bias untouched.

Streamed one tensor at a time like ``fix-merged``, computed in float64 and cast back once, then read back and
checked (changed tensors against the formula, every other tensor byte-identical).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from pydantic import BaseModel, computed_field

from .detect import open_source
from .errors import LoraMigrateError, UnsupportedFeature, VerificationFailed
from .fixmerged import check, close_sets, copy_others, model_folder, open_set, rewrite, unit_shape
from .io import atomic_output
from .source import SourceAdapter


class MergedTensor(BaseModel):
    key: str
    module: str
    what: str  # "weight" | "bias"
    dora: bool
    file: str
    dtype: str
    delta_norm: float  # ‖W_merged − W_base‖_F as intended (float64)
    error: float  # ‖W_written − W_merged‖_F
    rel_to_weight: float
    tolerance: float
    ok: bool


class MergeResult(BaseModel):
    source: str
    base: str
    output: str
    convention: str
    files: list[str]
    copied: list[str]
    merged: list[MergedTensor]
    untouched: int
    untouched_identical: bool
    max_rel_to_weight: float
    seconds: float

    @computed_field
    @property
    def ok(self) -> bool:
        return self.untouched_identical and all(t.ok for t in self.merged)

    def summary(self) -> str:
        dora = sum(t.dora for t in self.merged)
        return (f"{len(self.merged)} tensors merged ({dora} DoRA), max error {self.max_rel_to_weight:.2g} of the "
                f"weight, {self.untouched} untouched {'byte-identical' if self.untouched_identical else 'NOT identical'}")


def _plan(a: SourceAdapter, fan: bool, metas: dict) -> dict[str, tuple]:
    """key → (module, what, dora, function float64 W → merged W)."""
    out = {}
    for e in a.modules:
        if e.kind in ("ia3", "experts"):
            raise UnsupportedFeature(f"module {e.module!r}: {'(IA)³' if e.kind == 'ia3' else 'stacked-experts'} "
                                     "merge is not supported")
        dora = "magnitude" in e.keys
        if dora and e.kind != "linear":
            raise UnsupportedFeature(f"module {e.module!r}: DoRA merge of {e.kind} layers is not supported")
        transpose = fan and e.kind == "linear"
        shape = unit_shape(e, transpose)
        key = f"{e.module}.weight"
        m = metas.get(key)
        if m is None:
            raise LoraMigrateError(f"the base model has no tensor {key!r} for adapter module {e.module!r}")
        if tuple(m.shape) != shape:
            raise LoraMigrateError(f"the base model's {key!r} has shape {list(m.shape)}, but adapter module "
                                   f"{e.module!r} needs {list(shape)}")

        def weight(W, e=e, transpose=transpose, shape=shape, dora=dora):
            d = a.load(e)
            A, B = d.factors()
            delta = e.scale * (B.double() @ A.double())
            if e.kind == "embedding":
                return W + delta.T
            if not dora:
                return W + (delta.T if transpose else delta).reshape(shape)
            Wt = W.T if transpose else W  # (out, in)
            V = Wt + delta
            mag = d.magnitude.double().reshape(-1)
            Wn = (mag / torch.linalg.vector_norm(V, dim=1))[:, None] * V
            return Wn.T if transpose else Wn

        out[key] = (e.module, "weight", dora, weight)
        if "bias" in e.keys:
            bkey = f"{e.module}.bias"
            bm = metas.get(bkey)
            if bm is None or tuple(bm.shape) != tuple(e.metas["bias"].shape):
                raise LoraMigrateError(f"the base model has no tensor {bkey!r} of shape "
                                       f"{list(e.metas['bias'].shape)} for the LoRA bias of {e.module!r}")
            out[bkey] = (e.module, "bias", False, lambda b, e=e: b + e.scale * a.load(e).bias.double())
    return out


def merge_adapter(src: str | Path, base: str | Path, out: str | Path, *, from_: str | None = None,
          overwrite: bool = False) -> MergeResult:
    """Merge the adapter at SRC into the transformers model at BASE, writing the dense model to OUT."""
    t0 = time.perf_counter()
    src, base, out = Path(src), Path(base), Path(out)
    config, sets = model_folder(base, src, out)
    source = open_source(src, from_)
    opened: list = []
    try:
        if len(source.adapters) != 1:
            raise LoraMigrateError(f"{src}: holds {len(source.adapters)} adapters; pass one adapter folder")
        a = source.adapters[0]
        if a.gated:
            raise UnsupportedFeature(f"{src}: gated LoRA cannot be merged into fixed weights")
        fan = bool(getattr(a.peft, "fan_in_fan_out", False)) or config.get("model_type") == "gpt2"
        for shards in sets:
            opened.append(open_set(shards))
        plans = []
        for files in opened:
            plans.append(_plan(a, fan, {k: f.meta(k) for f in files for k in f.keys()}))
        merged, untouched, identical, written = [], 0, True, []
        with atomic_output(out, overwrite=overwrite) as tmp:
            copied = copy_others(base, tmp, sets)
            for files, plan in zip(opened, plans):
                target = {k: v[3] for k, v in plan.items()}
                rewrite(files, tmp, base, target)
                changed, u, i = check(files, tmp, base, target)
                untouched += u
                identical &= i
                written += [str(f.path.relative_to(base)) for f in files]
                for k, rel, t, err, cn, wn, tol in changed:
                    module, what, dora, _ = plan[k]
                    rw = err / wn if wn > 0 else err
                    merged.append(MergedTensor(key=k, module=module, what=what, dora=dora, file=rel,
                                               dtype=str(t.dtype).removeprefix("torch."), delta_norm=cn, error=err,
                                               rel_to_weight=rw, tolerance=tol, ok=math.isfinite(err) and rw <= tol))
            res = MergeResult(source=str(src), base=str(base), output=str(out), convention=a.convention.name,
                              files=written, copied=copied, merged=merged, untouched=untouched,
                              untouched_identical=identical,
                              max_rel_to_weight=max((t.rel_to_weight for t in merged), default=0.0),
                              seconds=time.perf_counter() - t0)
            if not res.ok:
                raise VerificationFailed("read-back check failed: " + res.summary())
        res.seconds = time.perf_counter() - t0
        return res
    finally:
        close_sets(opened)
        source.close()


__all__ = ["MergeResult", "MergedTensor", "merge_adapter"]
