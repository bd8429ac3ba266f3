#!/usr/bin/env python3
"""The acceptance matrix's older PEFT eras, checked in the REAL old libraries (the golden environments).

CI checks `peft-0.13` / `peft-0.15` outputs with peft 0.21.2 (tests/test_matrix.py); this script loads the same
conversions in peft 0.13.2 (transformers 4.46.3) and peft 0.15.2 (transformers 4.51.3), the venvs
`python3 golden/harness.py envs --env pf013 pf152` builds (golden/.venvs/pf013, pf152, or under GOLDEN_VENVS as
the harness), and writes the results to golden/results/matrix_peft_eras.json (committed) and a summary on stdout.

    .venv/bin/python scripts/matrix_golden.py [--work /tmp/matrix_golden] [--archs llama,gpt2]

Host side (this venv: peft 0.21.2, adapters 1.3.0, transformers 4.57.6): make every source as the matrix does
(tests/archs.py), save each base model's weights, convert with ONE `lora-migrate batch` call to peft-0.13 and
peft-0.15. Worker side (`<golden venv>/bin/python scripts/matrix_golden.py _worker ...`): rebuild each base from
the same config class with the saved weights, `PeftModel.from_pretrained` each output, save the logits.

A cell reproduces when max |Δlogit| against the source's logits (computed with peft 0.21.2 / transformers
4.57.6) is within the matrix's tolerance (256·ε·max|logit|) plus how far the old transformers already is from
the new one on the same weights without any peft: the base model, and the base with the source adapter merged
into its weights by peft 0.21.2 (`merge_and_unload`; an AdapterHub source through its `peft` conversion, which
the CI matrix proves equal). When that drift exceeds 16× the tolerance the
old transformers computes another model and the cell is n/a. Refused cells are judged by the CI matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVS = {"peft-0.15": "pf152", "peft-0.13": "pf013"}
OUT_JSON = ROOT / "golden" / "results" / "matrix_peft_eras.json"


def host(args) -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from tests import archs as A

    A.worker_init()
    work = Path(args.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    archs = args.archs.split(",") if args.archs else list(A.ARCHS)
    t0 = time.perf_counter()
    sources, rows = {}, []
    for arch in archs:
        base = work / "base" / arch
        model = A.build(arch)
        model.config.save_pretrained(base)
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
        torch.save(A.logits(model, arch), base / "logits.pt")
        variants = list(A.peft_variants(arch)) + (list(A.ADAPTERHUB_VARIANTS) if A.adapterhub_slots(arch) else [])
        for i, v in enumerate(variants):
            src = work / "src" / f"{arch}.{v}"
            r = A.try_source(arch, v, src, base, 100 + i)
            if "error" in r:
                continue
            torch.save(r["ref"], work / "src" / f"{arch}.{v}.ref.pt")
            if v not in A.ADAPTERHUB_VARIANTS:
                save_merged(A, work, arch, v, src)
            sources[(arch, v)] = r
            rows += [{"source": str(src), "to": t, "name": f"{arch}.{v}.{t}"} for t in ENVS]
            if v in A.ADAPTERHUB_VARIANTS:  # for the control below (peft 0.21.2 reproduces it: the CI matrix)
                rows.append({"source": str(src), "to": "peft", "name": f"{arch}.{v}.peft"})
    (work / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "lora_migrate.cli", "batch", str(work / "manifest.jsonl"), "--out",
                    str(work / "out"), "-j", "2"], capture_output=True, text=True)
    report = {r["name"]: r for r in map(json.loads, (work / "out" / "report.jsonl").read_text().splitlines())}
    for name in [n for n in report if n.endswith(".peft")]:
        arch, v, _ = name.split(".", 2)
        if report.pop(name)["status"] == "ok":
            save_merged(A, work, arch, v, work / "out" / name)
    t1 = time.perf_counter()
    cells = []
    for target, env in ENVS.items():
        py = Path(os.environ.get("GOLDEN_VENVS") or ROOT / "golden" / ".venvs") / env / "bin" / "python"
        if not py.exists():
            print(f"{env}: no venv ({py}); run python3 golden/harness.py envs --env {env}", file=sys.stderr)
            return 2
        jobs = [n for n, r in report.items() if r["to"] == target and r["status"] == "ok"]
        (work / f"jobs-{env}.json").write_text(json.dumps(jobs))
        p = subprocess.run([str(py), __file__, "_worker", str(work), env], capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        got = json.loads((work / f"result-{env}.json").read_text())
        versions = got.pop("_versions")
        for name in sorted(n for n, r in report.items() if r["to"] == target):
            arch, v, _ = name.split(".", 2)
            cell = {"arch": arch, "variant": v, "target": target, "checked_in": versions}
            rec = report[name]
            if rec["status"] != "ok":
                cells.append(dict(cell, outcome="refused" if rec["exit_code"] == 2 else "fail",
                                  message=rec["error"]))
                continue
            g = got[name]
            if "na" in g:
                cells.append(dict(cell, outcome="n/a", message=g["na"]))
                continue
            if "error" in g:
                cells.append(dict(cell, outcome="fail", why="the old library cannot load it", message=g["error"]))
                continue
            ref = torch.load(work / "src" / f"{arch}.{v}.ref.pt")
            new_base = torch.load(work / "base" / arch / "logits.pt")
            old = torch.load(g["logits"])
            base_drift = (torch.load(g["base_logits"]) - new_base).abs().max().item()
            if g.get("merged_logits"):  # the same weights with the adapter merged: the drift where it matters
                new_merged = torch.load(work / "src" / f"{arch}.{v}.merged.pt")
                base_drift = max(base_drift, (torch.load(g["merged_logits"]) - new_merged).abs().max().item())
            tol = 256 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
            if base_drift > 16 * tol:  # more than the rounding of another implementation of the same forward
                cells.append(dict(cell, outcome="n/a", base_drift=base_drift,
                                  message="the old transformers computes another model on the same weights (base, or "
                                          "with the adapter merged in)"))
                continue
            tol += base_drift
            diff = (old - ref).abs().max().item()
            cells.append(dict(cell, outcome="reproduces" if diff <= tol else "fail", max_abs_diff=diff, tol=tol,
                              base_drift=base_drift,
                              **({} if diff <= tol else {"why": "computes differently in the old library"})))
    t2 = time.perf_counter()
    from collections import Counter

    n = Counter((c["target"], c["outcome"]) for c in cells)
    OUT_JSON.write_text(json.dumps({"cells": cells, "seconds": {"sources+batch": t1 - t0, "loads": t2 - t1}},
                                   indent=1) + "\n")
    for t in ENVS:
        print(f"{t} in {ENVS[t]}: " + ", ".join(f"{o} {n[(t, o)]}" for o in ("reproduces", "refused", "fail", "n/a")))
    for c in cells:
        if c["outcome"] == "fail":
            print(f"  FAIL {c['arch']}/{c['variant']}→{c['target']}: {c.get('why', '')} "
                  f"{c.get('message', '')[:200]} {c.get('max_abs_diff', '')}")
    print(f"wrote {OUT_JSON} ({t2 - t0:.0f} s)")
    return 0


def save_merged(A, work: Path, arch: str, v: str, adapter: Path) -> None:
    """The control: ``adapter`` merged into the base weights by peft 0.21.2 (``merge_and_unload``), its weights
    and logits; the old environment computes the same weights without any peft."""
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file

    try:
        merged = PeftModel.from_pretrained(A.build(arch), adapter).merge_and_unload().eval()
    except RuntimeError:  # e.g. lora_bias on a layer without bias: no merged control
        return
    save_file({k: t.clone().contiguous() for k, t in merged.state_dict().items()},
              str(work / "src" / f"{arch}.{v}.merged.safetensors"))
    torch.save(A.logits(merged, arch), work / "src" / f"{arch}.{v}.merged.pt")


def worker(work: Path, env: str) -> None:
    """In a golden venv: load every converted output named in jobs-<env>.json with the real old peft."""
    import warnings

    warnings.filterwarnings("ignore")
    import peft
    import torch
    import transformers as tf
    from peft import PeftModel
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from tests import archs as A

    torch.set_num_threads(1)
    tf.logging.set_verbosity_error()
    bases, out = {}, {"_versions": f"peft {peft.__version__}, transformers {tf.__version__}"}
    for name in json.loads((work / f"jobs-{env}.json").read_text()):
        arch = name.split(".", 1)[0]
        a = A.ARCHS[arch]
        if not hasattr(tf, a.cls):
            out[name] = {"na": f"transformers {tf.__version__} has no {a.cls}"}
            continue
        try:
            if arch not in bases:
                model = getattr(tf, a.cls)(A.config(arch)).eval()
                model.load_state_dict(load_file(str(work / "base" / arch / "model.safetensors")), strict=True)
                torch.save(A.logits(model, arch), work / "base" / arch / f"logits-{env}.pt")
                bases[arch] = model
            import copy

            m = PeftModel.from_pretrained(copy.deepcopy(bases[arch]), str(work / "out" / name)).eval()
            path = work / "out" / f"{name}.logits-{env}.pt"
            torch.save(A.logits(m, arch), path)
            out[name] = {"logits": str(path), "base_logits": str(work / "base" / arch / f"logits-{env}.pt")}
            src = ".".join(name.split(".")[:2])
            merged = work / "src" / f"{src}.merged.safetensors"
            if merged.exists():  # the control, without peft
                mm = copy.deepcopy(bases[arch])
                mm.load_state_dict(load_file(str(merged)), strict=True)
                torch.save(A.logits(mm, arch), work / "src" / f"{src}.merged-{env}.pt")
                out[name]["merged_logits"] = str(work / "src" / f"{src}.merged-{env}.pt")
        except Exception as e:  # noqa: BLE001 — the old library (or transformers) cannot: the cell says so
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    (work / f"result-{env}.json").write_text(json.dumps(out))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(Path(sys.argv[2]), sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/matrix_golden")
    p.add_argument("--archs", help="comma-separated subset of tests/archs.py's architectures")
    return host(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
