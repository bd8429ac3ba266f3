"""A plain install runs every command: a clean venv with only ``torch==2.13.0`` and then
``pip install -c constraints.txt .`` (no extras, not editable), as a user installs it. Every module of
lora_migrate must import there, and the README's example, inspect, check, verify, a conversion in each direction
between the families, batch and push --dry-run must work. The test extras (transformers, peft, adapters) pull in
packages the package may import without declaring them (numpy did); this venv has none of them.

The venv is kept at .venv-plain/ and the package reinstalled into it on every run from a clean copy of the
working tree (``pip install .`` of a local folder always rebuilds it), so the test follows the working tree. ``LORA_MIGRATE_PLAIN_VENV`` names another place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"


def _pip(venv: Path, *args: str, cwd: Path = ROOT) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *args], check=True, cwd=cwd)


def _clean_copy(dest: Path) -> Path:
    """The files a source distribution holds, without build/ or egg-info left by an earlier install (setuptools
    would package a stale module from build/lib)."""
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "lora_migrate", dest / "lora_migrate", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    venv = Path(os.environ.get("LORA_MIGRATE_PLAIN_VENV", ROOT / ".venv-plain"))
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(venv, "-c", "constraints.txt", "torch==2.13.0")
    src = _clean_copy(tmp_path_factory.mktemp("sdist"))
    _pip(venv, "-c", "constraints.txt", ".", cwd=src)
    return venv


def run(venv: Path, *args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """The installed console script, from a folder outside the checkout (so nothing imports the source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([str(venv / "bin" / "lora-migrate"), *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env)
    if ok:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def test_the_venv_has_no_test_extras(plain):
    p = subprocess.run([str(plain / "bin" / "python"), "-c",
                        "import importlib.util as u; print([m for m in ('transformers', 'peft', 'adapters', "
                        "'pytest', 'scipy') if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]", p.stdout


def test_every_module_imports(plain, tmp_path):
    code = ("import importlib, pkgutil, lora_migrate, sys\n"
            "assert 'site-packages' in lora_migrate.__file__, lora_migrate.__file__\n"
            "names = [m.name for m in pkgutil.walk_packages(lora_migrate.__path__, 'lora_migrate.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(len(names))")
    p = subprocess.run([str(plain / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) >= 40


def test_every_command_runs(plain, tmp_path):
    at31, pf21 = GOLDEN / "at31" / "t5_qv" / "adapter", GOLDEN / "peft" / "pf21" / "llama_plain" / "adapter"
    # the README's example
    p = run(plain, "convert", at31, tmp_path / "seed-out", "--from", "adapter-transformers-3.1", "--to",
            "adapters-1.0", "--overwrite", cwd=tmp_path)
    assert "OK" in p.stdout
    assert "adapters-1.0" in run(plain, "inspect", at31, cwd=tmp_path).stdout
    assert json.loads(run(plain, "check", at31, "--json", cwd=tmp_path).stdout)[0]["ok"] is True
    assert json.loads(run(plain, "verify", at31, tmp_path / "seed-out", "--json", cwd=tmp_path).stdout)["ok"]
    # each direction between the families
    run(plain, "convert", at31, tmp_path / "ah2peft", "--to", "peft", cwd=tmp_path)
    assert (tmp_path / "ah2peft" / "adapter_model.safetensors").is_file()
    run(plain, "convert", pf21, tmp_path / "peft2ah", "--to", "adapters-1.1", "--model-type", "llama",
        cwd=tmp_path)
    assert (tmp_path / "peft2ah" / "adapter_config.json").is_file()
    run(plain, "convert", pf21, tmp_path / "vllm", "--to", "vllm", cwd=tmp_path)
    assert json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())["lora_alpha"] > 0
    # batch on a two-item manifest, and push --dry-run
    shutil.copytree(at31, tmp_path / "in" / "a")
    (tmp_path / "in" / "m.jsonl").write_text(json.dumps({"source": "a", "to": "adapters-1.0", "name": "x"}) + "\n"
                                             + json.dumps({"source": "a", "to": "peft", "name": "y"}) + "\n")
    doc = json.loads(run(plain, "batch", tmp_path / "in" / "m.jsonl", "--out", tmp_path / "b", "--json",
                         cwd=tmp_path).stdout)
    assert doc["ok"] and sorted(i["status"] for i in doc["items"]) == ["ok", "ok"]
    doc = json.loads(run(plain, "push", at31, "me/t5", "--to", "adapters-1.1", "--dry-run", "--json",
                         cwd=tmp_path).stdout)
    assert doc["dry_run"] is True and doc["files"]
    assert "adapters-1.0" in run(plain, "conventions", cwd=tmp_path).stdout
