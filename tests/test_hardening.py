"""Crash safety (kill -9 during convert), a real full disk, the check made while writing, non-finite values."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_migrate import api
from lora_migrate.cli import main
from lora_migrate.errors import VerificationFailed
from lora_migrate.rules.scale import _mul

from .builders import make_adapter, snapshot

MODULES = [f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in range(12) for m in "qv"]


def big_sd(name="m1", r=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in MODULES:
        sd[f"{m}.loras.{name}.lora_A"] = torch.randn(r, n, generator=g)
        sd[f"{m}.loras.{name}.lora_B"] = torch.randn(n, r, generator=g)
    return sd


# ------------------------------------------------------------------------------------------------ kill -9


def _convert_proc(src: Path, out: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lora_migrate.cli", "convert", str(src), str(out), "--to", "adapters-1.0",
           "--overwrite"]
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _state(out: Path, previous: dict, src: Path) -> str:
    """'previous' (untouched), 'new' (a complete output that passes the check); anything else fails the test."""
    if snapshot(out) == previous:
        return "previous"
    assert api.verify(src, out).ok, "a partial or wrong output is at OUT"
    return "new"


def test_kill_9_leaves_the_previous_output_or_the_new_one_never_a_partial(tmp_path):
    src = make_adapter(tmp_path / "src", config={"r": 16}, sd=big_sd())
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the previous output")
    previous = snapshot(out)
    n_tensors = 2 * len(MODULES)
    # deterministic kill points: mid-file, at the last tensor, and just before the rename
    points = [("write", n_tensors // 2), ("write", n_tensors), ("install", 1)]
    for point, n in points:
        marker = tmp_path / f"at-{point}-{n}"
        p = _convert_proc(src, out, {"LORA_MIGRATE_FAULT": f"pause:{point}:{n}",
                                     "LORA_MIGRATE_FAULT_MARKER": str(marker)})
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _state(out, previous, src) == "previous", (point, n)
        # the killed run's temporary folder is left (hidden); the one an earlier kill left, this run removed
        assert [x.name.split("-")[-2] for x in tmp_path.iterdir() if "lora-migrate" in x.name] == [str(p.pid)]
    # random moments over a whole run (most land in start-up; some mid-write); the first run measures it
    t0 = time.monotonic()
    p = _convert_proc(src, tmp_path / "timing", {})
    assert p.wait() == 0
    span = time.monotonic() - t0
    rng = random.Random(0)
    seen = set()
    for _ in range(2):
        p = _convert_proc(src, out, {})
        time.sleep(rng.uniform(0.3 * span, 1.1 * span))
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.add(_state(out, previous, src))
        if "new" in seen:  # from here on "previous" is the new output
            previous = snapshot(out)
    # temporary folders a killed run leaves are hidden and never mistaken for OUT
    assert all(x.name.startswith(".out.lora-migrate-tmp-") for x in tmp_path.iterdir()
               if x.name not in ("src", "out", "timing") and not x.name.startswith("at-"))
    # and the next run for the same OUT removes them (their owners are dead) and leaves none of its own
    p = _convert_proc(src, out, {})
    assert p.wait() == 0, p.stderr.read().decode()
    assert _state(out, previous, src) in ("previous", "new")
    assert [x.name for x in tmp_path.iterdir() if "lora-migrate" in x.name] == []


def test_real_full_disk_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = make_adapter(tmp_path / "src", config={"r": 16}, sd=big_sd())  # ~0.8 MB of tensors
        res = CliRunner().invoke(main, ["convert", str(src), str(mnt / "out"), "--to", "adapters-1.0"])
        assert res.exit_code == 2
        assert res.stderr.strip().splitlines() == [f"error: no space left on device while writing {mnt / 'out'}"]
        assert list(mnt.iterdir()) == []  # the temporary folder is gone too
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------------ check while writing


@pytest.mark.parametrize("safetensors", [False, True])
def test_check_reads_the_written_file_back(tmp_path, monkeypatch, safetensors):
    """A byte changed on disk after the in-memory check (here: by a writer that corrupts) fails the conversion."""
    from lora_migrate.io import BinWriter, SafetensorsWriter

    src = make_adapter(tmp_path / "src", config={"r": 16}, sd=big_sd())
    writer = SafetensorsWriter if safetensors else BinWriter
    real = writer.write

    def corrupting(self, name, tensor):
        if self._next == 5:
            tensor = tensor.clone()
            tensor.view(-1)[7] += 1e-3
        real(self, name, tensor)

    monkeypatch.setattr(writer, "write", corrupting)
    with pytest.raises(VerificationFailed) as info:
        api.convert(src, tmp_path / "out", to="adapters-1.0", safetensors=safetensors)
    bad = info.value.report.failures()
    assert len(bad) == 1 and "read back differs from what was written" in bad[0].detail
    assert not (tmp_path / "out").exists()


def test_convert_report_and_exact_proof(tmp_path):
    src = make_adapter(tmp_path / "src", config={"r": 16, "alpha": 32}, sd=big_sd())  # at31: scale 2 → folded
    r = api.convert(src, tmp_path / "out", to="adapters-1.0")
    rep = r.adapters[0].verify
    assert rep.ok and rep.n_modules == len(MODULES) and rep.max_rel_fro == 0.0
    assert all(m.detail == "exact: A identical, B' = 2·B with no rounding" for m in rep.modules)
    # and the standalone check, which reads both from disk, agrees
    assert api.verify(src, tmp_path / "out").ok


def test_allow_nonfinite_passes_values_through(tmp_path):
    sd = big_sd()
    key = f"{MODULES[3]}.loras.m1.lora_B"
    sd[key][0, 0] = float("nan")
    sd[key][1, 1] = float("-inf")
    src = make_adapter(tmp_path / "src", config={"r": 16}, sd=sd)
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "adapters-1.0",
                                    "--allow-nonfinite"])
    assert res.exit_code == 0, res.output
    assert f"module {MODULES[3]}: lora_B holds 1 NaN and 1 Inf of 4096 values (passed through" in res.stdout
    assert "1 with non-finite values not compared, --allow-nonfinite" in res.stdout
    back = torch.load(tmp_path / "out" / "pytorch_adapter.bin", weights_only=True)[key]
    assert back[0, 0].isnan() and back[1, 1] == float("-inf")


def test_power_of_two_fast_rescale_is_bit_identical_to_float64_exhaustively():
    for dt in (torch.float16, torch.bfloat16):
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dt)
        for c in (1.0, 2.0, 8.0, 2.0**30, 2.0**127, 2.0**128, 2.0**200):
            fast, ref = _mul(every, c), (every.double() * c).to(dt)
            assert torch.equal(fast.view(torch.int16)[~ref.isnan()], ref.view(torch.int16)[~ref.isnan()])
            assert torch.equal(fast.isnan(), ref.isnan())
    x = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), dtype=torch.int32).view(torch.float32)
    for c in (2.0, 2.0**100, 2.0**127, 2.0**200):
        fast, ref = _mul(x, c), (x.double() * c).float()
        assert torch.equal(fast[~ref.isnan()], ref[~ref.isnan()])


def test_fault_hook_is_inert_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_MIGRATE_FAULT", raising=False)
    src = make_adapter(tmp_path / "src")
    assert api.convert(src, tmp_path / "out", to="adapters-1.0").ok
    shutil.rmtree(tmp_path / "out")


def test_digest_sees_any_change_and_is_stable_as_the_cache_grows():
    from lora_migrate.check.written import tensor_digest

    a = torch.randn(1000, 7).bfloat16()
    d = tensor_digest(a)
    tensor_digest(torch.randn(3_000_000))  # grows the multiplier cache
    assert tensor_digest(a) == d and tensor_digest(a.clone()) == d
    words = a.clone().view(-1).view(torch.int64)
    words[[3, 4]] = words[[4, 3]]  # two 64-bit words swapped: same bytes, other places
    assert tensor_digest(words.view(torch.bfloat16).view(1000, 7)) != d
    b = a.clone()
    b.view(-1)[-1] = -b.view(-1)[-1]  # the last element
    assert tensor_digest(b) != d
    odd = torch.arange(11, dtype=torch.uint8)
    assert tensor_digest(odd) != tensor_digest(torch.cat([odd[:-1], torch.tensor([99], dtype=torch.uint8)]))
    assert tensor_digest(a.view(7, 1000)) != d  # the shape is part of it


def test_read_back_catches_a_byte_changed_after_the_check(tmp_path, monkeypatch):
    """The written file is compared with the digests taken while checking: change one value of a rescaled B on
    its way to the file (after the check passed on it) and the conversion must fail with nothing written."""
    from lora_migrate.io import safetensors_writer

    src = make_adapter(tmp_path / "src", config={"r": 16}, sd=big_sd())
    real = safetensors_writer.SafetensorsWriter.write
    hit = []

    def corrupt(self, name, t):
        if name.endswith("lora_B") and not hit:
            t = t.clone()
            t.view(-1)[7] = t.view(-1)[7] * 2
            hit.append(name)
        return real(self, name, t)

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "write", corrupt)
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "adapters-1.0",
                                    "--safetensors"])
    assert hit and res.exit_code == 1, res.output
    assert "differs from what was written and checked" in res.output
    assert not (tmp_path / "out").exists()
