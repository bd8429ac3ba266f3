"""Temporary stdlib-only driver shared by the runtime families' run_local.py (gguf, mlx, torchtune).

golden/harness.py replaces this once it lands: it does the same things (venvs with torch==2.13.0 first and a
constraints file pinning it, a scratch folder outside the repo, one worker process per task, results JSON,
pip-freeze per env).
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

GOLDEN = Path(__file__).resolve().parents[1]
VENVS = GOLDEN / ".venvs"
TORCH = "torch==2.13.0"
# third-party code (sdists, fetched sources) and scratch files live outside the repo
WORK = Path(os.environ.get("GOLDEN_WORK", Path(tempfile.gettempdir()) / "lora-migrate-golden"))


def load_cases(family):
    spec = importlib.util.spec_from_file_location(f"{family}_cases", GOLDEN / "families" / family / "cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env_python(env):
    return VENVS / env / "bin" / "python"


def build_env(env, spec, *, force=False):
    """python3 -m venv; torch==2.13.0 first; then the deps with a constraints file pinning torch; then setup steps."""
    py = env_python(env)
    WORK.mkdir(parents=True, exist_ok=True)
    constraints = WORK / "torch-constraints.txt"
    constraints.write_text(TORCH + "\n")
    if py.exists() and not force:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(VENVS / env)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH], check=True)
    envvars = dict(os.environ, **spec.get("env", {}))
    subprocess.run(pip + ["-c", str(constraints)] + spec.get("pip_args", []) + spec["deps"], check=True, env=envvars)
    return py


def run_setup(spec, env):
    """The env's shell setup steps (e.g. unpack an sdist), run with WORK and PIP set; skipped when done before."""
    marker = WORK / f".setup-{env}"
    if marker.exists():
        return
    envvars = dict(os.environ, WORK=str(WORK), PIP=f"{env_python(env)} -m pip")
    for step in spec.get("setup", []):
        subprocess.run(step, shell=True, check=True, env=envvars)
    marker.write_text("done\n")


def pip_freeze(env, dest):
    # `pip list --format=freeze`: name==version also for a package built from a local sdist (no file:// path)
    out = subprocess.run([str(env_python(env)), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                         text=True, check=True).stdout
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text("".join(ln + "\n" for ln in sorted(out.splitlines()) if not ln.startswith("-e ")))


def run_worker(family, env, task, job, *, timeout=3600):
    """Run families/<family>/worker.py TASK JOB.json RESULT.json in the env's venv; returns RESULT (or an error row).
    PYTHONHASHSEED=0: peft writes target_modules from a set, so its order follows string hashing."""
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jp.write_text(json.dumps(job, indent=1))
        worker = GOLDEN / "families" / family / "worker.py"
        p = subprocess.run([str(env_python(env)), str(worker), task, str(jp), str(rp)], capture_output=True,
                           text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                                 TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0"))
        if p.returncode or not rp.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
            print(f"  {family}/{task} failed (exit {p.returncode}):\n    " + "\n    ".join(tail), file=sys.stderr)
            return {"ok": False, "error": tail[-3:]}
        return json.loads(rp.read_text())


def generate_with_bases(family, cases_mod, cases, extra=None):
    """Per env: the ``base`` task once per architecture the selected cases use (golden/<family>/<env>/_base/<arch>),
    then ``generate`` per case (golden/<family>/<env>/<case>); pip-freeze per env; results merged into
    golden/results/<family>.json. GOLDEN_SKIP_BASES=1 keeps bases that exist."""
    extra = extra or {}
    results = {}
    for env in sorted({cases_mod.CASES[c]["env"] for c in cases}):
        root = GOLDEN / family / env
        mine = [c for c in cases if cases_mod.CASES[c]["env"] == env]
        for arch in sorted({cases_mod.CASES[c]["arch"] for c in mine}):
            if os.environ.get("GOLDEN_SKIP_BASES") and (root / "_base" / arch / "meta.json").exists():
                continue  # e.g. two drivers splitting the cases after one wrote the bases
            print(f"{family}/{env}/_base/{arch}", flush=True)
            job = dict(extra, arch=arch, base_dir=str(root / "_base" / arch),
                       scratch=str(WORK / "scratch" / family / env / "_base" / arch))
            results[f"{env}/_base/{arch}"] = run_worker(family, env, "base", job)
        for case in mine:
            d = cases_mod.CASES[case]
            print(f"{family}/{env}/{case}", flush=True)
            job = dict(extra, case=case, data=d, base_dir=str(root / "_base" / d["arch"]), case_dir=str(root / case),
                       scratch=str(WORK / "scratch" / family / env / case))
            results[f"{env}/{case}"] = run_worker(family, env, "generate", job)
        pip_freeze(env, root / "pip-freeze.txt")
    return write_results(family, results)


def write_results(family, results):
    path = GOLDEN / "results" / f"{family}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = dict(old.get("results", {}), **results)
    doc = {"family": family, "date": datetime.date.today().isoformat(), "results": dict(sorted(merged.items()))}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def read_results(family):
    return json.loads((GOLDEN / "results" / f"{family}.json").read_text())


def write_findings(family, lines):
    path = GOLDEN / f"FINDINGS_{family.upper()}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def main(family, cases_mod, generate, findings, argv=None):
    """run_local.py's CLI: envs | generate [--case C ...] | report. Exit 0 when every result is as expected."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"golden/families/{family}/run_local.py")
    ap.add_argument("command", choices=["envs", "generate", "report"])
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--force", action="store_true", help="rebuild the venvs")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [c for c in a.case if c not in cases_mod.CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if a.command in ("envs", "generate"):
        for env, spec in cases_mod.ENVS.items():
            if a.command == "envs":
                build_env(env, spec, force=a.force)
            run_setup(spec, env)
        if a.command == "envs":
            return 0
        doc = generate(a.case or list(cases_mod.CASES))
    else:
        doc = read_results(family)
    print(write_findings(family, findings(doc)))
    bad = [k for k, r in doc["results"].items() if not r.get("ok")]
    if bad:
        print("not as expected: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0
