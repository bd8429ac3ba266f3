"""Lazy zip-format ``.bin`` reading: data.pkl unpickled onto meta storages by torch's weights-only unpickler,
each storage read on demand into fresh memory (no mmap) -- bitwise equal to torch.load, views shared, unusual
files left to torch.load, refusals unchanged, and peak memory about one tensor instead of the whole file."""

import os
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import BinWriter, TensorMeta, open_tensors
from lora_migrate.io import bin_reader
from tests.io.bitwise import bitwise_equal, edge_sample
from tests.io.memprobe import run_script



def is_lazy(tf):
    return isinstance(tf._tensors, bin_reader._LazyBinTensors)


def assert_same_as_torch_load(path, expected=None):
    ref = torch.load(path, weights_only=True)
    with open_tensors(path) as tf:
        assert is_lazy(tf), "fell back to torch.load"
        assert tf.format == "bin" and tf.keys() == list(ref)
        for k, r in ref.items():
            assert tf.meta(k) == TensorMeta(k, tuple(r.shape), r.dtype, r.numel() * r.element_size())
            got = tf.get(k)
            assert bitwise_equal(got, r.detach()), k
            assert got.stride() == r.stride() and got.storage_offset() == r.storage_offset(), k
            assert not got.requires_grad
            if expected is not None:
                assert bitwise_equal(got, expected[k].detach()), k


def write_with_bin_writer(path, d):
    with BinWriter(path) as w:
        for name, t in d.items():
            w.add(name, t.dtype, t.shape)
        w.write_header()
        for name, t in d.items():
            w.write(name, t)


@pytest.mark.parametrize("writer", ["torch.save", "BinWriter"])
def test_every_dtype_bitwise_equal_to_torch_load(tmp_path, writer):
    d = edge_sample()
    path = tmp_path / "pytorch_adapter.bin"
    if writer == "torch.save":
        torch.save(d, path)
    else:
        write_with_bin_writer(path, d)
    assert_same_as_torch_load(path, d)
    with open_tensors(path) as tf, open(path, "rb") as f:  # data found where torch's own zip reader finds it
        reader = torch._C.PyTorchFileReader(f)
        assert tf._tensors._spans == {
            key: (reader.get_record_offset(f"data/{key}"), reader.get_record_size(f"data/{key}"))
            for key in tf._tensors._spans
        }
        assert len(tf._tensors._spans) == len(d)


def test_non_ascii_path_archive_folder(tmp_path):
    """torch.save through a file object names the zip folder ``archive/``, not the file stem."""
    d = {"x": torch.randn(4, 4), "é": torch.arange(3)}
    path = tmp_path / "adaptér.bin"
    torch.save(d, path)
    with zipfile.ZipFile(path) as z:
        assert z.namelist()[0].startswith("archive/")
    assert_same_as_torch_load(path, d)


def test_views_share_one_storage_read_once(tmp_path):
    t = torch.arange(24.0).reshape(6, 4)
    d = {"a": t[:2], "b": t[2:], "T": t.T, "col": t[:, 1], "tail": t[4:].T, "other": torch.ones(3)}
    path = tmp_path / "views.bin"
    torch.save(d, path)
    assert_same_as_torch_load(path, d)
    with open_tensors(path) as tf:
        reads = []

        class CountingFile:
            def __init__(self, f):
                self.f = f

            def seek(self, pos):
                reads.append(pos)
                return self.f.seek(pos)

            def readinto(self, buf):
                return self.f.readinto(buf)

            def close(self):
                self.f.close()

        tf._tensors._file = CountingFile(tf._tensors._file)
        a, b, tt, col = tf.get("a"), tf.get("b"), tf.get("T"), tf.get("col")
        assert not tt.is_contiguous() and tt.stride() == (1, 4) and col.stride() == (4,)
        assert b.storage_offset() == 8
        ptr = a.untyped_storage().data_ptr()
        assert all(x.untyped_storage().data_ptr() == ptr for x in (b, tt, col))  # one storage, read once
        assert a.untyped_storage().nbytes() == 24 * 4
        assert len(reads) == 1
        other = tf.get("other")
        assert other.untyped_storage().data_ptr() != ptr and torch.equal(other, torch.ones(3))
        assert torch.equal(tf.get("tail"), t[4:].T) and len(reads) == 3  # re-read after another storage
    # returned tensors stay valid after the cache moved on and after close
    assert torch.equal(a, t[:2]) and torch.equal(b, t[2:]) and torch.equal(tt, t.T)


def test_parameters_and_state_dicts(tmp_path):
    """A module's state_dict (an OrderedDict with _metadata) and nn.Parameters read as plain tensors."""
    lin = torch.nn.Linear(5, 3)
    sd = lin.state_dict()
    sd["p"] = torch.nn.Parameter(torch.randn(2))
    path = tmp_path / "sd.bin"
    torch.save(sd, path)
    assert_same_as_torch_load(path)
    with open_tensors(path) as tf:
        assert type(tf.get("p")) is torch.Tensor and torch.equal(tf.get("weight"), lin.weight.detach())


def test_meta_and_keys_read_no_data(tmp_path, monkeypatch):
    d = edge_sample()
    path = tmp_path / "m.bin"
    torch.save(d, path)

    def no_reads(self, *a):
        raise AssertionError("data read")

    monkeypatch.setattr(bin_reader._LazyBinTensors, "_storage", no_reads)
    with open_tensors(path) as tf:
        assert is_lazy(tf) and tf.keys() == list(d) and len(tf) == len(d) and "empty" in tf
        for k, t in d.items():
            assert tf.meta(k) == TensorMeta(k, tuple(t.shape), t.dtype, t.numel() * t.element_size())


def test_reads_happen_at_get_and_close_releases_the_file(tmp_path):
    d = {"x": torch.zeros(1000), "y": torch.ones(10)}
    path = tmp_path / "late.bin"
    torch.save(d, path)
    tf = open_tensors(path)
    assert is_lazy(tf)
    fd = tf._tensors._file.fileno()
    os.truncate(path, 100)  # in place, after open: the read at get time notices
    with pytest.raises(LoraMigrateError, match=r"late\.bin: tensor 'x' is cut short"):
        tf.get("x")
    tf.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="closed"):
        tf.get("y")


def _rewrite_zip(src, dst, edit):
    """Copy a torch zip record by record (stored), letting ``edit(relative_name, data)`` change contents."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as b:
        for info in a.infolist():
            rel = info.filename.split("/", 1)[1]
            data = edit(rel, a.read(info))
            if data is not None:
                b.writestr(info.filename, data)


def test_big_endian_file_is_byteswapped_by_torch_load(tmp_path):
    d = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "i": torch.arange(4, dtype=torch.int64)}
    src, dst = tmp_path / "le.bin", tmp_path / "be.bin"
    torch.save(d, src)
    sizes = {"data/0": 4, "data/1": 2, "data/2": 8}

    def to_big(rel, data):
        if rel == "byteorder":
            return b"big"
        if rel in sizes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, sizes[rel]).flip(1).numpy().tobytes()
        return data

    _rewrite_zip(src, dst, to_big)
    for k, t in torch.load(dst, weights_only=True).items():
        assert bitwise_equal(t, d[k]), k  # torch byteswaps it
    with open_tensors(dst) as tf:
        assert not is_lazy(tf)  # never misread: left to torch.load
        for k, t in d.items():
            assert bitwise_equal(tf.get(k), t), k


def test_unknown_byteorder_and_missing_or_short_records(tmp_path):
    src = tmp_path / "src.bin"
    torch.save({"w": torch.randn(8), "v": torch.randn(2)}, src)
    cases = {
        "order.bin": (lambda rel, data: b"middle" if rel == "byteorder" else data, "Unknown endianness"),
        "missing.bin": (lambda rel, data: None if rel == "data/1" else data, "data/1"),
        "short.bin": (lambda rel, data: data[:-4] if rel == "data/0" else data, "data/0 holds 28 bytes"),
    }
    for name, (edit, match) in cases.items():
        path = tmp_path / name
        _rewrite_zip(src, path, edit)
        with pytest.raises(LoraMigrateError, match="not a readable PyTorch checkpoint.*" + match) as info:
            open_tensors(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_compressed_records_left_to_torch_load(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "deflated.bin"
    torch.save({"w": torch.arange(1000.0)}, src)
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert bin_reader._open_bin_lazy(dst) is None
    with pytest.raises(LoraMigrateError, match="not a readable PyTorch checkpoint"):  # as before: mmap fails
        open_tensors(dst)


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code execution."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.ones(2), "x": _Payload(target)}, path)
    assert bin_reader._open_bin_lazy(path) is None  # the weights-only unpickler refuses the global
    assert not target.exists()
    with pytest.raises(LoraMigrateError, match=r"refused: the pickle holds something other than tensors \(io\.open\)"):
        open_tensors(path)
    assert not target.exists()


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"a": {"b": torch.ones(1)}}, "'a' holds a nested dict"),
        ([torch.ones(1)], "expected a dict of tensors, found a list"),
        ({"a": 3, "b": torch.ones(2)}, "'a' holds a int value"),
        ({1: torch.ones(1)}, "expected string keys"),
    ],
)
def test_not_flat_dict_keeps_its_messages(tmp_path, obj, match):
    path = tmp_path / "x.bin"
    torch.save(obj, path)
    assert bin_reader._open_bin_lazy(path) is None
    with pytest.raises(LoraMigrateError, match=match):
        open_tensors(path)


@pytest.mark.filterwarnings("ignore:.*(quantiz|TypedStorage):UserWarning")
def test_sparse_and_quantized_tensors_left_to_torch_load(tmp_path):
    s = torch.eye(3).to_sparse()
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    for name, value in (("sparse", s), ("quant", q)):
        path = tmp_path / f"{name}.bin"
        torch.save({"t": value, "d": torch.ones(2)}, path)
        assert bin_reader._open_bin_lazy(path) is None
        with open_tensors(path) as tf:  # torch.load's result, as before
            assert tf.get("t").layout == value.layout and torch.equal(tf.get("d"), torch.ones(2))
    assert not torch._utils._sparse_tensors_to_validate  # no meta tensors left behind for torch.load


class _FutureUnpickler:
    """An unpickler whose interface changed."""

    def __init__(self, file):
        pass


@pytest.mark.parametrize("module", [None, type(sys)("fake", "no Unpickler"), type(sys)("fake", "other API")])
def test_without_torchs_private_unpickler_falls_back(tmp_path, monkeypatch, module):
    d = edge_sample()
    path = tmp_path / "f.bin"
    torch.save(d, path)
    if module is not None and module.__doc__ == "other API":
        module.Unpickler = _FutureUnpickler
    # only what ``from torch._weights_only_unpickler import Unpickler`` finds; torch.load keeps its own reference
    monkeypatch.setitem(sys.modules, "torch._weights_only_unpickler", module)
    with open_tensors(path) as tf:
        assert not is_lazy(tf)
        assert all(bitwise_equal(tf.get(k), t) for k, t in d.items())


def test_legacy_non_zip_file_still_loads_whole(tmp_path):
    d = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "s": torch.tensor(3), "e": torch.zeros(0)}
    path = tmp_path / "legacy.bin"
    torch.save(d, path, _use_new_zipfile_serialization=False)
    with open_tensors(path) as tf:
        assert not is_lazy(tf)
        assert all(bitwise_equal(tf.get(k), t) for k, t in d.items())


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lora_migrate.io import BinWriter, open_tensors
    from lora_migrate.io import bin_reader
    from tests.io.memprobe import reset_peak, status

    N, NUMEL = 38, 4 << 20  # 38 float32 tensors of 16 MiB: 608 MiB

    with BinWriter(sys.argv[1]) as w:
        for i in range(N):
            w.add(f"layer.{i}.weight", torch.float32, (NUMEL,))
        w.write_header()
        for i in range(N):
            w.write(f"layer.{i}.weight", torch.full((NUMEL,), float(i)))
    torch.full((NUMEL,), 0.0).sum()  # warm up allocator and kernels

    def read_all():
        with open_tensors(sys.argv[1]) as tf:
            lazy = isinstance(tf._tensors, bin_reader._LazyBinTensors)
            before = reset_peak()
            for i, key in enumerate(tf.keys()):
                t = tf.get(key)
                assert bool(t.eq(i).all()), key  # touches every byte
                del t
            return lazy, status("VmHWM") - before

    lazy, grown = read_all()
    print(int(lazy), grown)
    bin_reader._open_bin_lazy = lambda path: None  # the torch.load(mmap=True) path, for comparison
    lazy, grown = read_all()
    print(int(lazy), grown)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_is_about_one_tensor(tmp_path):
    # tmpfs keeps the file off the disk; its page cache is not process RSS unless mapped (which mmap does)
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        path = Path(tmp) / "pytorch_model.bin"
        lines = run_script(_MEMORY_SCRIPT, str(path))
        (lazy, grown), (mmapped_lazy, mmapped) = (map(int, line.split()) for line in lines[:2])
        assert lazy == 1 and mmapped_lazy == 0
        assert grown < 100 << 20, f"lazy .bin reading grew peak RSS by {grown >> 20} MiB"
        assert mmapped > 500 << 20, f"the mmap path grew peak RSS by only {mmapped >> 20} MiB"
