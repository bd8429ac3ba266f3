"""BinWriter: streaming ``torch.save``-format writer -- byte identity with torch.save, weights_only and mmap
round trips for every dtype, plan enforcement, clean failure (full disk included), bounded memory."""

import errno
import gc
import os
import struct
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import BinWriter, OutOfSpace
from lora_migrate.io import bin_writer as bin_module
from tests.io.memprobe import run_script
from tests.io.bitwise import SAVE_DTYPES, bits, bitwise_equal, edge_sample, random_tensor  # noqa: F401

DTYPES = SAVE_DTYPES



def write_all(path, tensors, order=None):
    with BinWriter(path) as w:
        for name in order or tensors:
            w.add(name, tensors[name].dtype, tensors[name].shape)
        w.write_header()
        for name in order or tensors:
            w.write(name, tensors[name])
    return w


def assert_loads(path, d):
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert type(loaded) is dict and list(loaded) == list(d)
        for k, t in d.items():
            assert bitwise_equal(loaded[k], t), (k, mmap)
            assert loaded[k].is_contiguous() and not loaded[k].requires_grad


def test_all_dtypes_round_trip_and_byte_identical_to_torch_save(tmp_path):
    d = edge_sample()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    path = tmp_path / "ours" / "pytorch_adapter.bin"
    w = write_all(path, d)
    assert w.streaming is True
    torch.save(d, tmp_path / "ref" / "pytorch_adapter.bin")
    assert path.read_bytes() == (tmp_path / "ref" / "pytorch_adapter.bin").read_bytes()
    assert_loads(path, d)


def test_write_behind_starts_disk_writes_and_changes_no_byte(tmp_path, monkeypatch):
    from lora_migrate.io import _common

    calls = []
    real = _common.WriteBehind.wrote
    monkeypatch.setattr(_common.WriteBehind, "EVERY", 8)
    monkeypatch.setattr(_common.WriteBehind, "wrote", lambda self, end, flush=None: (calls.append(end),
                                                                                     real(self, end, flush)))
    test_all_dtypes_round_trip_and_byte_identical_to_torch_save(tmp_path)
    assert len(calls) == len(edge_sample()) and calls == sorted(calls)


def test_zip_layout(tmp_path):
    """Archive folder is the file stem (as torch.save(obj, path)); records in torch's order; 64-byte aligned."""
    d = {"w": torch.randn(3, 5), "v": torch.randn(7).to(torch.bfloat16), "z": torch.zeros(0)}
    path = tmp_path / "pytorch_adapter.bin"
    write_all(path, d)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names == [
            "pytorch_adapter/data.pkl", "pytorch_adapter/.format_version", "pytorch_adapter/.storage_alignment",
            "pytorch_adapter/byteorder", "pytorch_adapter/data/0", "pytorch_adapter/data/1",
            "pytorch_adapter/data/2", "pytorch_adapter/version", "pytorch_adapter/.data/serialization_id",
        ]  # fmt: skip
        assert z.testzip() is None  # CRCs are right
        assert z.read("pytorch_adapter/byteorder") == sys.byteorder.encode()
        raw = path.read_bytes()
        for info in z.infolist():
            if "/data/" in info.filename:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert z.read("pytorch_adapter/data/1") == bits(d["v"]).numpy().tobytes()


def test_non_ascii_path_matches_torch_save(tmp_path):
    """torch's writer opens ASCII names only; torch.save then writes via a file object, folder ``archive/``."""
    d = {"x": torch.randn(4, 4), "é": torch.arange(3)}
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    path = tmp_path / "ours" / "adaptér.bin"
    write_all(path, d)
    torch.save(d, tmp_path / "ref" / "adaptér.bin")
    assert path.read_bytes() == (tmp_path / "ref" / "adaptér.bin").read_bytes()
    with zipfile.ZipFile(path) as z:
        assert z.namelist()[0] == "archive/data.pkl"
    assert_loads(path, d)


def test_empty_plan(tmp_path):
    (tmp_path / "ref").mkdir()
    path = tmp_path / "e.bin"
    write_all(path, {})
    torch.save({}, tmp_path / "ref" / "e.bin")
    assert path.read_bytes() == (tmp_path / "ref" / "e.bin").read_bytes()
    assert torch.load(path, weights_only=True) == {}


def test_views_subclasses_and_lazy_bits_are_written_compactly(tmp_path):
    big = torch.randn(1000, 1000)  # 4 MB storage
    c = torch.randn(4, dtype=torch.complex64)
    d = {
        "row": big[3],
        "col": big[:, 7],
        "block": big[10:12, 20:24].T,
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "grad": torch.randn(2, requires_grad=True) * 2,
        "conj": c.conj(),
        "neg": torch._neg_view(torch.randn(3)),
        "expanded": torch.ones(1, 3).expand(4, 3),
    }
    path = tmp_path / "v.bin"
    write_all(path, d)
    assert path.stat().st_size < 64_000
    loaded = torch.load(path, weights_only=True, mmap=True)
    for k, t in d.items():
        assert type(loaded[k]) is torch.Tensor and torch.equal(loaded[k], t.detach()), k
        assert not loaded[k].is_conj() and not loaded[k].is_neg()
    assert d["row"].untyped_storage().data_ptr() == big.untyped_storage().data_ptr()  # inputs untouched


def test_plan_mismatches_raise_value_error(tmp_path):
    path = tmp_path / "p.bin"
    w = BinWriter(path)
    w.add("a", torch.float32, (2,))
    w.add("b", torch.int64, [])
    for bad in [
        lambda: w.add("a", torch.float32, (1,)),  # duplicate
        lambda: w.add(3, torch.float32, (1,)),  # name not a str
        lambda: w.add("c", torch.float32, (-1,)),
        lambda: w.add("c", torch.float32, (1.0,)),
        lambda: w.add("c", torch.float32, (True,)),
        lambda: w.add("c", "float32", (1,)),
        lambda: w.add("c", torch.qint8, (1,)),  # torch cannot save it as a plain tensor
        lambda: w.write("a", torch.zeros(2)),  # before the header
        lambda: w.close(),  # before the header: also deletes (nothing yet)
    ]:
        with pytest.raises(ValueError):
            bad()
    w = BinWriter(path)
    w.add("a", torch.float32, (2,))
    w.add("b", torch.int64, [])
    w.write_header()
    assert path.exists()
    with pytest.raises(ValueError):
        w.add("c", torch.float32, (1,))
    with pytest.raises(ValueError):
        w.write_header()
    with pytest.raises(ValueError, match="expects 'a' next"):
        w.write("b", torch.tensor(1))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="dense"):
        w.write("a", torch.zeros(2).to_sparse())
    with pytest.raises(ValueError, match="dense"):
        w.write("a", [0.0, 0.0])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed before writing b "):
        w.close()
    assert not path.exists()


def test_too_many_writes(tmp_path):
    w = BinWriter(tmp_path / "p.bin")
    w.add("a", torch.float32, (1,))
    w.write_header()
    w.write("a", torch.zeros(1))
    with pytest.raises(ValueError, match="already written"):
        w.write("a", torch.zeros(1))
    w.close()
    assert torch.load(tmp_path / "p.bin", weights_only=True)["a"].shape == (1,)


def test_exception_in_context_deletes_partial_file(tmp_path):
    path = tmp_path / "p.bin"
    with pytest.raises(KeyError):
        with BinWriter(path) as w:
            w.add("a", torch.float32, (1000,))
            w.add("b", torch.float32, (1000,))
            w.write_header()
            w.write("a", torch.zeros(1000))
            raise KeyError("boom")
    assert not path.exists()
    with pytest.raises(ValueError, match="closed before writing b "):
        with BinWriter(path) as w:
            w.add("a", torch.float32, (1,))
            w.add("b", torch.float32, (1,))
            w.write_header()
            w.write("a", torch.zeros(1))
    assert not path.exists()


def test_abandoned_writer_is_cleaned_up(tmp_path):
    """Dropping an unfinished writer must not reach PyTorchFileWriter's finalizing destructor (std::terminate)."""
    path = tmp_path / "p.bin"
    w = BinWriter(path)
    w.add("a", torch.float32, (10,))
    w.write_header()
    del w
    gc.collect()
    assert not path.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_by_name_is_out_of_space():
    """Opened by name, torch's C++ writer reports only 'iostream error'; the writer still says OutOfSpace."""
    with pytest.raises(OutOfSpace, match="^no space left on device while writing /dev/full$"):
        with BinWriter("/dev/full") as w:
            w.add("a", torch.float32, (1 << 20,))
            w.write_header()
            w.write("a", torch.zeros(1 << 20))
    assert os.path.exists("/dev/full")  # device nodes are never unlinked


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_through_file_object_is_out_of_space(tmp_path):
    path = tmp_path / "fülle.bin"  # non-ASCII: written through a Python file object
    path.symlink_to("/dev/full")
    with pytest.raises(OutOfSpace, match=f"^no space left on device while writing {path}$"):
        with BinWriter(path) as w:
            w.add("a", torch.float32, (1 << 20,))
            w.write_header()
            w.write("a", torch.zeros(1 << 20))


class _FailingZip:
    """Stands in for PyTorchFileWriter: fails like torch's C++ writer does, without an OS error behind it."""

    def __init__(self, name, *args):
        self.real = torch._C.PyTorchFileWriter(name, *args)
        self.records = 0
        self.finalized = False

    def write_record(self, name, data, size):
        self.records += 1
        if name.startswith("data/"):
            raise RuntimeError("[enforce fail at inline_container.cc:1] . PytorchStreamWriter failed writing file")
        self.real.write_record(name, data, size)

    def write_end_of_file(self):
        self.finalized = True
        self.real.write_end_of_file()


def test_non_os_writer_failure_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bin_module, "_file_writer_class", lambda: _FailingZip)
    path = tmp_path / "p.bin"
    with pytest.raises(LoraMigrateError, match=r"p\.bin: cannot write: \[enforce fail") as info:
        write_all(path, {"a": torch.zeros(3)})
    assert not isinstance(info.value, OutOfSpace)
    assert not path.exists()


def test_enospc_reported_by_zip_writer_is_out_of_space(tmp_path, monkeypatch):
    class Full(_FailingZip):
        def write_record(self, name, data, size):
            if name.startswith("data/"):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.real.write_record(name, data, size)

    monkeypatch.setattr(bin_module, "_file_writer_class", lambda: Full)
    path = tmp_path / "p.bin"
    with pytest.raises(OutOfSpace, match=f"^no space left on device while writing {path}$"):
        write_all(path, {"a": torch.zeros(3)})
    assert not path.exists()


def test_unwritable(tmp_path):
    with pytest.raises(LoraMigrateError, match="missing-dir/x.bin: cannot write: No such file or directory"):
        write_all(tmp_path / "missing-dir" / "x.bin", {"a": torch.ones(1)})
    with pytest.raises(LoraMigrateError, match="cannot write: Is a directory"):
        write_all(tmp_path, {"a": torch.ones(1)})


def test_fallback_without_pytorch_file_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(bin_module, "_file_writer_class", lambda: None)
    d = edge_sample()
    (tmp_path / "ref").mkdir()
    path = tmp_path / "pytorch_adapter.bin"
    w = write_all(path, d)
    assert w.streaming is False
    torch.save(d, tmp_path / "ref" / "pytorch_adapter.bin")
    assert path.read_bytes() == (tmp_path / "ref" / "pytorch_adapter.bin").read_bytes()
    assert_loads(path, d)


NAME = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
SPEC = st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.dictionaries(NAME, SPEC, max_size=6), seed=st.integers(0, 2**31))
def test_property_byte_identical_to_torch_save(specs, seed):
    gen = torch.Generator().manual_seed(seed)
    d = {name: random_tensor(dtype, tuple(shape), gen) for name, (dtype, shape) in specs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = Path(tmp) / "a" / "pytorch_adapter.bin", Path(tmp) / "b" / "pytorch_adapter.bin"
        ours.parent.mkdir()
        ref.parent.mkdir()
        write_all(ours, d)
        torch.save(d, ref)
        assert ours.read_bytes() == ref.read_bytes()
        assert_loads(ours, d)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lora_migrate.io import BinWriter
    from tests.io.memprobe import reset_peak, status

    N, NUMEL = 40, 4 << 20  # 40 float32 tensors of 16 MiB: 640 MiB

    def tensors():
        for i in range(N):
            yield f"layer.{i}.weight", torch.full((NUMEL,), float(i))

    torch.full((NUMEL,), 0.0).sum()  # warm up allocator and kernels
    before = reset_peak()
    with BinWriter(sys.argv[1]) as w:
        for i in range(N):
            w.add(f"layer.{i}.weight", torch.float32, (NUMEL,))
        w.write_header()
        for name, t in tensors():
            w.write(name, t)
        del t
    print(status("VmHWM") - before)
    # Second, so the first phase's (smaller) peak cannot hide this one's.
    before = status("VmRSS")
    torch.save(dict(tensors()), sys.argv[2])
    print(status("VmHWM") - before)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_file(tmp_path):
    # tmpfs keeps the 2 x 640 MiB off the disk (its page cache is not process RSS); else use tmp_path
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        (Path(tmp) / "a").mkdir()
        (Path(tmp) / "b").mkdir()
        ours, ref = Path(tmp) / "a" / "pytorch_adapter.bin", Path(tmp) / "b" / "pytorch_adapter.bin"
        lines = run_script(_MEMORY_SCRIPT, str(ours), str(ref), timeout=120)
        streamed, saved = map(int, lines)
        assert streamed < 100 << 20, f"streaming peak RSS grew by {streamed >> 20} MiB"
        assert saved > 600 << 20, f"torch.save peak RSS grew by only {saved >> 20} MiB"
        assert ours.stat().st_size == ref.stat().st_size > 640 << 20
        with open(ours, "rb") as fa, open(ref, "rb") as fb:  # byte-identical, compared in chunks
            while chunk := fa.read(64 << 20):
                assert chunk == fb.read(64 << 20)
            assert fb.read(1) == b""
        loaded = torch.load(ours, weights_only=True, mmap=True)
        assert list(loaded) == [f"layer.{i}.weight" for i in range(40)]
        assert all(loaded[f"layer.{i}.weight"][::999_999].eq(i).all() for i in (0, 17, 39))


def test_owned_tensors_are_not_copied_views_are():
    t = torch.randn(10)
    assert bin_module._compact(t).data_ptr() == t.data_ptr()
    assert bin_module._compact(t[2:]).data_ptr() != t.data_ptr()
