"""`lora-migrate batch`: manifests, parallel workers, failures that stop nothing, resume, kill and rerun, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import lora_migrate
from lora_migrate.cli import main

from .builders import make_adapter


def sources(tmp_path, n, version="3.1.0"):
    return [make_adapter(tmp_path / "src" / f"a{i:03d}", version=version, config={"r": 4, "alpha": 4 + 4 * (i % 3)})
            for i in range(n)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(report):
    return [json.loads(x) for x in report.read_text().splitlines()]


def test_parallel_batch_one_failure_stops_nothing(tmp_path):
    srcs = sources(tmp_path, 4)
    m = jsonl(tmp_path / "m.jsonl", [{"source": f"src/{s.name}", "to": "adapters-1.0"} for s in srcs]
              + [{"source": "src/missing", "to": "adapters-1.0", "name": "gone"}])
    res = CliRunner().invoke(main, ["batch", str(m), "--out", str(tmp_path / "out"), "-j", "2"])
    assert res.exit_code == 1
    recs = {r["name"]: r for r in records(tmp_path / "out" / "report.jsonl")}
    assert sorted(recs) == ["a000", "a001", "a002", "a003", "gone"]
    assert recs["gone"]["status"] == "failed" and "no such file" in recs["gone"]["error"]
    for s in srcs:
        r = recs[s.name]
        assert r["status"] == "ok" and r["convention"] == "adapter-transformers-3.1" and r["target"] == "adapters-1.0"
        assert r["rules"][0] == "read" and {"rescale", "write"} <= set(r["rules"]) and r["modules"] == 2
        assert 0 <= r["max_rel_fro"] <= r["tolerance"] and r["bytes"] > 0 and r["seconds"] > 0
        v = lora_migrate.verify(s, tmp_path / "out" / s.name)  # the output really holds the same ΔW
        assert v.ok
    assert "ok       4" in res.output and "failed   1" in res.output and "FAILED gone" in res.output
    assert "[5/5]" in res.output  # plain progress lines when not on a terminal


def test_csv_manifest_with_options_and_glob(tmp_path):
    srcs = sources(tmp_path, 2, version="adapters.1.2.0")
    csv = tmp_path / "m.csv"
    csv.write_text("source,to,from,name,options\n"
                   f"src/{srcs[0].name},adapters-1.0,,first,\"{{\"\"safetensors\"\": true}}\"\n"
                   f"src/{srcs[1].name},adapters-1.0,adapters-1.1,,\n")
    r = lora_migrate.batch(csv, tmp_path / "out")
    assert r.ok and [x.name for x in r.items] == ["first", srcs[1].name]
    assert (tmp_path / "out" / "first" / "adapter.safetensors").is_file()
    assert (tmp_path / "out" / srcs[1].name / "pytorch_adapter.bin").is_file()
    g = lora_migrate.batch(str(tmp_path / "src" / "a*"), tmp_path / "out2", to="adapters-1.0",
                           report=tmp_path / "g.jsonl")
    assert g.ok and g.count("ok") == 2 and len(records(tmp_path / "g.jsonl")) == 2


def test_rerun_skips_finished_items_and_redoes_changed_ones(tmp_path):
    srcs = sources(tmp_path, 3)
    m = jsonl(tmp_path / "m.jsonl", [{"source": str(s), "to": "adapters-1.0"} for s in srcs])
    first = lora_migrate.batch(m, tmp_path / "out", jobs=2)
    assert first.count("ok") == 3
    again = lora_migrate.batch(m, tmp_path / "out", jobs=2)
    assert again.count("skipped") == 3
    # the figures of the run that did the work
    assert [r.max_rel_fro for r in again.items] == [r.max_rel_fro for r in first.items]
    cfg = srcs[1] / "adapter_config.json"  # change one input: only that item runs again
    cfg.write_text(cfg.read_text().replace('"alpha": 8', '"alpha": 12'))
    third = lora_migrate.batch(m, tmp_path / "out", jobs=2)
    assert [r.status for r in third.items] == ["skipped", "ok", "skipped"]
    opts = jsonl(tmp_path / "m.jsonl", [{"source": str(s), "to": "adapters-1.1"} for s in srcs])  # new target
    assert lora_migrate.batch(opts, tmp_path / "out").count("ok") == 3
    assert len(records(tmp_path / "out" / "report.jsonl")) == 3  # one record per item, after every run


@pytest.mark.parametrize("text,msg", [('{"source": "x", "to": "adapters-1.0", "colour": 1}', "unknown column"),
                                      ('{"source": "x"}', "no 'to'"),
                                      ('{"source": "x", "to": "adaptors-2"}', "unknown convention"),
                                      ('{"source": "x", "to": "adapters-1.0", "options": {"fast": true}}',
                                       "unknown option"),
                                      ('{"source": "a/x", "to": "adapters-1.0"}\n{"source": "a/x", "to": '
                                       '"adapters-1.1"}', "both go to"),
                                      ("{not json", ":1: not valid JSON")])
def test_bad_manifest_is_one_line_exit_2(tmp_path, text, msg):
    m = tmp_path / "m.jsonl"
    m.write_text(text + "\n")
    res = CliRunner().invoke(main, ["batch", str(m), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1


def test_killed_halfway_then_rerun_finishes_the_rest(tmp_path):
    srcs = sources(tmp_path, 24)
    m = jsonl(tmp_path / "m.jsonl", [{"source": str(s), "to": "adapters-1.0"} for s in srcs])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lora_migrate.cli", "batch", str(m), "--out", str(out), "-j", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    report = out / "report.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if report.is_file() and len(report.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = [r for r in records(report) if r["status"] == "ok"]
    assert 4 <= len(done) < 24
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    recs = records(report)
    assert len(recs) == 24 and all(r["status"] in ("ok", "skipped") for r in recs)
    assert {r["name"] for r in recs if r["status"] == "skipped"} >= {r["name"] for r in done}
    assert not [q.name for q in out.iterdir() if "lora-migrate-tmp" in q.name]  # interrupted temp folders cleaned
    assert all(lora_migrate.verify(s, out / s.name).ok for s in srcs[::6])


def test_ray_executor_runs_the_same_items(tmp_path):
    if not os.environ.get("LORA_MIGRATE_TEST_RAY"):
        pytest.skip("set LORA_MIGRATE_TEST_RAY=1 (and pip install -c constraints.txt '.[ray]') to run the Ray test")
    pytest.importorskip("ray")
    srcs = sources(tmp_path, 3)
    m = jsonl(tmp_path / "m.jsonl", [{"source": str(s), "to": "adapters-1.0"} for s in srcs]
              + [{"source": str(tmp_path / "nope"), "to": "adapters-1.0"}])
    res = subprocess.run([sys.executable, "-m", "lora_migrate.cli", "batch", str(m), "--out", str(tmp_path / "ray"),
                          "-j", "2", "--executor", "ray"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "(ray, 2 workers)" in res.stdout
    local = lora_migrate.batch(m, tmp_path / "local", jobs=2)
    ray_recs = {r["name"]: r for r in records(tmp_path / "ray" / "report.jsonl")}
    for r in local.items:
        assert ray_recs[r.name]["status"] == r.status and ray_recs[r.name]["key"] == r.key
        if r.status == "ok":
            for f in ("adapter_config.json", "pytorch_adapter.bin"):
                assert (tmp_path / "ray" / r.name / f).read_bytes() == (tmp_path / "local" / r.name / f).read_bytes()


def test_manifest_options_reach_convert_and_paths_are_relative_to_the_manifest(tmp_path):
    """PiSSA goldens need their initial adapter (or the original base): the options carry them, relative to the
    manifest's folder, and the result is the same bytes as a direct conversion."""
    import shutil
    from pathlib import Path

    case = Path(__file__).parent.parent / "golden" / "peft" / "pf21" / "llama_pissa"
    shutil.copytree(case / "adapter", tmp_path / "m" / "p" / "adapter")
    shutil.copytree(case / "pissa_init", tmp_path / "m" / "p" / "init")
    m = jsonl(tmp_path / "m" / "manifest.jsonl", [
        {"source": "p/adapter", "to": "peft", "name": "with", "options": {"initial_adapter": "p/init"}},
        {"source": "p/adapter", "to": "peft", "name": "without"},
    ])
    lora_migrate.batch(m, tmp_path / "out")
    by = {r["name"]: r for r in records(tmp_path / "out" / "report.jsonl")}
    assert by["with"]["status"] == "ok" and by["without"]["status"] == "failed"
    assert "--initial-adapter" in by["without"]["error"]
    lora_migrate.convert(case / "adapter", tmp_path / "direct", to="peft", initial_adapter=case / "pissa_init")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "out" / "with" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes()
