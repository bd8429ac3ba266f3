"""`lora-migrate check`: the gate fails on what makes an adapter unsafe to upload, and passes clean ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lora_migrate
from lora_migrate.cli import main

from .builders import MODULES, make_adapter, tensors

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def codes(r):
    return [f.code for f in r.findings]


def test_clean_adapter_passes(tmp_path):
    src = make_adapter(tmp_path / "a", version="3.1.0")
    r = lora_migrate.check(src)
    assert r.ok and r.findings == [] and r.convention == "adapter-transformers-3.1" and r.modules_checked == 2
    code, out = run("check", src)
    assert code == 0 and "OK (adapter-transformers-3.1, 1 adapter(s), 2 modules checked)" in out


def test_alpha_that_adapters_1_0_ignores_fails(tmp_path):
    src = make_adapter(tmp_path / "a", version="adapters.1.0.1", config={"r": 4, "alpha": 8})
    r = lora_migrate.check(src)
    assert codes(r) == ["alpha-ignored"]
    assert "alpha=8, r=4" in r.findings[0].message and "×2" in r.findings[0].message
    same = make_adapter(tmp_path / "b", version="adapters.1.0.1", config={"r": 4, "alpha": 4})
    assert lora_migrate.check(same).ok  # alpha = r: nothing is dropped
    later = make_adapter(tmp_path / "c", version="adapters.1.2.0", config={"r": 4, "alpha": 8})
    assert lora_migrate.check(later).ok  # ≥ 1.1 applies alpha/r


def test_version_no_release_wrote_fails(tmp_path):
    src = make_adapter(tmp_path / "a", version="7.7.7")
    code, out = run("check", src)
    assert code == 1 and "[unknown-version]" in out and "'7.7.7' is not one any AdapterHub release wrote" in out
    assert "[convention]" in out  # and so the convention is ambiguous


def test_unclaimed_keys_fail(tmp_path):
    sd = tensors()
    sd["encoder.block.0.layer.0.SelfAttention.q.mystery.weight"] = torch.zeros(2, 2)
    src = make_adapter(tmp_path / "a", sd=sd)
    r = lora_migrate.check(src)
    assert "unclaimed-keys" in codes(r) and "mystery" in r.findings[0].message and not r.ok


@pytest.mark.parametrize("values,word", [((float("nan"),), "NaN"), ((float("inf"),), "Inf"),
                                         ((float("-inf"), float("nan")), "NaN and Inf")])
def test_nan_and_inf_name_the_module(tmp_path, values, word):
    sd = tensors()
    for i, value in enumerate(values):
        sd[f"{MODULES[1]}.loras.m1.lora_B"][3, i] = value
    r = lora_migrate.check(make_adapter(tmp_path / "a", sd=sd))
    (f,) = r.findings
    assert f.code == "nonfinite" and f.module == MODULES[1]
    assert f"{len(values)} of 48 values are {word}" in f.message


def test_rank_contradicting_the_config_fails(tmp_path):
    src = make_adapter(tmp_path / "a", config={"r": 4}, sd=tensors(r=2))
    r = lora_migrate.check(src)
    assert codes(r) == ["rank-shape"] and "r=4" in r.findings[0].message


def test_expect_mismatch_names_both(tmp_path):
    src = make_adapter(tmp_path / "a", version="3.1.0")
    code, out = run("check", src, "--expect", "adapters-1.1")
    assert code == 1 and "[expect-mismatch]" in out
    assert "expected adapters-1.1" in out and "found adapter-transformers-3.1" in out
    assert run("check", src, "--expect", "adapter-transformers-3.1")[0] == 0


def test_declared_conversion_is_checked(tmp_path, monkeypatch):
    src = make_adapter(tmp_path / "a", version="3.1.0")
    r = lora_migrate.check(src, convert_to="adapters-1.0")
    assert r.ok and r.conversion.ok and "max relative error 0" in r.conversion.summary
    from lora_migrate import execution as plan_mod

    real = plan_mod.Execution.apply
    monkeypatch.setattr(plan_mod.Execution, "apply", lambda self, d, k: real(self, d, k).replace(
        B=real(self, d, k).B * 3))
    code, out = run("check", src, "--convert-check", "adapters-1.0")
    assert code == 1 and "[conversion]" in out and "numeric check failed" in out
    assert sorted(p.name for p in src.iterdir()) == ["adapter_config.json", "pytorch_adapter.bin"]


def test_usage_errors_exit_2(tmp_path):
    assert run("check", tmp_path / "nope")[0] == 2
    src = make_adapter(tmp_path / "a")
    code, out = run("check", src, "--expect", "adaptors-9")
    assert code == 2 and "unknown convention" in out


def test_files_of_one_adapter_are_checked_once_and_json(tmp_path):
    src = make_adapter(tmp_path / "a")
    code, out = run("check", src / "adapter_config.json", src / "pytorch_adapter.bin", "--json")
    assert code == 0
    (r,) = json.loads(out)
    assert r["path"] == str(src) and r["findings"] == []


def _git(repo, *args):
    e = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=e)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_real_pre_commit_runs_the_hook(tmp_path):
    """The shipped .pre-commit-hooks.yaml, consumed by the real pre-commit: try-repo, then a config that pins it
    and a `git commit` that the installed hook blocks. (The hook file is copied into a repository of its own so
    that the test does not depend on whether this checkout has it committed yet.)"""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks)
    _git(hooks, "init", "-q")
    _git(hooks, "add", "-A")
    _git(hooks, "commit", "-qm", "hooks")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, capture_output=True, text=True).stdout.strip()
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    make_adapter(repo / "good", version="3.1.0")
    make_adapter(repo / "bad", version="adapters.1.0.1", config={"r": 4, "alpha": 16})
    (repo / "notes.txt").write_text("not an adapter\n")
    _git(repo, "add", "-A")
    bindir = str(Path(sys.executable).parent)
    e = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PRE_COMMIT_HOME=str(tmp_path / "pc"),
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def sh(*args):
        return subprocess.run(list(args), cwd=repo, capture_output=True, text=True, env=e, timeout=300)

    pc = [sys.executable, "-m", "pre_commit"]
    r = sh(*pc, "try-repo", str(hooks), "lora-migrate-check", "--all-files")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bad: FAILED" in r.stdout and "[alpha-ignored]" in r.stdout and "good: OK" in r.stdout
    assert "notes.txt" not in r.stdout
    r = sh(*pc, "try-repo", str(hooks), "lora-migrate-check", "--files", "good/adapter_config.json",
           "good/pytorch_adapter.bin", "notes.txt")
    assert r.returncode == 0 and "Passed" in r.stdout, r.stdout + r.stderr

    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {hooks}\n  rev: {sha}\n  hooks:\n  - id: lora-migrate-check\n")
    assert sh(*pc, "install").returncode == 0
    _git(repo, "add", "-A")
    r = sh("git", "commit", "-qm", "adapters")
    assert r.returncode != 0 and "[alpha-ignored]" in r.stdout + r.stderr  # the hook blocked the commit
    assert sh("git", "rev-parse", "HEAD").returncode != 0  # nothing was committed
    shutil.rmtree(repo / "bad")
    _git(repo, "add", "-A")
    r = sh("git", "commit", "-qm", "good adapter only")
    assert r.returncode == 0, r.stdout + r.stderr
