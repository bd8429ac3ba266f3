"""The CLI contract, for every command: exit 0 ok, 1 the numeric check failed, 2 bad input or usage, 3 an internal
error (one line that names LORA_MIGRATE_DEBUG; nothing written). With ``--json`` every exit writes exactly one JSON
document to stdout: the result on 0, the report with the failing modules on 1, ``{"error": {"kind", "message",
"path"}}`` on 2 and 3; the human one-line error still goes to stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_migrate.cli import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
AT31 = GOLDEN / "at31" / "t5_qv" / "adapter"
PF21 = GOLDEN / "peft" / "pf21" / "llama_plain"
PF152 = GOLDEN / "peft" / "pf152" / "llama_lora_bias_merged"


def invoke(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_json(stdout: str):
    """stdout must be exactly one JSON document (json.loads refuses trailing data)."""
    return json.loads(stdout)


def assert_error(code: int, stdout: str, stderr: str, exit_code: int, kind: str) -> dict:
    assert code == exit_code, (code, stdout, stderr)
    doc = one_json(stdout)
    assert set(doc["error"]) == {"kind", "message", "path"} and doc["error"]["kind"] == kind, doc
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return doc["error"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A converted AdapterHub adapter beside its source, a two-item manifest, a PEFT adapter and its base."""
    root = tmp_path_factory.mktemp("contract")
    shutil.copytree(AT31, root / "src")
    assert invoke("convert", root / "src", root / "conv", "--to", "adapters-1.0")[0] == 0
    (root / "manifest.jsonl").write_text(
        json.dumps({"source": "src", "to": "adapters-1.0", "name": "a"}) + "\n"
        + json.dumps({"source": "src", "to": "adapters-1.1", "name": "b"}) + "\n")
    return root


def commands_ok(w: Path, tmp: Path) -> dict[str, list]:
    meta = json.loads((PF21 / "meta.json").read_text())
    return {
        "convert": ["convert", w / "src", tmp / "out", "--to", "adapters-1.1"],
        "inspect": ["inspect", w / "src"],
        "verify": ["verify", w / "src", w / "conv"],
        "conventions": ["conventions"],
        "check": ["check", w / "src"],
        "push": ["push", w / "src", "me/x", "--to", "adapters-1.1", "--dry-run"],
        "batch": ["batch", w / "manifest.jsonl", "--out", tmp / "batch"],
        "fix-merged": ["fix-merged", PF152 / "merged", tmp / "fixed", "--adapter", PF152 / "adapter",
                       "--merged-with", "peft@0.15.2"],
        "merge": ["merge", PF21 / "adapter", (PF21 / meta["base"]).resolve(), tmp / "merged"],
    }


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "conventions", "check", "push", "batch",
                                     "fix-merged", "merge"])
def test_exit_0_prints_the_result_as_one_json_document(command, work, tmp_path):
    code, stdout, stderr = invoke(*commands_ok(work, tmp_path)[command], "--json")
    assert code == 0, stderr
    doc = one_json(stdout)
    assert isinstance(doc, (dict, list)) and doc and "error" not in (doc if isinstance(doc, dict) else doc[0])


BAD_INPUT = {  # a missing source for every command that reads one
    "convert": lambda w, t: ["convert", t / "nothing", t / "out", "--to", "adapters-1.0"],
    "inspect": lambda w, t: ["inspect", t / "nothing"],
    "verify": lambda w, t: ["verify", t / "nothing", w / "conv"],
    "check": lambda w, t: ["check", t / "nothing"],
    "push": lambda w, t: ["push", t / "nothing", "me/x", "--to", "adapters-1.1", "--dry-run"],
    "batch": lambda w, t: ["batch", t / "nothing.jsonl", "--out", t / "b"],
    "fix-merged": lambda w, t: ["fix-merged", t / "nothing", t / "fixed", "--adapter", PF152 / "adapter",
                                "--merged-with", "peft@0.15.2"],
    "merge": lambda w, t: ["merge", t / "nothing", (PF21 / "../_base/llama").resolve(), t / "merged"],
}


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_exit_2_bad_input_is_one_json_error_and_one_line(command, work, tmp_path):
    code, stdout, stderr = invoke(*BAD_INPUT[command](work, tmp_path), "--json")
    err = assert_error(code, stdout, stderr, 2, "bad-input")
    assert "nothing" in err["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args", [["convert", "a", "b"],                       # --to missing
                                  ["inspect"],                                  # PATH missing
                                  ["batch", "m.jsonl", "--out", "o", "-j", "x"],  # not a number
                                  ["no-such-command"]])
def test_exit_2_usage_errors_in_json_too(args):
    code, stdout, stderr = invoke(*args, "--json")
    assert code == 2
    assert one_json(stdout)["error"]["kind"] == "usage"
    assert "Traceback" not in stderr


def test_exit_2_error_names_the_path(work, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    code, stdout, stderr = invoke("inspect", tmp_path / "bad.safetensors", "--json")
    err = assert_error(code, stdout, stderr, 2, "bad-input")
    assert err["path"] == str(tmp_path / "bad.safetensors")
    gated = GOLDEN / "at31" / "t5_gated" / "adapter"  # gated LoRA: no target expresses it
    code, stdout, stderr = invoke("convert", gated, tmp_path / "o", "--to", "adapters-1.0", "--json")
    err = assert_error(code, stdout, stderr, 2, "unsupported")
    assert "gate" in err["message"] and not (tmp_path / "o").exists()


def test_exit_1_convert_prints_the_report_with_the_failing_modules(work, tmp_path, monkeypatch):
    from lora_migrate import execution as plan_mod

    real = plan_mod.Execution.apply
    monkeypatch.setattr(plan_mod.Execution, "apply", lambda self, d, kind: (lambda e: e.replace(B=e.B * 2))(
        real(self, d, kind)))  # a writer bug: the scale folded twice
    for args in (["convert", work / "src", tmp_path / "out", "--to", "adapters-1.0"],
                 ["push", work / "src", "me/x", "--to", "adapters-1.0", "--dry-run"]):
        code, stdout, stderr = invoke(*args, "--json")
        assert code == 1, stderr
        doc = one_json(stdout)
        assert doc["error"]["kind"] == "check-failed" and doc["report"]["ok"] is False
        assert {m["status"] for m in doc["report"]["modules"] if not m["ok"]} == {"mismatch"}
        assert "numeric check failed" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_exit_1_verify_check_batch_print_their_result(work, tmp_path):
    import torch

    shutil.copytree(work / "conv", tmp_path / "tampered")
    w = tmp_path / "tampered" / "pytorch_adapter.bin"
    sd = torch.load(w, weights_only=True)
    k = next(k for k in sd if k.endswith("lora_B"))
    sd[k] = sd[k] * 1.01
    torch.save(sd, w)
    code, stdout, _ = invoke("verify", work / "src", tmp_path / "tampered", "--json")
    assert code == 1 and one_json(stdout)["ok"] is False
    sd[k][0, 0] = float("nan")
    torch.save(sd, w)
    code, stdout, _ = invoke("check", tmp_path / "tampered", "--json")
    assert code == 1 and one_json(stdout)[0]["ok"] is False
    (tmp_path / "m.jsonl").write_text(json.dumps({"source": str(work / "src"), "to": "adapters-1.0"}) + "\n"
                                      + json.dumps({"source": str(tmp_path / "gone"), "to": "adapters-1.0"}) + "\n")
    code, stdout, _ = invoke("batch", tmp_path / "m.jsonl", "--out", tmp_path / "b", "--json")
    assert code == 1 and one_json(stdout)["ok"] is False


INTERNAL = {  # the library function each command calls, made to fail as a bug would
    "convert": ("lora_migrate.api", "convert"), "inspect": ("lora_migrate.api", "inspect"),
    "verify": ("lora_migrate.api", "verify"), "check": ("lora_migrate.gate", "check"),
    "push": ("lora_migrate.hub", "push"), "batch": ("lora_migrate.batching", "batch"),
    "fix-merged": ("lora_migrate.fixmerged", "fix_merged"), "merge": ("lora_migrate.merge", "merge_adapter"),
}


@pytest.mark.parametrize("command", sorted(INTERNAL))
def test_exit_3_internal_error(command, work, tmp_path, monkeypatch):
    import importlib

    module, name = INTERNAL[command]

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(importlib.import_module(module), name, bug)
    monkeypatch.delenv("LORA_MIGRATE_DEBUG", raising=False)
    code, stdout, stderr = invoke(*commands_ok(work, tmp_path)[command], "--json")
    err = assert_error(code, stdout, stderr, 3, "internal")
    assert "ZeroDivisionError: a bug" in err["message"] and "LORA_MIGRATE_DEBUG=1" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    code, stdout, stderr = invoke(*commands_ok(work, tmp_path)[command])  # without --json: nothing on stdout
    assert code == 3 and stdout == "" and len(stderr.strip().splitlines()) == 1


def test_exit_3_in_the_middle_of_writing_leaves_nothing(work, tmp_path):
    """A real process, a bug injected while the output file is being written."""
    exe = Path(sys.executable).with_name("lora-migrate")
    env = dict(os.environ, LORA_MIGRATE_FAULT="bug:write:1")
    env.pop("LORA_MIGRATE_DEBUG", None)
    p = subprocess.run([str(exe), "convert", str(work / "src"), str(tmp_path / "out"), "--to", "adapters-1.0",
                        "--json"], capture_output=True, text=True, env=env)
    assert p.returncode == 3, p.stderr
    assert one_json(p.stdout)["error"]["kind"] == "internal"
    assert len(p.stderr.strip().splitlines()) == 1 and "LORA_MIGRATE_DEBUG=1" in p.stderr
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder
