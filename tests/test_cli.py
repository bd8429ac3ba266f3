"""The CLI: exit codes (0 ok, 1 check failed, 2 bad input), one-line errors, --json, and that nothing is lost."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lora_migrate.cli import main

from .builders import make_adapter, snapshot


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_convert_and_inspect(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    before = snapshot(src)
    code, out = run("convert", src, tmp_path / "out", "--from", "adapter-transformers-3.1", "--to", "adapters-1.0")
    assert code == 0, out
    assert "adapter-transformers-3.1 → adapters-1.0" in out and "OK" in out
    assert snapshot(src) == before  # the input is never modified
    code, out = run("inspect", tmp_path / "out")
    assert code == 0 and "adapters-1.0" in out and "version 'adapters.1.0.1'" in out


def test_convert_json(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    code, out = run("convert", src, tmp_path / "out", "--to", "adapters-1.0", "--json")
    assert code == 0
    r = json.loads(out)
    a = r["adapters"][0]
    assert r["source_convention"] == "adapter-transformers-3.1"
    assert a["plan"]["alpha_out"] == a["plan"]["r"] == 4 and a["verify"]["ok"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    code, out = run("convert", src, tmp_path / "out", "--to", "adapters-1.0", "--dry-run")
    assert code == 0
    assert "[rescale]" in out and "[write]" in out and "pytorch_adapter.bin" in out
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out = run("convert", src, tmp_path / "out", "--to", "adapters-1.0")
    assert code == 2 and "already exists" in out and "--overwrite" in out
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, _ = run("convert", src, tmp_path / "out", "--to", "adapters-1.0", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.parametrize("args,message", [
    (["--to", "adapters-9"], "unknown convention"),
    (["--to", "adapters-1.0", "--from", "peft"], "names a PEFT convention, but this is an AdapterHub"),
    (["--to", "adapters-1.0", "--from", "peftx"], "unknown convention"),
    (["--to", "adapters-1.0", "--adapter", "nope"], "no adapter 'nope'"),
])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, args, message):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    code, out = run("convert", src, tmp_path / "out", *args)
    assert code == 2 and message in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    code, out = run("inspect", tmp_path / "nothing")
    assert code == 2 and "no such file" in out


def test_ambiguous_version_names_the_candidates(tmp_path):
    src = make_adapter(tmp_path / "src", version=None)
    code, out = run("inspect", src)
    assert code == 2 and "adapter-transformers-3.1" in out and "adapters-1.0" in out and "--from" in out


def test_verification_failure_exits_1_and_leaves_nothing(tmp_path, monkeypatch):
    from lora_migrate import execution as plan_mod

    src = make_adapter(tmp_path / "src", version="3.1.0")
    real = plan_mod.Execution.apply

    def broken(self, d, kind):  # a writer bug: the scale is folded twice
        e = real(self, d, kind)
        return e.replace(B=e.B * 2)

    monkeypatch.setattr(plan_mod.Execution, "apply", broken)
    code, out = run("convert", src, tmp_path / "out", "--to", "adapters-1.0")
    assert code == 1 and "numeric check failed" in out and "nothing was written" in out
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind


def test_verify_command(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    run("convert", src, tmp_path / "out", "--to", "adapters-1.0")
    code, out = run("verify", src, tmp_path / "out")
    assert code == 0 and "OK" in out
    # tamper with the output: verify must say so with exit 1
    w = tmp_path / "out" / "pytorch_adapter.bin"
    sd = torch.load(w, weights_only=True)
    k = next(k for k in sd if k.endswith("lora_B"))
    sd[k] = sd[k] * 1.01
    torch.save(sd, w)
    code, out = run("verify", src, tmp_path / "out")
    assert code == 1 and "mismatch" in out


def test_conventions_lists_every_scaling_rule():
    code, out = run("conventions")
    assert code == 0
    for name in ("adapter-transformers-3.1", "adapters-1.0", "adapters-1.1"):
        assert name in out
    code, out = run("conventions", "--json")
    rows = json.loads(out)
    from lora_migrate.schemas import CONVENTIONS

    linear = {r["name"]: r["scaling"]["linear"] for r in rows}
    assert sorted(linear) == sorted(c.name for c in CONVENTIONS)  # every convention, each codec's own included
    assert linear.items() >= {
        "adapter-transformers-3.1": "alpha/r", "adapters-1.0": "1.0", "adapters-1.1": "alpha/r",
        "peft-0.13": "alpha/r", "peft-0.14": "alpha/r", "peft-0.15": "alpha/r", "peft-0.16": "alpha/r",
        "peft": "alpha/r", "lorax": "alpha/r", "vllm": "alpha/r", "diffusers": "alpha/r",
        "gguf": "alpha/r", "kohya": "alpha/r",
        # mlx-lm: an absolute scale (stored as alpha, applied as is); torchtune alpha/r
        "mlx-lm-2024-03": "alpha", "mlx-lm-2024-06": "alpha", "mlx-lm": "alpha", "torchtune": "alpha/r"}.items()


def test_conventions_listing_is_current_and_needs_no_schemas():
    """`conventions` prints lora_migrate/_listing.py, generated from the schemas: it must be exactly what the
    schemas render now (else: scripts/gen_conventions_listing.py), and printing it must not import
    pydantic or the schemas (the point of the copy)."""
    import subprocess
    import sys

    from lora_migrate._listing import LISTING
    from lora_migrate.cli import render_conventions
    from lora_migrate.schemas import CONVENTIONS

    assert LISTING == render_conventions(CONVENTIONS), "run: .venv/bin/python scripts/gen_conventions_listing.py"
    code, out = run("conventions")
    assert code == 0 and out == LISTING
    probe = ("import sys\nfrom lora_migrate.cli import run\nsys.argv[1:] = ['conventions']\n"
             "import atexit\natexit.register(lambda: print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('pydantic', 'torch') or m.startswith('lora_migrate.schemas')), file=sys.stderr))\nrun()")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == LISTING
    assert p.stderr.strip() == "[]", p.stderr
    probe = ("import sys\nfrom lora_migrate.cli import run\nsys.argv[1:] = ['conventions', '--json']\n"
             "import atexit\natexit.register(lambda: print('torch' in sys.modules, file=sys.stderr))\nrun()")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and len(json.loads(p.stdout)) == len(CONVENTIONS)
    assert p.stderr.strip() == "False", p.stderr  # --json lists them without torch too


def test_converting_onto_itself_or_inside_the_source_is_refused(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    before = snapshot(src)
    for out in (src, src / "sub"):
        code, msg = run("convert", src, out, "--to", "adapters-1.0", "--overwrite")
        assert code == 2 and "Traceback" not in msg, msg
    assert snapshot(src) == before


def test_ia3_into_a_target_without_it_is_refused(tmp_path, monkeypatch):
    from lora_migrate import schemas
    from lora_migrate.errors import UnsupportedFeature
    from lora_migrate.plan import plan_adapter
    from lora_migrate.detect import open_source

    src = make_adapter(tmp_path / "src", version="3.1.0", config={"composition_mode": "scale", "r": 1},
                       sd={f"{m}.loras.m1.lora_B": torch.ones(12, 1) for m in ("a.q", "a.v")})
    lora_only = schemas.get_convention("adapters-1.1").model_copy(
        update={"scaling": {"linear": schemas.Scaling.ALPHA_OVER_R}})
    s = open_source(src)
    try:
        with pytest.raises(UnsupportedFeature, match=r"cannot express \(IA\)³"):
            plan_adapter(s.adapters[0], lora_only, ".")
    finally:
        s.close()


def test_verbose_prints_every_module(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    code, out = run("convert", src, tmp_path / "out", "--to", "adapters-1.0", "-v")
    assert code == 0
    assert out.count("SelfAttention.") == 2 and "relative error" in out
    code, out = run("verify", src, tmp_path / "out", "-v")
    assert code == 0 and out.count(": ok, relative error") == 2


# ------------------------------------------------------------------------------- the console entry point: run()

def _entry(*args, prelude: str = ""):
    """The console script as installed (``lora_migrate.cli:run``) in a fresh process, output to pipes (so stdout is
    block-buffered: what is not flushed before ``os._exit`` is lost)."""
    import subprocess
    import sys

    import os

    code = f"{prelude}\nimport sys\nfrom lora_migrate.cli import run\nsys.argv[0] = 'lora-migrate'\nrun()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_console_script_is_run():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lora-migrate"]
    assert ep.value == "lora_migrate.cli:run"


def test_run_flushes_output_runs_exit_handlers_and_keeps_exit_codes(tmp_path):
    src = make_adapter(tmp_path / "src", version="3.1.0")
    bye = "import atexit, sys\natexit.register(lambda: print('exit handler ran', file=sys.stderr))"
    p = _entry("convert", src, tmp_path / "out", "--to", "adapters-1.0", "--json", prelude=bye)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["adapters"][0]["verify"]["ok"] is True  # the whole JSON document reached the pipe
    assert "exit handler ran" in p.stderr
    p = _entry("convert", src, tmp_path / "out", "--to", "adapters-1.0", prelude=bye)
    assert p.returncode == 2 and p.stderr.splitlines()[0].startswith("error: ") and "--overwrite" in p.stderr
    assert "exit handler ran" in p.stderr
    # an exit handler's print() into a pipe stays in Python's buffer (the command's click.echo calls, which flush,
    # are over by then): only run()'s flush after the handlers gets it out
    late = "import atexit\natexit.register(lambda: print('printed by an exit handler'))"
    p = _entry("convert", src, tmp_path / "out3", "--to", "adapters-1.0", prelude=late)
    assert p.returncode == 0 and p.stdout.endswith("OK\nprinted by an exit handler\n"), p.stdout
    p = _entry("convert", tmp_path / "nope", tmp_path / "o2", "--to", "adapters-1.0")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    p = _entry("conventions")  # no torch: the normal exit
    assert p.returncode == 0 and "adapters-1.0" in p.stdout


def test_run_skips_the_teardown_only_after_torch(tmp_path):
    """With torch loaded the process ends by os._exit: an object's __del__ at teardown never runs. Without torch,
    or with LORA_MIGRATE_FULL_EXIT=1, it does."""
    src = make_adapter(tmp_path / "src", version="3.1.0")
    marker = ("import sys\nclass _D:\n    def __del__(self):\n        sys.stderr.write('teardown ran\\n')\n"
              "sys.modules['_d'] = _D()")
    p = _entry("convert", src, tmp_path / "out", "--to", "adapters-1.0", prelude=marker)
    assert p.returncode == 0 and "teardown ran" not in p.stderr and "OK" in p.stdout
    p = _entry("conventions", prelude=marker)
    assert p.returncode == 0 and "teardown ran" in p.stderr
    import os
    import subprocess
    import sys

    code = f"{marker}\nimport sys\nfrom lora_migrate.cli import run\nrun()"
    p = subprocess.run([sys.executable, "-c", code, "convert", str(src), str(tmp_path / "out2"), "--to",
                        "adapters-1.0"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LORA_MIGRATE_FULL_EXIT": "1"})
    assert p.returncode == 0 and "teardown ran" in p.stderr
