"""hf:// sources from a cache written in huggingface_hub's own layout (offline), and `push` against a local server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_migrate.cli import main

from .hubfake import FakeHub, fill_cache
from .builders import make_adapter

TOKEN = "hf_" + "Zq7" * 12  # what HF_TOKEN holds in these tests; it must never be printed
CLI = [sys.executable, "-m", "lora_migrate.cli"]


def adapter_files(tmp_path, version="3.1.0", readme=None) -> dict[str, bytes]:
    src = make_adapter(tmp_path / "made", version=version)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    if readme is not None:
        files["README.md"] = readme.encode()
    return files


def env(**kw) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    e.update({k: str(v) for k, v in kw.items()})
    return e


def cli(args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def cache(tmp_path):
    c = tmp_path / "hub-cache"
    snap = fill_cache(c, "org/tiny-lora", adapter_files(tmp_path))
    return c, snap


def test_filled_cache_is_valid_for_huggingface_hub(cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    c, snap = cache
    info = scan_cache_dir(c)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny-lora" and repo.nb_files == 2
    (rev,) = repo.revisions
    assert rev.commit_hash == snap.name and rev.refs == frozenset({"main"})
    got = try_to_load_from_cache("org/tiny-lora", "adapter_config.json", cache_dir=c)
    assert got is not None and Path(got).read_bytes() == (snap / "adapter_config.json").read_bytes()


def test_convert_an_hf_id_offline_from_the_cache(cache, tmp_path):
    c, snap = cache
    out = tmp_path / "out"
    r = cli(["convert", "hf://org/tiny-lora", out, "--to", "adapters-1.0"], env=env(HF_HUB_CACHE=c, HF_HUB_OFFLINE=1))
    assert r.returncode == 0, r.stderr
    assert "adapter-transformers-3.1 → adapters-1.0" in r.stdout and ": OK" in r.stdout
    # the same bytes as converting the snapshot folder directly
    ref = tmp_path / "ref"
    r2 = cli(["convert", snap, ref, "--to", "adapters-1.0"], env=env(HF_HUB_OFFLINE=1))
    assert r2.returncode == 0, r2.stderr
    for f in ("adapter_config.json", "pytorch_adapter.bin"):
        assert (out / f).read_bytes() == (ref / f).read_bytes()
    # a revision: the commit hash, and the branch name
    r3 = cli(["inspect", f"hf://org/tiny-lora@{snap.name}", "--json"], env=env(HF_HUB_CACHE=c, HF_HUB_OFFLINE=1))
    assert r3.returncode == 0, r3.stderr
    assert json.loads(r3.stdout)["convention"] == "adapter-transformers-3.1"


@pytest.mark.parametrize("ref,msg", [("hf://org/not-cached", "not in the local Hugging Face cache"),
                                     ("hf://org/tiny-lora@v9", "not in the local Hugging Face cache"),
                                     ("hf://no-slash", "expected hf://org/name"),
                                     ("hf://org/name@", "expected hf://org/name")])
def test_hub_id_errors_are_one_line_exit_2(cache, monkeypatch, ref, msg):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = CliRunner().invoke(main, ["inspect", ref])
    assert res.exit_code == 2 and msg in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------- push


def test_push_uploads_converted_files_and_a_model_card(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    (src / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nTrained on things.\n")
    local = tmp_path / "local"
    assert cli(["convert", src, local, "--to", "adapters-1.0"], env=env(HF_HUB_OFFLINE=1)).returncode == 0
    with FakeHub(token=TOKEN) as hub:
        r = cli(["push", src, "me/converted", "--to", "adapters-1.0"],
                env=env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=tmp_path / "hf-home", HF_HUB_VERBOSITY="debug"))
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout and TOKEN not in r.stderr
    assert hub.repos == {"me/converted"}
    (commit,) = hub.commits
    assert commit["repo_id"] == "me/converted" and commit["revision"] == "main" and not commit["other_keys"]
    assert set(commit["files"]) == {"adapter_config.json", "pytorch_adapter.bin", "README.md"}
    for f in ("adapter_config.json", "pytorch_adapter.bin"):
        assert commit["files"][f] == (local / f).read_bytes()
    assert json.loads(commit["files"]["adapter_config.json"])["version"] == "adapters.1.0.1"
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\nlicense: mit\n---\n\n# My adapter") and "Trained on things." in card
    assert "**adapters-1.0**" in card and "adapters >=0.1.0,<1.1" in card and "adapter-transformers-3.1" in card
    assert "| m1 | 2 | 4 | 4 | 0 | 0 | 2.4e-07 | OK |" in card  # modules, r, alpha, errors, tolerance
    assert "commit: " + hub.url in r.stdout and "README.md" in r.stdout
    auth = {h.get("authorization") for _, _, h in hub.requests}
    assert auth == {f"Bearer {TOKEN}"}  # the token was used on every request, and printed nowhere
    assert src.joinpath("README.md").read_text().endswith("Trained on things.\n")  # input untouched


def test_push_dry_run_lists_files_and_contacts_nothing(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    with FakeHub(token=TOKEN) as hub:
        r = cli(["push", src, "me/converted", "--to", "adapters-1.1", "--dry-run", "--safetensors"],
                env=env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=tmp_path / "hf-home"))
    assert r.returncode == 0, r.stderr
    assert hub.requests == []
    assert "would upload to me/converted" in r.stdout
    listed = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ") and "bytes)" in ln]
    assert listed == ["README.md", "adapter.safetensors", "adapter_config.json"]
    assert TOKEN not in r.stdout + r.stderr


def test_push_refuses_when_the_check_fails(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lora_migrate import plan as plan_mod

    src = make_adapter(tmp_path / "src", version="3.1.0")
    real = plan_mod.Execution.apply
    monkeypatch.setattr(plan_mod.Execution, "apply", lambda self, d, kind: real(self, d, kind).replace(
        B=real(self, d, kind).B * 2))
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        res = CliRunner().invoke(main, ["push", str(src), "me/x", "--to", "adapters-1.0"])
    assert res.exit_code == 1
    assert "refusing to upload to me/x" in res.output and "numeric check failed" in res.output
    assert "nothing was uploaded" in res.output
    assert hub.requests == [] and hub.commits == []


def test_push_without_a_token_is_refused_in_one_line(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    with FakeHub(token=TOKEN) as hub:
        r = cli(["push", src, "me/x", "--to", "adapters-1.0"], env=env(HF_ENDPOINT=hub.url, HF_HOME=tmp_path / "h"))
    assert r.returncode == 2 and "no Hugging Face token" in r.stderr and len(r.stderr.splitlines()) == 1
    assert hub.commits == []


def test_push_wrong_token_is_one_line_without_the_token(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    wrong = "hf_" + "Wr0ng" * 8
    with FakeHub(token=TOKEN) as hub:
        r = cli(["push", src, "me/x", "--to", "adapters-1.0"],
                env=env(HF_ENDPOINT=hub.url, HF_TOKEN=wrong, HF_HOME=tmp_path / "h"))
    assert r.returncode == 2 and "upload to me/x failed" in r.stderr and "Traceback" not in r.stderr
    assert wrong not in r.stderr + r.stdout and hub.commits == []


def test_push_takes_the_conversion_inputs_of_convert(tmp_path):
    """A PiSSA adapter is only uploadable as plain LoRA with its initial adapter: push takes the same options as
    convert, and refuses in one line without them."""
    case = Path(__file__).parent.parent / "golden" / "peft" / "pf21" / "llama_pissa"
    with FakeHub(token=TOKEN) as hub:
        e = env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=tmp_path / "hf-home")
        ok = cli(["push", case / "adapter", "me/p", "--to", "peft", "--dry-run", "--json",
                  "--initial-adapter", case / "pissa_init"], env=e)
        bad = cli(["push", case / "adapter", "me/p", "--to", "peft", "--dry-run"], env=e)
    assert ok.returncode == 0, ok.stderr
    r = json.loads(ok.stdout)
    assert r["convert"]["adapters"][0]["plan"]["r"] == 8 and "adapter_model.safetensors" in [f["path"] for f in r["files"]]
    assert bad.returncode == 2 and "--initial-adapter" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert hub.requests == []
