"""hf:// sources from a cache written in huggingface_hub's own layout (offline), and `push` against a local server."""

from __future__ import annotations

import hashlib
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
    # the token was used on every request to the Hub, printed nowhere, and not sent to the storage's pre-signed URL
    assert {h.get("authorization") for m, _, h in hub.requests if m != "PUT"} == {f"Bearer {TOKEN}"}
    assert [h.get("authorization") for m, _, h in hub.requests if m == "PUT"] == [None]
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

    from lora_migrate import execution as plan_mod

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


# ------------------------------------------------------------------------------------ push: the LFS route


def _hub_env(hub, tmp_path) -> dict:
    return env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=tmp_path / "hf-home")


def _order(hub) -> list[str]:
    """The upload's steps in the order the server saw them."""
    steps = {"/preupload/": "preupload", "/info/lfs/objects/batch": "batch", "/lfs-storage/": "put",
             "/api/complete_multipart": "complete", "/info/lfs/objects/verify": "verify", "/commit/": "commit"}
    return [next(v for k, v in steps.items() if k in p) for _, p, _ in hub.requests if any(k in p for k in steps)]


@pytest.fixture
def in_process_hub(monkeypatch):
    """``in_process_hub(**FakeHub kwargs)`` → a started FakeHub that this process's huggingface_hub talks to, online
    (scripts/test.sh sets HF_HUB_OFFLINE=1, and huggingface_hub's cached session keeps refusing until reset)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    hubs = []

    def start(**kw):
        hub = FakeHub(token=TOKEN, **kw).__enter__()
        hubs.append(hub)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        reset_sessions()
        return hub

    yield start
    for hub in hubs:
        hub.__exit__(None, None, None)
    monkeypatch.undo()
    reset_sessions()


@pytest.mark.parametrize("to,opts,weights", [("adapters-1.0", [], "pytorch_adapter.bin"),
                                             ("adapters-1.1", ["--safetensors"], "adapter.safetensors")])
def test_push_sends_the_weights_through_lfs(tmp_path, to, opts, weights):
    """The route the Hub makes huggingface_hub take for a weight file: preupload says ``lfs``, the LFS batch API
    hands out an upload URL, the bytes are PUT there and verified, and the commit names them by sha256 (an
    ``lfsFile`` line) while the small files travel inside the commit. See tests/hubfake.py for the source lines.

    huggingface_hub 0.36 with hf_xet installed also offers the ``xet`` transfer (``_commit_api.py:378-382``), and
    the real Hub picks it for repos on Xet storage (the default for new users and organisations since May 2025);
    the files then go to Xet's CAS server through hf_xet's Rust client (``_commit_api.py:527-660``), a chunked,
    deduplicating protocol this test server cannot honestly stand in for. So the server answers ``basic``, what the
    Hub answers on its LFS route (``lfs.py:179``, ``_commit_api.py:410``), and the test asserts that ``xet`` was
    offered, so a client that stops offering it, or a route that changes, shows up here."""
    src = make_adapter(tmp_path / "src", version="3.1.0")
    local = tmp_path / "local"
    assert cli(["convert", src, local, "--to", to, *opts], env=env(HF_HUB_OFFLINE=1)).returncode == 0
    data = (local / weights).read_bytes()
    oid = hashlib.sha256(data).hexdigest()
    with FakeHub(token=TOKEN) as hub:
        r = cli(["push", src, "me/lfs", "--to", to, *opts], env=_hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr
        again = cli(["push", src, "me/lfs", "--to", to, *opts, "-m", "again"], env=_hub_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    assert r.stderr == ""  # no progress bars off a terminal
    # the batch request: the weight file alone, by sha256 and size, to main, offering basic, multipart and xet
    (repo, batch), (_, batch2) = hub.batches
    assert repo == "me/lfs" and batch["operation"] == "upload" and batch["hash_algo"] == "sha256"
    assert batch["objects"] == [{"oid": oid, "size": len(data)}] and batch["ref"] == {"name": "main"}
    assert batch["transfers"] == ["basic", "multipart", "xet"]
    # the bytes that arrived are the converted file's, PUT once without the token, verified, stored
    ((put_oid, put_bytes),) = hub.puts
    assert put_oid == oid and hashlib.sha256(put_bytes).hexdigest() == oid and put_bytes == data
    assert hub.verified == [oid] and hub.objects == {("me/lfs", oid): data}
    assert _order(hub)[:5] == ["preupload", "batch", "put", "verify", "commit"]
    # the commit: the weights as an LFS pointer, the rest inline
    first, second = hub.commits
    assert first["lfs_files"] == {weights: oid}
    assert set(first["files"]) - set(first["lfs_files"]) == {"adapter_config.json", "README.md"}
    assert first["files"][weights] == data
    assert first["files"]["adapter_config.json"] == (local / "adapter_config.json").read_bytes()
    # pushing the same weights again: the Hub already holds them (no actions in the batch answer), nothing is PUT
    assert batch2["objects"] == batch["objects"] and len(hub.puts) == 1 and hub.verified == [oid]
    assert second["lfs_files"] == {weights: oid} and second["files"][weights] == data
    assert second["header"]["summary"] == "again"


def test_push_sends_large_weights_in_parts(tmp_path, in_process_hub):
    """The LFS route for a large file: the batch answer carries a ``chunk_size`` and a URL per part, huggingface_hub
    PUTs each slice there and posts the parts' ETags to the completion URL (``lfs.py:331-363``), then verifies. A
    1000-byte chunk stands in for the Hub's large one."""
    src = make_adapter(tmp_path / "src", version="3.1.0")
    conv = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "local"), "--to", "adapters-1.0"])
    assert conv.exit_code == 0, conv.output
    data = (tmp_path / "local" / "pytorch_adapter.bin").read_bytes()
    oid, n = hashlib.sha256(data).hexdigest(), -(-len(data) // 1000)
    assert n >= 3
    hub = in_process_hub(multipart_chunk=1000)
    res = CliRunner().invoke(main, ["push", str(src), "me/big", "--to", "adapters-1.0"])
    assert res.exit_code == 0, res.output
    assert [o for o, _ in hub.puts] == [oid] * n and b"".join(b for _, b in hub.puts) == data
    assert [len(b) for _, b in hub.puts] == [1000] * (n - 1) + [len(data) - 1000 * (n - 1)]
    (done,) = hub.completions
    assert done["oid"] == oid and [p["partNumber"] for p in done["parts"]] == list(range(1, n + 1))
    assert hub.verified == [oid] and hub.objects == {("me/big", oid): data}
    (commit,) = hub.commits
    assert commit["lfs_files"] == {"pytorch_adapter.bin": oid} and commit["files"]["pytorch_adapter.bin"] == data
    assert _order(hub) == ["preupload", "batch", *["put"] * n, "complete", "verify", "commit"]


def test_push_storage_refusal_commits_nothing(tmp_path):
    """The storage refuses the PUT (403, as S3 answers an expired pre-signed URL): no commit is made, the CLI says
    so in one line naming the file and the status, and exits 2 (a server's answer, not a bug here)."""
    src = make_adapter(tmp_path / "src", version="3.1.0")
    with FakeHub(token=TOKEN, upload_status=403) as hub:
        r = cli(["push", src, "me/x", "--to", "adapters-1.0"], env=_hub_env(hub, tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: upload to me/x failed: Error while uploading 'pytorch_adapter.bin' to the "
                               "Hub: 403 Forbidden") and "injected storage failure" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr and "X-Amz" not in r.stderr
    assert TOKEN not in r.stderr
    assert _order(hub) == ["preupload", "batch", "put"]  # tried, refused, and no commit was sent
    assert len(hub.puts) == 1 and hub.objects == {} and hub.commits == []


def test_push_storage_refusal_with_json_prints_one_error_document(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    with FakeHub(token=TOKEN, upload_status=403) as hub:
        r = cli(["push", src, "me/x", "--to", "adapters-1.0", "--json"], env=_hub_env(hub, tmp_path))
    assert r.returncode == 2 and hub.commits == [] and len(r.stderr.splitlines()) == 1
    doc = json.loads(r.stdout)  # exactly one document: json.loads refuses trailing data
    assert "upload to me/x failed" in doc["error"]["message"] and doc["error"]["kind"] == "hub"


def test_push_storage_fault_is_retried_then_commits_nothing(tmp_path, monkeypatch, in_process_hub):
    """A storage 500 is retried by huggingface_hub (``http_backoff``: five retries, ``utils/_http.py:213-330``),
    then the push fails without a commit; the message carries no pre-signed query."""
    from huggingface_hub.utils import _http

    src = make_adapter(tmp_path / "src", version="3.1.0")
    monkeypatch.setattr(_http.time, "sleep", lambda s: None)
    hub = in_process_hub(upload_status=500)
    res = CliRunner().invoke(main, ["push", str(src), "me/x", "--to", "adapters-1.0"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: upload to me/x failed: Error while uploading 'pytorch_adapter.bin'") and "500" in err
    assert "X-Amz" not in res.stderr and "Traceback" not in res.output
    assert len(hub.puts) == 6 and hub.objects == {} and hub.commits == []
    assert "commit" not in _order(hub)


def test_a_commit_naming_weights_never_uploaded_is_refused(tmp_path, monkeypatch, in_process_hub):
    """If the LFS upload were skipped (here: huggingface_hub's ``lfs_upload`` made a no-op), the commit names an
    object the server does not hold: the server refuses it as the Hub does, nothing is committed, and push says so
    in one line."""
    from huggingface_hub import _commit_api

    src = make_adapter(tmp_path / "src", version="3.1.0")
    monkeypatch.setattr(_commit_api, "lfs_upload", lambda **kw: None)
    hub = in_process_hub()
    res = CliRunner().invoke(main, ["push", str(src), "me/x", "--to", "adapters-1.0"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: upload to me/x failed: Bad request for commit endpoint: Your push was "
                                 "rejected because an LFS pointer pointed to a file that does not exist")
    assert len(res.stderr.splitlines()) == 1
    assert _order(hub) == ["preupload", "batch", "commit"] and hub.commits == [] and hub.objects == {}


def test_fake_storage_keeps_only_what_the_batch_announced(tmp_path):
    """The test server's own checks, so the tests above cannot pass on a server that accepts anything: a PUT
    is stored only with the announced sha256 and size and without the Hub token, verify answers 404 for an oid
    never stored, and parts are assembled only when the completion names all of them in order."""
    import requests

    good, bad = b"weights" * 100, b"weightz" * 100
    oid = hashlib.sha256(good).hexdigest()
    auth = {"authorization": f"Bearer {TOKEN}"}
    with FakeHub(token=TOKEN) as hub:
        batch = requests.post(f"{hub.url}/me/x.git/info/lfs/objects/batch", headers=auth, json={
            "operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
            "objects": [{"oid": oid, "size": len(good)}]}).json()
        (obj,) = batch["objects"]
        put, verify = obj["actions"]["upload"]["href"], obj["actions"]["verify"]["href"]
        assert batch["transfer"] == "basic"
        assert requests.post(verify, headers=auth, json={"oid": oid, "size": len(good)}).status_code == 404
        assert requests.put(put, data=bad).status_code == 400  # sha256 mismatch
        assert requests.put(put, data=good[:-1]).status_code == 400  # size mismatch
        assert requests.put(put, data=good, headers=auth).status_code == 400  # a second auth mechanism
        assert requests.put(put.replace(oid, hashlib.sha256(bad).hexdigest()), data=bad).status_code == 403
        assert hub.objects == {}
        assert requests.put(put, data=good).status_code == 200
        assert requests.post(verify, headers=auth, json={"oid": oid, "size": len(good)}).status_code == 200
        assert hub.objects == {("me/x", oid): good} and hub.verified == [oid]
    with FakeHub(token=TOKEN, multipart_chunk=300) as hub:  # 700 bytes: three parts
        (obj,) = requests.post(f"{hub.url}/me/x.git/info/lfs/objects/batch", headers=auth, json={
            "operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
            "objects": [{"oid": oid, "size": len(good)}]}).json()["objects"]
        up = obj["actions"]["upload"]
        urls = [up["header"][k] for k in sorted(up["header"]) if k.isdigit()]
        assert up["header"]["chunk_size"] == "300" and len(urls) == 3
        assert requests.put(urls[0].split("?")[0] + "?X-Amz-Expires=900", data=good).status_code == 403  # not whole
        etags = [requests.put(u, data=good[i * 300:(i + 1) * 300]).headers["ETag"] for i, u in enumerate(urls)]
        parts = [{"partNumber": i + 1, "etag": e} for i, e in enumerate(etags)]
        assert requests.post(up["href"], json={"oid": oid, "parts": parts[::-1]}).status_code == 400
        assert requests.post(up["href"], json={"oid": oid, "parts": parts[:2]}).status_code == 400
        assert hub.objects == {}
        assert requests.post(up["href"], json={"oid": oid, "parts": parts}).status_code == 200
        assert hub.objects == {("me/x", oid): good}
