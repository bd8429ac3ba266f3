"""The acceptance matrix: every tiny architecture (tests/archs.py) × every adapter variant made by the real
peft 0.21.2 / adapters 1.3.0 × every target convention. All conversions run in ONE `lora-migrate batch` call;
each output is then loaded through its library's public API (PeftModel.from_pretrained, load_adapter) and must
reproduce the source's logits, or the cell must be refused with exit code 2 and a reason naming the feature.

A cell fails when: the output computes something else, or does not load; it was written although the target
cannot express the variant (``archs.EXPRESSES``); it was refused although the target can express it; the refusal
does not name the missing feature; or the conversion failed otherwise (check failure, internal error).

With LORA_MIGRATE_MATRIX_JSON=path the results are written there; scripts/gen_matrix.py renders docs/matrix.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from . import archs as A

pytest.importorskip("peft")
pytest.importorskip("adapters")

# max |Δlogit| allowed: what fp32 rounding of a rewritten factor (B folded with a scale, alpha·√r) can move the
# logits, relative to their magnitude; a wrong scale moves them by orders of magnitude more (checked per cell:
# the adapter must change the logits by > EFFECT_OVER_TOL × tol).
EPS = torch.finfo(torch.float32).eps
REL_TOL = 256 * EPS  # 3.1e-5 relative to max |logit|
EFFECT_OVER_TOL = 100

# Cells that fail today because of a known bug: strict, so a fix turns them into failures to delete here.
_ITEM1 = ("issue 12 item 1: embedding LoRA on a scaled embedding (embed_scale) is copied bit for bit into a PEFT "
          "era before 0.18, which does not multiply it by embed_scale")
_ITEM2 = ("issue 12 item 2: the serving profiles fold alpha/r = 3 into B (rounding, amplified ~1e-4 relative in the "
          "4-layer T5) where lora_alpha = alpha with B untouched is exact")
_ITEM3 = ("issue 12 item 3: modules_to_save=['norm'] also matches input_layernorm etc. (PEFT's endswith); the "
          "reader refuses those keys ('keys no PEFT LoRA schema claims')")
_NORM_SUFFIX = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm",
                "starcoder2", "olmo2", "mixtral"]
KNOWN: dict[tuple, str] = {
    **{(a, "embedding", t): _ITEM1 for a in ("gemma3_text", "bart_scaled")
       for t in ("peft-0.13", "peft-0.14", "peft-0.15", "peft-0.16")},
    **{("t5", "all_linear", t): _ITEM2 for t in ("lorax", "vllm")},
    **{(a, "modules_to_save", t): _ITEM3 for a in _NORM_SUFFIX for t in A.TARGETS},
}

# ---- the cells, known at collection time without building anything ------------------------------------------

PEFT_VARIANTS = ["plain", "all_linear", "rslora", "patterns", "lora_bias", "dora", "embedding", "modules_to_save"]
AH_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi", "gpt2", "bert", "roberta",
            "modernbert", "t5", "bart", "bart_scaled"]  # what adapters 1.3.0 supports (test_adapterhub_archs)


def _sources():
    only = os.environ.get("LORA_MIGRATE_MATRIX_ARCHS")  # a comma-separated subset, for working on a few archs
    for arch in only.split(",") if only else A.ARCHS:
        for v in PEFT_VARIANTS + (["fan_in_fan_out"] if arch == "gpt2" else []):
            yield arch, v
        if arch in AH_ARCHS:
            yield from ((arch, v) for v in A.ADAPTERHUB_VARIANTS)


SOURCES = list(_sources())
CELLS = [(a, v, t) for a, v in SOURCES for t in A.TARGETS]


def _param(cell):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN[cell])] if cell in KNOWN else []
    return pytest.param(*cell, id="-".join(cell), marks=marks)


# ---- sources, one batch, results ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Make every source (real peft / adapters), convert all cells in ONE `lora-migrate batch` call, load every
    output in its target library. Sources and loads run in two spawned worker processes (the CI machine has 2
    cores)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = tmp_path_factory.mktemp("matrix")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=A.worker_init) as pool:
        jobs = {}
        for i, (arch, variant) in enumerate(SOURCES):
            base_dir = root / "base" / arch
            if not base_dir.exists():  # the base model's config.json, which the PEFT config names
                A.config(arch).save_pretrained(base_dir)
            src = root / "src" / f"s{i:03d}"  # a name that says nothing: refusals must name the feature themselves
            jobs[(arch, variant)] = pool.submit(A.try_source, arch, variant, src, base_dir, 100 + i)
        sources = {k: dict(f.result(), dir=root / "src" / f"s{i:03d}") for i, (k, f) in enumerate(jobs.items())}
        rows = [{"source": str(s["dir"]), "to": t, "name": f"{a}.{v}.{t}"}
                for (a, v), s in sources.items() if "error" not in s for t in A.TARGETS]
        t1 = time.perf_counter()
        manifest = root / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = root / "out"
        proc = subprocess.run([sys.executable, "-m", "lora_migrate.cli", "batch", str(manifest), "--out", str(out),
                               "-j", "2"], capture_output=True, text=True)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        report = {r["name"]: r for r in map(json.loads, (out / "report.jsonl").read_text().splitlines())}
        t2 = time.perf_counter()
        loads = {}
        for (a, v, t) in CELLS:
            src, rec = sources[(a, v)], report.get(f"{a}.{v}.{t}")
            if rec and rec["status"] == "ok" and expectation(a, v, t, src, sources)[0]:
                loads[(a, v, t)] = pool.submit(A.try_load, a, t, out / rec["name"])
        loaded = {k: f.result() for k, f in loads.items()}
    t3 = time.perf_counter()
    results: dict = {}
    yield {"sources": sources, "report": report, "loaded": loaded, "results": results}
    path = os.environ.get("LORA_MIGRATE_MATRIX_JSON")
    if path:
        seconds = {"sources": t1 - t0, "batch": t2 - t1, "loads": t3 - t2}
        Path(path).write_text(json.dumps({"cells": [results[c] for c in CELLS if c in results],
                                          "checked_by": A.CHECKED_BY, "seconds": seconds}, indent=1) + "\n")


# ---- judging one cell -----------------------------------------------------------------------------------------

def expectation(arch, variant, target, src, sources) -> tuple[bool, list[str]]:
    """(whether the target can express this adapter, the features it lacks). AdapterHub targets express a PEFT
    adapter when adapters 1.3.0 wraps every module it adapts (``slots``) and reproduces its own saved LoRA on
    that architecture (ModernBERT's does not: its reload gives other logits every time)."""
    missing = sorted(src["features"] - A.EXPRESSES[target])
    if target in A.ADAPTERHUB and variant not in A.ADAPTERHUB_VARIANTS:
        own = [s for (a, v), s in sources.items() if a == arch and v in A.ADAPTERHUB_VARIANTS]
        if not src["slots"] or any("error" in s for s in own):
            missing.append("adapterhub_arch")
        elif not src["paths"] <= src["slots"] and "embedding" not in missing:
            missing.append("adapterhub_slot")
    return not missing, missing


REASON_CODES = [  # (code, regex on the refusal): the short name the docs table shows
    ("target_parameters", r"target_parameters"), ("dora", r"DoRA|magnitude"), ("lora_bias", r"lora_B\.bias"),
    ("modules_to_save", r"modules_to_save"), ("embedding", r"embedding"),
    ("adapterhub-module", r"AdapterHub LoRA cannot"), ("model-type", r"model.type|model_type"),
]


def reason_code(msg: str) -> str:
    return next((c for c, rx in REASON_CODES if re.search(rx, msg)), "other")


def judge(matrix, arch, variant, target) -> dict:
    src = matrix["sources"][(arch, variant)]
    cell = {"arch": arch, "variant": variant, "target": target}
    if "error" in src:
        return dict(cell, outcome="n/a", message=src["error"])
    rec = matrix["report"][f"{arch}.{variant}.{target}"]
    ok, missing = expectation(arch, variant, target, src, matrix["sources"])
    cell.update(expressible=ok, missing=missing)
    if rec["status"] != "ok":
        msg = rec.get("error") or ""
        code = reason_code(msg)
        if rec.get("exit_code") != 2 or msg.startswith("internal error"):
            return dict(cell, outcome="fail", why="conversion failed", message=msg, code=code)
        if ok:
            return dict(cell, outcome="fail", why="refused though expressible", message=msg, code=code)
        words = "|".join(A.FEATURE_WORDS[m] for m in missing)
        if not re.search(words, msg):
            return dict(cell, outcome="fail", why="refusal does not name the feature", message=msg, code=code)
        return dict(cell, outcome="refused", code=code, message=msg)
    if not ok:
        return dict(cell, outcome="fail", why=f"written though the target lacks {', '.join(missing)}")
    got, err = matrix["loaded"][(arch, variant, target)]
    if err:
        return dict(cell, outcome="fail", why="the target library cannot load it", message=err)
    ref = src["ref"]
    tol = REL_TOL * max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    cell.update(max_abs_diff=diff, tol=tol, effect=src["effect"], max_rel_fro=rec.get("max_rel_fro"))
    if not src["effect"] > EFFECT_OVER_TOL * tol:
        return dict(cell, outcome="fail", why="the source adapter barely changes the logits (test data)")
    if not diff <= tol:
        return dict(cell, outcome="fail", why="computes differently in the target library")
    return dict(cell, outcome="reproduces")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch,variant,target", [_param(c) for c in CELLS])
def test_cell(matrix, arch, variant, target):
    cell = judge(matrix, arch, variant, target)
    if (arch, variant, target) in KNOWN:
        cell["known"] = KNOWN[(arch, variant, target)]
    matrix["results"][(arch, variant, target)] = cell
    if cell["outcome"] == "n/a":
        pytest.skip(cell["message"])
    assert cell["outcome"] != "fail", f"{cell['why']}: {cell.get('message', '')} {cell.get('max_abs_diff', '')}"


def test_adapterhub_archs_are_what_adapters_supports(matrix):
    archs = {a for a, _ in SOURCES}
    supported = {a for (a, v), s in matrix["sources"].items() if s.get("slots")}
    assert sorted(supported) == sorted(archs & set(AH_ARCHS))


def test_docs_matrix_is_current(matrix):
    """docs/matrix.md is what scripts/gen_matrix.py renders from this run (after every cell ran)."""
    import importlib.util

    if len(matrix["results"]) < len(CELLS) or os.environ.get("LORA_MIGRATE_MATRIX_ARCHS"):
        pytest.skip("only part of the matrix ran")
    path = Path(__file__).resolve().parent.parent / "scripts" / "gen_matrix.py"
    spec = importlib.util.spec_from_file_location("gen_matrix", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    data = {"cells": [matrix["results"][c] for c in CELLS], "checked_by": A.CHECKED_BY}
    golden = json.loads(gen.GOLDEN.read_text()) if gen.GOLDEN.is_file() else None
    assert gen.DOC.read_text() == gen.render(data, golden), (
        "docs/matrix.md is out of date: LORA_MIGRATE_MATRIX_JSON=/tmp/m.json bash scripts/test.sh "
        "tests/test_matrix.py; .venv/bin/python scripts/gen_matrix.py /tmp/m.json")


def test_known_failures_are_cells():
    assert set(KNOWN) <= set(CELLS)
