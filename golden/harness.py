#!/usr/bin/env python3
"""Golden checkpoints for lora-migrate, written by the REAL libraries: one harness for every family.

Run with the system python3 (stdlib only; everything that needs torch runs in a family's worker.py inside an env's
venv)::

    python3 golden/harness.py envs     [--family F …] [--env E …]    create/refresh golden/.venvs/<env> (idempotent)
    python3 golden/harness.py generate [--family F …] [--case C …]   write goldens, results/<family>.json checks,
                                                                      results/FINDINGS_<FAMILY>.md
    python3 golden/harness.py accept   [--family F …] [--converter "CMD"] [--out FILE]
                                                                      convert goldens, load them in the real libs
    python3 golden/harness.py report   [--family F …]                 FINDINGS again from results/<family>.json

A family is golden/families/<family>/{cases.py,worker.py}; golden/README.md says what each must hold, what the
harness passes to the worker (JOB.json) and what it expects back (RESULT.json). ``GOLDEN_VENVS=DIR`` puts the venvs
elsewhere (default golden/.venvs); ``GOLDEN_WORK=DIR`` is the scratch folder outside the repository for
unpacked sources and workers' temporary files (default $TMPDIR/lora-migrate-golden).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent
FAMILIES = GOLDEN / "families"
RESULTS = GOLDEN / "results"
VENVS = Path(os.environ.get("GOLDEN_VENVS") or GOLDEN / ".venvs").resolve()
# third-party sources (unpacked sdists, fetched checkouts) and scratch files: never inside the repository
WORK = Path(os.environ.get("GOLDEN_WORK") or Path(tempfile.gettempdir()) / "lora-migrate-golden").resolve()
TORCH_PIN = "torch==2.13.0"
DEFAULT_CONVERTER = str(GOLDEN.parent / ".venv" / "bin" / "lora-migrate")  # this checkout's
# converter arguments of an acceptance row without "args"; {case} {src} {out} {target} are filled in
DEFAULT_ARGS = ["convert", "{src}", "{out}", "--to", "{target}", "--json"]
# converter output that means "not built yet" rather than a wrong answer
PENDING_PATTERNS = [r"not supported yet", r"unknown convention", r"no such option", r"no such command",
                    r"not implemented"]


# ==================================================================================================
# Families
# ==================================================================================================
class Family:
    """golden/families/<name>: ``cases`` is its cases.py (data), ``worker`` the path of its worker.py."""

    def __init__(self, folder: Path):
        self.name = folder.name
        self.worker = folder / "worker.py"
        spec = importlib.util.spec_from_file_location(f"golden_cases_{self.name}", folder / "cases.py")
        self.cases = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.cases)
        self.envs: dict = self.cases.ENVS
        self.case_data: dict = self.cases.CASES
        self.acceptance: list = getattr(self.cases, "ACCEPTANCE", [])
        self.tol: float = getattr(self.cases, "TOL", 1e-5)
        # stage tasks run in one worker process per case (the library keeps state between cases: sd-scripts)
        self.isolate: list = getattr(self.cases, "ISOLATE_TASKS", [])
        self.data = GOLDEN / getattr(self.cases, "DATA_DIR", self.name)
        self.results = RESULTS / f"{self.name}.json"
        self.findings = RESULTS / f"FINDINGS_{self.name.upper()}.md"

    def case_env(self, case: str) -> str:
        return self.case_data[case].get("env") or case.split("/")[0]

    def stages(self, case: str) -> list:
        """[(task, env), …] a case's generation runs through, in order: its ``stages``, else generate in its env."""
        return [tuple(s) for s in self.case_data[case].get("stages", [("generate", self.case_env(case))])]

    def stage_envs(self, cases=None) -> list:
        """The family's own envs and every env a stage of ``cases`` (default all) runs in, in first-use order."""
        cases = self.case_data if cases is None else cases
        return list(dict.fromkeys([*self.envs, *(env for c in cases for _, env in self.stages(c))]))

    def freeze_path(self, env: str) -> Path:
        """The committed pip-freeze.txt of one of this family's envs."""
        return self.data / env / "pip-freeze.txt"

    def read_results(self) -> dict:
        return json.loads(self.results.read_text()) if self.results.exists() else {}

    def write_results(self, **parts) -> None:
        """Replace ``checks`` and/or ``acceptance`` in results/<family>.json, keeping the other part. Keys keep the
        order the harness and workers made them in (no sorting), so ``report`` rebuilds the same FINDINGS."""
        results = {**self.read_results(), **parts}
        RESULTS.mkdir(exist_ok=True)
        self.results.write_text(json.dumps(results, indent=2) + "\n")


def families() -> dict:
    return {p.parent.name: Family(p.parent) for p in sorted(FAMILIES.glob("*/cases.py"))}


def all_envs(fams: dict) -> dict:
    """env name → (family, recipe) over every family; env names are global (one golden/.venvs/<env> each)."""
    out = {}
    for fam in fams.values():
        for env, spec in fam.envs.items():
            if env in out:
                raise SystemExit(f"env {env!r} is defined by both {out[env][0].name} and {fam.name}")
            out[env] = (fam, spec)
    return out


def case_dir(fams: dict, case: str) -> Path:
    """The folder of any family's case (acceptance rows may name another family's case)."""
    for fam in fams.values():
        if case in fam.case_data:
            return fam.data / case
    raise SystemExit(f"unknown case {case!r}")


# ==================================================================================================
# Envs and workers
# ==================================================================================================
def env_python(env: str) -> Path:
    return VENVS / env / "bin" / "python"


def env_subprocess_env(spec: dict | None = None) -> dict:
    """The environment of every worker, import check and build step: offline, PYTHONHASHSEED=0 (peft writes
    target_modules from a set, so its order follows string hashing), one OpenMP thread, GOLDEN_WORK, plus the env
    recipe's own ``env`` variables (e.g. CMAKE_ARGS for a build from an sdist)."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONHASHSEED="0",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore", GOLDEN_WORK=str(WORK))
    e.update((spec or {}).get("env", {}))
    return e


def pip_freeze(env: str) -> str:
    """``pip freeze --all``, with a package installed from a local file (an sdist built here) as name==version."""
    py = str(env_python(env))
    out = subprocess.run([py, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    if " @ file:" not in out:
        return out
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    version = {ln.split("==")[0].lower().replace("-", "_"): ln for ln in listed}
    return "".join((version[ln.split(" @ ")[0].lower().replace("-", "_")] if " @ file:" in ln else ln) + "\n"
                   for ln in out.splitlines())


def _packages(freeze: str) -> list:
    """The pinnable lines of a pip freeze: name==version, without the installer's own pip/setuptools/wheel."""
    return [ln for ln in freeze.splitlines() if "==" in ln and not ln.startswith(("pip==", "setuptools==", "wheel=="))]


def imports_ok(env: str, spec: dict) -> bool:
    """torch is 2.13.0 in ``env``'s venv and the recipe's ``check`` code runs."""
    if not env_python(env).exists():
        return False
    code = "import torch\nassert torch.__version__.startswith('2.13.0'), torch.__version__\n" + spec.get("check", "")
    r = subprocess.run([str(env_python(env)), "-c", code], env=env_subprocess_env(spec), capture_output=True,
                       text=True, check=False)
    if r.returncode:
        print(r.stderr[-2000:])
    return r.returncode == 0


def build_envs(recipes: dict) -> None:
    """Create or refresh each env (name → (recipe, pip-freeze.txt path)), idempotently: an env whose recorded
    recipe matches and whose import check passes is left alone. torch is installed FIRST from the local CPU wheel;
    the deps (with the recipe's pip_args) and then the ``setup`` shell steps run with a constraints file pinning
    it, and pinning every package to the version in the env's committed pip-freeze.txt (the set its goldens were
    made with; delete that file to take newer versions, then regenerate every case of the env). The recipe's
    ``env`` variables are set for every step; ``setup`` steps run in the venv folder with {pip} {python} {venv}
    {constraints} {golden} {work} filled in ({work}: GOLDEN_WORK, for unpacked sources)."""
    VENVS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    for env, (spec, freeze) in recipes.items():
        constraints = VENVS / f"constraints-{env}.txt"
        pins = [ln for ln in _packages(freeze.read_text() if freeze.exists() else "") if not ln.startswith("torch==")]
        constraints.write_text("\n".join([TORCH_PIN, *pins]) + "\n")
        vdir = VENVS / env
        marker = vdir / ".golden-recipe.json"
        recipe = {"torch": TORCH_PIN, **spec, "pinned": pins}
        if marker.exists() and json.loads(marker.read_text()) == recipe and imports_ok(env, spec):
            print(f"[envs] {env}: up to date")
            continue
        print(f"[envs] {env}: building", flush=True)
        if not env_python(env).exists() or subprocess.run([str(env_python(env)), "-m", "pip", "--version"],
                                                          capture_output=True, check=False).returncode:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(vdir)], check=True)  # new, or half-made
        pip = [str(env_python(env)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        build_env = env_subprocess_env(spec)
        subprocess.run(pip + [TORCH_PIN], check=True, env=build_env)
        pip_c = pip + ["-c", str(constraints)]
        if spec.get("deps"):
            subprocess.run(pip_c + spec.get("pip_args", []) + spec["deps"], check=True, env=build_env)
        fill = {"{pip}": shlex.join(pip_c), "{python}": str(env_python(env)), "{venv}": str(vdir),
                "{constraints}": str(constraints), "{golden}": str(GOLDEN), "{work}": str(WORK)}
        for step in spec.get("setup", []):
            subprocess.run(_fill(step, fill), shell=True, cwd=vdir, check=True, env=build_env)
        if not imports_ok(env, spec):
            raise SystemExit(f"[envs] {env}: import check failed")
        marker.write_text(json.dumps(recipe, indent=1))
        print(f"[envs] {env}: ok")


def _fill(text: str, values: dict) -> str:
    for k, v in values.items():
        text = text.replace(k, v)
    return text


def run_worker(fam: Family, env: str | None, task: str, job: dict) -> dict:
    """``<venv of env>/bin/python families/<family>/worker.py TASK JOB.json RESULT.json``; ``env`` None runs it
    with this python (the ``report`` task, which needs no library)."""
    python = sys.executable if env is None else str(env_python(env))
    if env is not None and not env_python(env).exists():
        raise SystemExit(f"env {env} missing: run `python3 golden/harness.py envs --env {env}` first")
    spec = all_envs(families())[env][1] if env is not None else None
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"golden-{fam.name}-{env}-") as td:
        jpath, rpath = Path(td) / "job.json", Path(td) / "result.json"
        jpath.write_text(json.dumps({"family": fam.name, "env": env, "golden": str(GOLDEN), "data_dir": str(fam.data),
                                     "work": str(WORK), **job}))
        r = subprocess.run([python, str(fam.worker), task, str(jpath), str(rpath)], env=env_subprocess_env(spec),
                           check=False)
        if r.returncode:
            raise SystemExit(f"{fam.name} worker {task} in {env} failed (exit {r.returncode})")
        return json.loads(rpath.read_text())


def serve_worker(tasks: dict, make_ctx, seed: int | None = None) -> None:
    """The worker's side of :func:`run_worker` (call it from worker.py's ``__main__``): ``TASK JOB.json RESULT.json``
    on the command line. ``report`` gets the job only; every other task gets ``make_ctx(job["env"])`` (an object
    with ``.torch``: one torch thread, seeded with ``seed`` when given) and the job."""
    task, jpath, rpath = sys.argv[1:4]
    job = json.loads(Path(jpath).read_text())
    if task == "report":
        out = tasks[task](job)
    else:
        import logging
        import warnings
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        ctx = make_ctx(job["env"])
        ctx.torch.set_num_threads(1)
        if seed is not None:
            ctx.torch.manual_seed(seed)
        out = tasks[task](ctx, job)
    Path(rpath).write_text(json.dumps(out))


def maxdiff(a, b) -> float:
    """max |a − b| of two tensors, as a float (for workers)."""
    return float((a - b).abs().max().item())


def capture_io(model, wanted, forward) -> list:
    """Run ``forward()`` with a hook on every module of ``model`` for which ``wanted(module)`` holds (for workers);
    returns [(module name, module, first input, output)] in call order, detached."""
    captured, hooks = [], []
    for mname, mod in model.named_modules():
        if wanted(mod):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, mname=mname: captured.append((mname, m, i[0].detach(), o.detach()))))
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return captured


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


# ==================================================================================================
# Commands
# ==================================================================================================
def cmd_envs(fams: dict, chosen: list, only_envs) -> None:
    """The chosen families' envs, and the envs their acceptance rows load outputs in (maybe another family's)."""
    known = all_envs(fams)
    names = [e for fam in chosen for e in [*fam.stage_envs(), *(r["env"] for r in fam.acceptance)]]
    unknown = sorted(set(only_envs or ()) - set(known)) or sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown env(s) {unknown}; envs: {', '.join(known)}")
    names = [e for e in dict.fromkeys(names) if not only_envs or e in only_envs]
    if only_envs:
        names += [e for e in only_envs if e not in names]
    build_envs({e: (known[e][1], known[e][0].freeze_path(e)) for e in names})


def cmd_generate(fams: dict, chosen: list, only_cases) -> None:
    """Every case of the chosen families, or only ``--case`` ones: then nothing else is touched (the envs' folders
    are not wiped, pip-freeze.txt is only checked) and the new measurements are merged into the results."""
    unknown = sorted(set(only_cases or ()) - {c for fam in chosen for c in fam.case_data})
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {', '.join(c for f in chosen for c in f.case_data)}")
    for fam in chosen:
        cases = [c for c in fam.case_data if only_cases is None or c in only_cases]
        if cases:
            generate_family(fams, fam, cases, partial=only_cases is not None)


def generate_family(fams: dict, fam: Family, chosen: list, partial: bool) -> None:
    """Run the chosen cases' stages (stage i of every case before stage i+1; one worker per (task, env) group, cases
    in CASES order), then the ``check`` task in every env of the family, the results and FINDINGS. A full run
    rewrites pip-freeze.txt of the family's own envs; with ``--case``, or for another family's env, the env's
    packages (pip/setuptools/wheel aside) must equal the committed pip-freeze.txt (a family's new env, with no
    pip-freeze.txt and no goldens yet, gets it written)."""
    known = all_envs(fams)
    stages = {c: fam.stages(c) for c in chosen}
    freezes = {}
    for env in dict.fromkeys(env for c in chosen for _, env in stages[c]):
        owner, path, freeze = known[env][0], known[env][0].freeze_path(env), pip_freeze(env)
        new = owner is fam and not path.exists() and not any((fam.data / env).glob("*/meta.json"))
        if (partial or owner is not fam) and not new and (
                not path.exists() or _packages(path.read_text()) != _packages(freeze)):
            raise SystemExit(f"{env}: the env's packages differ from {path}; regenerate every case of "
                             f"{owner.name} (without --case) so that all of them are made with the same set")
        if owner is fam and (new or not partial):
            freezes[path] = freeze  # a new env of the family (no goldens yet): its first cases may come by --case
    if not partial:
        for env in fam.envs:
            if any(env == e for c in chosen for _, e in stages[c]):
                shutil.rmtree(fam.data / env, ignore_errors=True)
    for c in chosen:
        shutil.rmtree(fam.data / c, ignore_errors=True)
    for path in freezes:
        path.parent.mkdir(parents=True, exist_ok=True)
    measured, sections = {c: {} for c in chosen}, {}
    for i in range(max(len(s) for s in stages.values())):
        groups = {}
        for c in chosen:
            if i < len(stages[c]):
                groups.setdefault(stages[c][i], []).append(c)
        for (task, env), cases in groups.items():
            print(f"[generate] {fam.name}: {task} in {env}, {len(cases)} case(s)", flush=True)
            for batch in ([[c] for c in cases] if task in fam.isolate else [cases]):
                res = run_worker(fam, env, task, {"cases": {c: fam.case_data[c] for c in batch}})
                for c, facts in res.get("measured", {}).items():
                    measured[c].update(facts)
                for section, found in res.get("sections", {}).items():
                    sections.setdefault(section, {}).setdefault(env, {}).update(found)
    for path, freeze in freezes.items():
        path.write_text(freeze)
    # facts the workers returned, else the ``measured`` they put in meta.json (read before `check`, which may add
    # to meta.json)
    for c in chosen:
        measured[c] = measured[c] or json.loads((fam.data / c / "meta.json").read_text()).get("measured", {})

    today = datetime.date.today().isoformat()
    old = fam.read_results().get("checks", {}) if partial else {}
    checks = old or {"date": today, "tolerance": fam.tol, "env_versions": {}}
    if partial:
        checks.setdefault("added", {}).update({c: today for c in chosen})
    for section, per_env in sections.items():
        for env, found in per_env.items():
            checks.setdefault(section, {}).setdefault(env, {}).update(found)
    for env in fam.stage_envs():
        print(f"[generate] {fam.name}/{env}: checks", flush=True)
        res = run_worker(fam, env, "check", {"cases": {c: fam.case_data[c] for c in chosen}})
        checks["env_versions"][env] = res.pop("versions")
        for section, found in res.items():
            checks.setdefault(section, {}).setdefault(env, {}).update(found)
    before = checks.get("cases", {})
    checks["cases"] = {c: measured.get(c, before.get(c)) for c in fam.case_data if c in measured or c in before}
    fam.write_results(checks=checks)
    write_findings(fam)
    total = sum(p.stat().st_size for p in fam.data.rglob("*") if p.is_file())
    print(f"[generate] {fam.name} done; its data folder takes {total / 1e6:.2f} MB")


def write_findings(fam: Family) -> None:
    md = run_worker(fam, None, "report", {"results": fam.read_results()})["markdown"]
    fam.findings.write_text(md)
    print(f"[report] {fam.findings.relative_to(GOLDEN.parent)}")


def cmd_accept(fams: dict, chosen: list, converter: str, out_file: str | None) -> None:
    conv = shlex.split(converter)
    for fam in chosen:
        result = accept_family(fams, fam, conv, converter)
        if out_file:
            Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
        else:
            fam.write_results(acceptance=result)
        print(f"{fam.name}: {result['summary']} -> {out_file or fam.results.relative_to(GOLDEN.parent)}")


def accept_family(fams: dict, fam: Family, conv: list, converter: str) -> dict:
    """Run the converter on every ACCEPTANCE row and load what it wrote in the row's env (the family's worker,
    task load_check). Status per row: ok, failed, or pending (converter missing, or it says not built yet)."""
    work = Path(tempfile.mkdtemp(prefix=f"golden-{fam.name}-accept-"))
    conv_found = bool(conv) and (Path(conv[0]).exists() or shutil.which(conv[0]) is not None)
    records, jobs = [], {}
    for i, row in enumerate(fam.acceptance):
        case, expect, env = row["case"], row["expect"], row["env"]
        cdir = case_dir(fams, case)
        src = cdir / row.get("source", "adapter")
        out = work / f"{i:02d}" / "out"
        out.parent.mkdir(parents=True)
        args = row.get("args", DEFAULT_ARGS) + row.get("extra_args", [])
        rel = {"{case}": str(cdir.relative_to(GOLDEN.parent)), "{src}": str(src.relative_to(GOLDEN.parent)),
               "{out}": "<tmp>/out", "{target}": row["target"]}
        argv = [_fill(a, {"{case}": str(cdir), "{src}": str(src), "{out}": str(out), "{target}": row["target"]})
                for a in args]
        rec = {"case": case, "source": row.get("source", "adapter"), "target": row["target"], "env": env,
               "expect": expect, "command": " ".join([converter] + [_fill(a, rel) for a in args]), "exit_code": None,
               "message": None, "max_abs_diff": None, "status": "pending"}
        if row.get("note"):
            rec["note"] = row["note"]
        records.append(rec)
        if not conv_found:
            rec["message"] = f"converter {converter!r} not found"
            continue
        p = subprocess.run(conv + argv, capture_output=True, text=True, check=False)
        msg = [ln for ln in ((p.stderr or "").strip() or (p.stdout or "").strip()).splitlines() if ln.strip()]
        rec["exit_code"] = p.returncode
        if p.returncode != 0:
            rec["message"] = msg[0] if msg else ""
            rec["message_lines"] = len(msg)
            if len(msg) > 1:
                rec["output"] = "\n".join(msg)[:1500]
            if any(re.search(pat, " ".join(msg), re.I) for pat in PENDING_PATTERNS):
                rec["status"] = "pending"
            elif expect == "refused":  # a clean refusal: exit 2, one line, not a crash
                clean = p.returncode == 2 and len(msg) == 1 and not re.search(r"internal error|traceback", msg[0],
                                                                               re.I)
                rec["status"] = "ok" if clean else "failed"
            else:
                rec["status"] = "failed"
            continue
        if expect == "refused":
            rec["status"], rec["message"] = "failed", "converter accepted a case it must refuse"
            continue
        rec["_item"] = {"row": row, "case": case, "case_dir": str(cdir), "out": str(out)}
        jobs.setdefault(env, []).append(rec)
    for env, recs in jobs.items():
        res = run_worker(fam, env, "load_check", {"items": [r["_item"] for r in recs]})["items"]
        for r, per in zip(recs, res, strict=True):
            _score(r, per, fam.tol)
    for r in records:
        r.pop("_item", None)
    shutil.rmtree(work, ignore_errors=True)
    summary = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "pending")}
    print(f"{'case':30} {'source':14} {'target':24} {'env':6} {'expect':8} {'exit':>4} {'max|Δ|':>9}  status")
    for r in records:
        print(f"{r['case']:30} {r['source']:14} {r['target']:24} {r['env']:6} {r['expect']:8} "
              f"{fmt(r['exit_code']):>4} {fmt(r['max_abs_diff']):>9}  {r['status']}"
              + (f"  ({r['message'][:100]})" if r.get("message") else ""))
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "converter": converter,
            "tolerance": fam.tol, "summary": summary, "records": records}


def _score(rec: dict, per: list, tol: float) -> None:
    """Fold the worker's per-adapter results of one row into its record: the max diff, ok when every adapter
    loaded and matched (within the family's TOL, or the ``tolerance`` the worker reports). One adapter: its extra fields go in the record; several: ``per_adapter``."""
    errs = [p["error"] for p in per if p.get("error")]
    diffs = [p["max_abs_diff"] for p in per if p.get("max_abs_diff") is not None]
    tols = [p["tolerance"] for p in per if p.get("tolerance") is not None]
    if tols:  # the worker's own tolerance (e.g. relative to the logits' size), instead of the family's TOL
        tol = min(tols)
    rec["max_abs_diff"] = max(diffs) if diffs and not errs else None
    if len(per) > 1:
        rec["per_adapter"] = {str(p["adapter"]): {k: v for k, v in p.items() if k != "adapter"} for p in per}
    else:
        rec.update({k: v for k, v in per[0].items() if k not in ("adapter", "max_abs_diff", "error")})
    if errs:
        rec["status"], rec["message"] = "failed", errs[0][:500]
    else:
        rec["status"] = "ok" if rec["max_abs_diff"] is not None and rec["max_abs_diff"] <= tol else "failed"


def fake_converter(argv: list) -> int:
    """A stand-in converter to test ``accept``'s plumbing (``--converter "python3 golden/harness.py
    _fake_converter"``): copies a plain adapter folder for ``convert`` and says "not supported yet" otherwise."""
    p = argparse.ArgumentParser(prog="fake-converter")
    p.add_argument("verb")
    p.add_argument("src")
    p.add_argument("out")
    a, rest = p.parse_known_args(argv)
    if a.verb == "convert" and (Path(a.src) / "adapter_config.json").exists() and "--initial-adapter" not in rest:
        shutil.copytree(a.src, a.out)
        print(json.dumps({"ok": True}))
        return 0
    print(f"error: {' '.join([a.verb, *rest])} is not supported yet (fake)", file=sys.stderr)
    return 2


def main(argv: list | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_fake_converter"]:
        sys.exit(fake_converter(argv[1:]))
    fams = families()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cmds = {"envs": "create/refresh the virtual envs (idempotent)",
            "generate": "write the goldens, the checks and FINDINGS",
            "accept": "convert goldens with the converter and check them in the real libraries",
            "report": "write FINDINGS again from results/<family>.json"}
    subs = {c: sub.add_parser(c, help=h) for c, h in cmds.items()}
    for s in subs.values():
        s.add_argument("--family", nargs="+", choices=list(fams), help="default: every family")
    subs["envs"].add_argument("--env", nargs="+", help="only these envs")
    subs["generate"].add_argument("--case", nargs="+", help="only these cases (e.g. pf21/conv); others stay as is")
    subs["accept"].add_argument("--converter", default=DEFAULT_CONVERTER, help="command prefix (default: %(default)s)")
    subs["accept"].add_argument("--out", help="write the acceptance JSON here instead of into results/<family>.json")
    args = ap.parse_args(argv)
    chosen = [fams[f] for f in (args.family or fams)]
    if getattr(args, "out", None) and len(chosen) != 1:
        ap.error("--out needs exactly one --family")
    if args.cmd == "envs":
        cmd_envs(fams, chosen, args.env)
    elif args.cmd == "generate":
        cmd_generate(fams, chosen, args.case)
    elif args.cmd == "accept":
        cmd_accept(fams, chosen, args.converter, args.out)
    else:
        for fam in chosen:
            write_findings(fam)


if __name__ == "__main__":
    main()
