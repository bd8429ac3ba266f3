#!/usr/bin/env python3
"""TEMPORARY driver of the ``diffusers`` golden family until golden/harness.py wires it in (stdlib only)::

    python3 golden/families/diffusers/run_local.py envs               # build golden/.venvs/{diffusers,sdscripts}
    python3 golden/families/diffusers/run_local.py generate [CASE …]  # bases + cases, results/diffusers.json
    python3 golden/families/diffusers/run_local.py report             # golden/FINDINGS_DIFFUSERS.md from results

It calls the worker the way the harness will: ``<venv>/bin/python worker.py generate JOB.json RESULT.json``.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent.parent
DATA = GOLDEN / "diffusers"
VENVS = GOLDEN / ".venvs"
RESULTS = GOLDEN / "results" / "diffusers.json"
FINDINGS = GOLDEN / "FINDINGS_DIFFUSERS.md"
TORCH_PIN = "torch==2.13.0"


def load_cases():
    spec = importlib.util.spec_from_file_location("diffusers_family_cases", HERE / "cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = load_cases()


def py(env: str) -> Path:
    return VENVS / env / "bin" / "python"


def sub_env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
             MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return e


def build_envs() -> None:
    VENVS.mkdir(parents=True, exist_ok=True)
    cons = VENVS / "constraints.txt"
    cons.write_text(TORCH_PIN + "\n")
    for env, spec in C.ENVS.items():
        vdir = VENVS / env
        marker = vdir / ".golden-recipe.json"
        recipe = {"torch": TORCH_PIN, **spec}
        if not (marker.exists() and json.loads(marker.read_text()) == recipe):
            if not py(env).exists():
                subprocess.run([sys.executable, "-m", "venv", str(vdir)], check=True)
            pip = [str(py(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
            subprocess.run(pip + [TORCH_PIN], check=True)
            subprocess.run(pip + ["-c", str(cons)] + spec["deps"], check=True)
            for step in spec.get("setup", []):
                subprocess.run(["bash", "-c", step], check=True, env={**sub_env(), "VENV": str(vdir)})
            marker.write_text(json.dumps(recipe, indent=1))
        freeze = subprocess.run([str(py(env)), "-m", "pip", "freeze", "--disable-pip-version-check"],
                                capture_output=True, text=True, check=True).stdout
        (DATA / env).mkdir(parents=True, exist_ok=True)
        (DATA / env / "pip-freeze.txt").write_text(freeze)
        print(f"[envs] {env}: ok")


def run_worker(env: str, job: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="golden-diffusers-") as td:
        jp, rp = Path(td) / "job.json", Path(td) / "result.json"
        jp.write_text(json.dumps(job))
        r = subprocess.run([str(py(env)), str(HERE / "worker.py"), "generate", str(jp), str(rp)], env=sub_env(),
                           check=False)
        if r.returncode:
            return {"error": f"worker exit {r.returncode}"}
        return json.loads(rp.read_text())["result"]


def case_dir(case_id: str) -> Path:
    # a case lives under the env that wrote its LoRA file (its first step's env)
    return DATA / C.CASES[case_id]["steps"][0][0] / case_id


def generate(only: list[str]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": {}, "bases": {}}
    families = sorted({C.CASES[c]["family"] for c in (only or C.CASES)})
    for fam in families:
        if only and (DATA / "_base" / fam / "inputs.safetensors").exists():
            continue
        print(f"[generate] _base/{fam}", flush=True)
        env, step = C.BASE_STEP
        results["bases"][fam] = run_worker(env, {
            "case": f"_base:{fam}", "case_data": {}, "step": step, "env": env,
            "paths": {"golden": str(DATA), "base_dir": str(DATA / "_base" / fam), "case_dir": ""}})
    for cid, case in C.CASES.items():
        if only and cid not in only:
            continue
        res = {}
        for env, step in case["steps"]:
            print(f"[generate] {cid}: {env}/{step}", flush=True)
            res[step] = run_worker(env, {"case": cid, "case_data": case, "step": step, "env": env,
                                         "paths": {"golden": str(DATA), "case_dir": str(case_dir(cid)),
                                                   "base_dir": str(DATA / "_base" / case["family"])}})
            if "error" in res[step]:
                break
        results["cases"][cid] = res
    results["date"] = datetime.date.today().isoformat()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    report()


def _f(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _dn(d) -> str:
    """'max (denoiser d)' of a maxdiff dict"""
    d = d or {}
    return f"{_f(d.get('max'))} (denoiser {_f(d.get('denoiser'))})"


def findings(results: dict) -> str:
    """FINDINGS_DIFFUSERS.md: one line per fact, each with its figure (generated; do not edit by hand)."""
    cases = results["cases"]
    lines = ["# Image-model LoRA goldens: measured facts (generated by golden/families/diffusers/run_local.py)", "",
             f"Date: {results.get('date')}. Envs: `diffusers` (diffusers 0.42.1, peft 0.21.2, transformers 5.23.0), "
             f"`sdscripts` (kohya-ss/sd-scripts {C.SD_SCRIPTS_COMMIT[:8]}, transformers 4.54.1, diffusers 0.32.1); "
             "torch 2.13.0 CPU, float32. Diffs are max |Δ| over the denoiser output and the text-encoder hidden "
             "states/pooled outputs. 'LoRA effect' = max |live − base|.", ""]
    lines.append("## Bases")
    for fam, r in sorted(results.get("bases", {}).items()):
        lines.append(f"- {fam}: params {r.get('params')}; rebuilt from the saved files: max diff "
                     f"{_f(r.get('rebuild_maxdiff'))}")
    lines += ["", "## diffusers format (save_lora_weights with lora_adapter_metadata → pipe.load_lora_weights)"]
    for cid, r in cases.items():
        c = C.CASES[cid]
        if c["kind"] == "diffusers":
            w = r.get("diffusers_write", {})
            lines.append(f"- `{cid}`: loaded vs live {_dn(w.get('loaded_vs_live'))} "
                         f"(LoRA effect {_dn(w.get('loaded_vs_base'))}); fuse_lora vs unfused "
                         f"{_f(w.get('fused_vs_loaded'))}; header keys {w.get('header_keys')}"
                         + (f"; ERROR {w['error']}" if "error" in w else ""))
    lines += ["", "## kohya format (sd-scripts' own network → save_weights → pipe.load_lora_weights)"]
    for cid, r in cases.items():
        c = C.CASES[cid]
        if c["kind"] == "kohya":
            w, ld = r.get("kohya_write", {}), r.get("kohya_load", {})
            s = (f"- `{cid}` ({c['module']}, dim {c['dim']}, alpha {c['alpha']}, {c['kwargs'] or 'no args'}): "
                 f"{w.get('modules')} modules, {w.get('alpha_keys')} `.alpha`; sd-scripts read-back vs live "
                 f"{_f(w.get('kohya_vs_live'))}; base in both envs {_f(ld.get('base_sdscripts_vs_diffusers_env', {}).get('max'))}; ")
            if "load_error" in ld:
                s += f"diffusers load_lora_weights RAISES `{ld['load_error'][:200]}`"
            else:
                s += (f"diffusers loaded vs sd-scripts {_dn(ld.get('loaded_vs_kohya'))}, vs live "
                      f"{_dn(ld.get('loaded_vs_live'))} (LoRA effect {_dn(ld.get('live_vs_base'))})")
            for st in ("error",):
                if st in w or st in ld:
                    s += f"; ERROR {w.get(st) or ld.get(st)}"
            if c.get("note"):
                s += f". {c['note']}"
            lines.append(s)
    lines += ["", "## Traps (what the real loader does with them; 'off by' = vs the correct outputs of the source)"]
    for cid, r in cases.items():
        c = C.CASES[cid]
        if not c["kind"].endswith("_trap"):
            continue
        ld = r.get("kohya_load") or r.get("diffusers_trap") or {}
        tr = r.get("kohya_trap", {})
        s = f"- `{cid}` ({c['edit']} of `{c['source']}`): "
        if "load_error" in ld:
            s += f"load_lora_weights RAISES `{ld['load_error'][:160]}`"
        else:
            s += (f"loads; off by {_dn(ld.get('loaded_vs_live'))} (LoRA effect {_dn(ld.get('live_vs_base'))}); "
                  f"warnings logged: {len(ld.get('load_warnings', []))}")
        if "spellings" in ld:
            s += f"; spellings in the file {ld['spellings']}, first key `{ld['first_key']}`"
        if "readback_error" in tr:
            s += f"; sd-scripts' own create_network_from_weights RAISES `{tr['readback_error'][:160]}`"
        if "kohya_vs_source_live" in tr:
            s += (f"; sd-scripts reading the same file: off by {_f(tr['kohya_vs_source_live'].get('max'))}")
            if "loaded_vs_kohya" in ld:
                s += f", diffusers vs sd-scripts {_f(ld['loaded_vs_kohya'].get('max'))}"
        if "with_unet_config" in ld:
            u = ld["with_unet_config"]
            s += ("; with `unet_config=pipe.unet.config`: " + (f"RAISES `{u['load_error']}`" if "load_error" in u
                  else f"off by {_f(u.get('loaded_vs_live', {}).get('max'))}"))
        for k in ("error",):
            for part in r.values():
                if k in part:
                    s += f"; ERROR {part[k]}"
        lines.append(s)
    lines += ["", "Files: golden/diffusers/<env>/<case>/ (the LoRA file as written, outputs.safetensors, meta.json); "
              "bases in golden/diffusers/_base/<family>/; package sets in golden/diffusers/<env>/pip-freeze.txt.", ""]
    return "\n".join(lines)


def report() -> None:
    FINDINGS.write_text(findings(json.loads(RESULTS.read_text())))
    print(f"[report] {FINDINGS}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("envs", "generate", "report"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if argv[0] == "envs":
        build_envs()
    elif argv[0] == "generate":
        bad = [c for c in argv[1:] if c not in C.CASES]
        if bad:
            print(f"unknown case(s): {' '.join(bad)}", file=sys.stderr)
            return 2
        generate(argv[1:])
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
