"""atomic_output: all-or-nothing output directories; refuse_overlap."""

import errno
import os

import pytest
import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import SafetensorsWriter, atomic_output, refuse_overlap
from lora_migrate.io import atomic
from lora_migrate.io import safetensors_writer as writer_module


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "lora-migrate" in p.name)


@pytest.fixture(params=["exchange", "rename-aside"])
def install_mode(request, monkeypatch):
    """Run overwrite tests both with renameat2(RENAME_EXCHANGE) and with the portable fallback."""
    if request.param == "rename-aside":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_creates_output(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.lora-migrate-tmp-")
        assert not out.exists()
        (tmp / "adapter_config.json").write_text("{}")
    assert (out / "adapter_config.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


def test_creates_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with atomic_output(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"


def test_parent_not_creatable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraMigrateError, match="cannot create output directory"):
        with atomic_output(tmp_path / "file" / "out"):
            pytest.fail("must not be reached")


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyError):
        with atomic_output(out) as tmp:
            (tmp / "half").write_text("x")
            raise KeyError("boom")
    assert not out.exists() and leftovers(tmp_path) == []


def test_callers_own_oserror_passes_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_output(tmp_path / "out"):
            open(tmp_path / "missing-input")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "out"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(LoraMigrateError) as info:
        with atomic_output(out):
            pytest.fail("must not be reached")
    assert str(info.value) == f"{out} already exists; pass --overwrite to replace it"
    assert (out / "old").read_text() == "old" and leftovers(tmp_path) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LoraMigrateError, match="already exists"):
        with atomic_output(tmp_path / "dangling"):
            pass


def test_overwrite_replaces_whole_directory(tmp_path, install_mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_only").write_text("old")
    (out / "shared").write_text("old")
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "shared").write_text("new")
        assert (out / "old_only").exists()  # old output intact until the end
    assert sorted(p.name for p in out.iterdir()) == ["shared"]
    assert (out / "shared").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_a_file(tmp_path, install_mode):
    out = tmp_path / "out"
    out.write_text("a file")
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and leftovers(tmp_path) == []


def test_overwrite_failure_keeps_old(tmp_path, install_mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
            raise RuntimeError("conversion failed")
    assert (out / "f").read_text() == "old" and leftovers(tmp_path) == []


def test_rename_aside_restores_old_if_install_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    real_rename = os.rename

    def flaky_rename(src, dst):
        if ".out.lora-migrate-tmp-" in str(src):  # installing the new output fails
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky_rename)
    with pytest.raises(LoraMigrateError, match=f"cannot write {out}"):
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "old" and leftovers(tmp_path) == []


def test_enospc_becomes_one_line_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoraMigrateError) as info:
        with atomic_output(out) as tmp:
            (tmp / "partial").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"no space left on device while writing {out}"
    assert not out.exists() and leftovers(tmp_path) == []


class _FullDisk:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        if memoryview(data).nbytes > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_enospc_from_writer_names_final_output(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "open", lambda p, m: _FullDisk(open(p, m)), raising=False)
    out = tmp_path / "out"
    with pytest.raises(LoraMigrateError) as info:
        with atomic_output(out) as tmp, SafetensorsWriter(tmp / "adapter_model.safetensors") as w:
            w.add("a", torch.float32, (100,))
            w.write_header()
            w.write("a", torch.zeros(100))
    assert str(info.value) == f"no space left on device while writing {out}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_refuse_overlap(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    for out, match in [
        (src, "is the input"),
        (tmp_path / "link", "is the input"),
        (src / "sub" / "out", "inside the input"),
        (tmp_path / "link" / "out", "inside the input"),
        (tmp_path, "inside the output"),
    ]:
        with pytest.raises(LoraMigrateError, match=match) as info:
            refuse_overlap(src, out)
        assert "\n" not in str(info.value)
    refuse_overlap(src, tmp_path / "out")
    refuse_overlap(src, tmp_path / "src2")  # a name prefix is not containment
    refuse_overlap(src / "adapter_model.safetensors", tmp_path / "out")
    with pytest.raises(LoraMigrateError, match="inside the output"):
        refuse_overlap(src / "adapter_model.safetensors", src)


# ------------------------------------------------------------------------------------------------ stale temps


def dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_names_carry_host_and_pid(tmp_path):
    with atomic_output(tmp_path / "out") as tmp:
        _, kind, host, pid, rand = tmp.name.rsplit("-", 4)
        assert tmp.name.startswith(".out.lora-migrate-tmp-") and host == atomic._host_tag()
        assert int(pid) == os.getpid() and len(rand) == 8


def test_stale_temps_of_dead_owners_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    host, dead, alive = atomic._host_tag(), dead_pid(), os.getpid()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f".out.lora-migrate-tmp-{host}-{dead}-abcd_123": "removed",       # ours, owner gone
        f".out.lora-migrate-tmp-{host}-{alive}-abcd_123": "kept",         # owner running
        f".out.lora-migrate-tmp-{other_host}-{dead}-abcd_123": "kept",    # another machine's (shared disk)
        f".out.lora-migrate-tmp-{host}-{dead}-abcd_1234": "kept",         # not a name we make
        ".out.lora-migrate-tmp-abcd_123": "kept",                         # an older version's: owner unknown
        f".other.lora-migrate-tmp-{host}-{dead}-abcd_123": "kept",        # another output's
        f".out.lora-migrate-old-{host}-{dead}-abcd_123": "kept",          # OUT missing: may hold the only copy
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / f".out.lora-migrate-tmp-{host}-{dead}-file_123").write_text("a file, not a folder")
    (tmp_path / f".out.lora-migrate-tmp-{host}-{dead}-link_123").symlink_to(tmp_path / ".out.lora-migrate-tmp-abcd_123")
    with atomic_output(out) as tmp:
        (tmp / "f").write_text("new")
    for name, fate in names.items():
        assert (tmp_path / name).exists() == (fate == "kept"), name
    assert (tmp_path / f".out.lora-migrate-tmp-{host}-{dead}-file_123").is_file()
    assert (tmp_path / f".out.lora-migrate-tmp-{host}-{dead}-link_123").is_symlink()
    assert (tmp_path / ".out.lora-migrate-tmp-abcd_123" / "f").exists()  # not followed through the link
    # with OUT in place, a dead owner's moved-aside previous output is removable too
    assert atomic.remove_stale(out) == [tmp_path / f".out.lora-migrate-old-{host}-{dead}-abcd_123"]
