"""SafetensorsWriter: bitwise round trips for every dtype, byte identity with save_file, plan enforcement."""

import errno
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import OutOfSpace, SafetensorsWriter, open_tensors, safetensors_order
from lora_migrate.io import safetensors_writer as writer_module
from lora_migrate.io._common import BY_TORCH
from tests.io.bitwise import bits, bitwise_equal, random_tensor  # noqa: F401

ALL_DTYPES = sorted(BY_TORCH, key=str)



def write_all(path, tensors, metadata=None, order=None):
    with SafetensorsWriter(path, metadata) as w:
        for name in order or tensors:
            w.add(name, tensors[name].dtype, tensors[name].shape)
        w.write_header()
        for name in order or tensors:
            w.write(name, tensors[name])


def sample_all_dtypes():
    gen = torch.Generator().manual_seed(0)
    d = {f"t.{str(dt).split('.')[-1]}": random_tensor(dt, (3, 4), gen) for dt in ALL_DTYPES}
    d["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    d["empty"] = torch.zeros(0, 5, dtype=torch.float16)
    d["big_endian_guard"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    return d


def test_every_dtype_round_trips_bitwise(tmp_path):
    d = sample_all_dtypes()
    assert {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2} <= set(ALL_DTYPES)
    path = tmp_path / "out.safetensors"
    write_all(path, d, metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(d) and f.metadata() == {"format": "pt"}
        for k, t in d.items():
            got = f.get_tensor(k)
            assert bitwise_equal(got, t), k  # bitwise: random bits include NaNs, where torch.equal is False
    with open_tensors(path) as tf:
        assert tf.keys() == list(d)  # plan order is file order
        for k, t in d.items():
            assert tf.meta(k).shape == tuple(t.shape) and tf.meta(k).dtype == t.dtype
            assert tf.meta(k).nbytes == t.numel() * t.element_size()


def test_finite_values_torch_equal(tmp_path):
    d = {str(dt): torch.arange(-3, 5).reshape(2, 4).to(dt) for dt in ALL_DTYPES if dt != torch.float4_e2m1fn_x2}
    path = tmp_path / "out.safetensors"
    write_all(path, d)
    with safe_open(str(path), framework="pt") as f:
        for k, t in d.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), k
            if t.dtype not in (torch.float8_e8m0fnu,):
                assert torch.equal(got, t), k


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_bytes_identical_to_save_file(tmp_path, metadata):
    d = sample_all_dtypes()
    d["ünïcode \"quoted\" \\ \n\t\x01 name"] = torch.ones(2)
    d[""] = torch.ones(1, dtype=torch.int8)
    reference = tmp_path / "ref.safetensors"
    save_file(d, reference, metadata=metadata)
    ours = tmp_path / "ours.safetensors"
    write_all(ours, d, metadata, order=safetensors_order((k, t.dtype) for k, t in d.items()))
    assert ours.read_bytes() == reference.read_bytes()


def test_write_behind_starts_disk_writes_and_changes_no_byte(tmp_path, monkeypatch):
    from lora_migrate.io import _common

    ranges = []
    monkeypatch.setattr(_common.WriteBehind, "EVERY", 8)
    real = _common.libc_function

    def recording(name, argtypes, restype):
        fn = real(name, argtypes, restype)
        if name != "sync_file_range" or fn is None:
            return fn
        return lambda fd, start, n, flags: (ranges.append((start, n)), fn(fd, start, n, flags))[1]

    monkeypatch.setattr(_common, "libc_function", recording)
    test_bytes_identical_to_save_file(tmp_path, {"format": "pt"})
    if not hasattr(_common.libc(), "sync_file_range"):
        pytest.skip("no sync_file_range here")
    size = (tmp_path / "ours.safetensors").stat().st_size
    assert ranges and ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert size - 8 < ranges[-1][0] + ranges[-1][1] <= size  # every range handed over, the last tensor included


def _split(raw):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_multi_key_metadata_same_content(tmp_path):
    """save_file serializes __metadata__ from a Rust HashMap: key order is random per call, so only content
    (and every byte outside that object) can match; our writer keeps the caller's dict order."""
    d = {"a": torch.randn(3), "b": torch.randn(2, 2).half()}
    metadata = {f"key{i}": f"value{i}" for i in range(6)}
    orders = {bytes(save(d, metadata=metadata)) for _ in range(10)}
    assert len({len(o) for o in orders}) == 1  # same length, same data, only the metadata order moves
    ours = tmp_path / "ours.safetensors"
    write_all(ours, d, metadata, order=safetensors_order((k, t.dtype) for k, t in d.items()))
    raw = ours.read_bytes()
    ref = orders.pop()
    assert len(raw) == len(ref)
    (h1, data1), (h2, data2) = _split(raw), _split(ref)
    assert h1 == h2 and data1 == data2
    assert list(h1) == list(h2)  # tensor entries (and __metadata__ first) in the same order
    assert list(h1["__metadata__"]) == list(metadata)


def test_safetensors_order_matches_save_file():
    d = sample_all_dtypes()
    raw = bytes(save(d))
    header, _ = _split(raw)
    assert list(header) == safetensors_order((k, t.dtype) for k, t in d.items())


def test_non_contiguous_views_and_grad_tensors(tmp_path):
    base = torch.randn(6, 8)
    d = {"T": base.T, "slice": base[1:3, ::2], "grad": torch.randn(3, requires_grad=True), "conj": torch.randn(
        2, dtype=torch.complex64).conj(), "neg": torch.randn(2, dtype=torch.complex64).conj().imag}
    path = tmp_path / "v.safetensors"
    write_all(path, d)
    with safe_open(str(path), framework="pt") as f:
        for k, t in d.items():
            assert torch.equal(f.get_tensor(k), t.detach().resolve_conj().resolve_neg().contiguous()), k


def test_plan_is_enforced(tmp_path):
    path = tmp_path / "p.safetensors"
    w = SafetensorsWriter(path)
    w.add("a", torch.float32, (2,))
    w.add("b", torch.int8, [3])
    for bad in [("a", torch.float32, (2,)), ("__metadata__", torch.float32, ()), ("c", torch.float32, (-1,)),
                ("c", torch.float32, (2.0,)), ("c", torch.quint8, (1,)), ("\ud800", torch.float32, (1,))]:
        with pytest.raises(ValueError):
            w.add(*bad)
    with pytest.raises(ValueError, match="before write_header"):
        w.write("a", torch.zeros(2))
    w.write_header()
    with pytest.raises(ValueError, match="after write_header"):
        w.add("c", torch.float32, (1,))
    with pytest.raises(ValueError, match="expects 'a' next"):
        w.write("b", torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(1, 2))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="unwritten"):
        w.close()
    assert not path.exists()  # incomplete file deleted


def test_bad_metadata_rejected(tmp_path):
    for metadata in ({"a": 1}, {1: "a"}, ["a"]):
        with pytest.raises(ValueError):
            SafetensorsWriter(tmp_path / "x.safetensors", metadata)


def test_context_manager_deletes_partial_file(tmp_path):
    path = tmp_path / "p.safetensors"
    with pytest.raises(KeyError):
        with SafetensorsWriter(path) as w:
            w.add("a", torch.float32, (2,))
            w.write_header()
            assert path.exists()
            raise KeyError("boom")
    assert not path.exists()
    with pytest.raises(ValueError, match="unwritten"):
        with SafetensorsWriter(path) as w:
            w.add("a", torch.float32, (2,))
            w.write_header()
    assert not path.exists()


def test_empty_file(tmp_path):
    path = tmp_path / "e.safetensors"
    with SafetensorsWriter(path) as w:
        w.write_header()
    save_file({}, tmp_path / "ref.safetensors")
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with open_tensors(path) as tf:
        assert tf.keys() == []


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are used."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_is_one_line_error_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "open", lambda p, m: _FullDisk(open(p, m), 100), raising=False)
    path = tmp_path / "full.safetensors"
    with pytest.raises(OutOfSpace, match=f"^no space left on device while writing {path}$"):
        write_all(path, {"a": torch.zeros(1000)})
    assert isinstance(OutOfSpace("x"), LoraMigrateError)
    assert not path.exists()


NAME = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).filter(lambda s: s != "__metadata__")
SPEC = st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 4), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.dictionaries(NAME, SPEC, max_size=6),
    sorted_plan=st.booleans(),
    metadata=st.one_of(st.none(), st.dictionaries(NAME, NAME, max_size=1)),
    seed=st.integers(0, 2**31),
)
def test_property_round_trip(specs, sorted_plan, metadata, seed):
    gen = torch.Generator().manual_seed(seed)
    d = {}
    for name, (dtype, shape) in specs.items():
        if dtype == torch.float4_e2m1fn_x2 and not shape:
            shape = [1]
        d[name] = random_tensor(dtype, tuple(shape), gen)
    order = safetensors_order((k, t.dtype) for k, t in d.items()) if sorted_plan else list(d)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.safetensors"
        write_all(path, d, metadata, order=order)
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == set(d)
            assert f.metadata() == metadata or (not metadata and not f.metadata())
            for k, t in d.items():
                assert bitwise_equal(f.get_tensor(k), t), k
        with open_tensors(path) as tf:
            assert tf.keys() == order
            for k, t in d.items():
                assert bitwise_equal(tf.get(k), t), k
        if sorted_plan and (d or metadata != {}):  # see test_no_tensors_empty_metadata_save_file_bug
            assert path.read_bytes() == bytes(save(d, metadata=metadata))


def test_no_tensors_empty_metadata_save_file_bug(tmp_path):
    """The one case where save_file's bytes are not the reference: no tensors and ``metadata={}``.

    safetensors (0.8.0, same code on main) sizes the JSON map as ``len(tensors) + len(metadata)`` = 0, and
    serde_json then emits ``{},"__metadata__":{}}`` -- invalid JSON that safe_open itself rejects. We write
    ``{"__metadata__":{}}``.
    """
    broken = bytes(save({}, metadata={}))
    assert broken[8:].rstrip() == b'{},"__metadata__":{}}'
    (tmp_path / "broken.safetensors").write_bytes(broken)
    with pytest.raises(LoraMigrateError, match="invalid JSON"):
        open_tensors(tmp_path / "broken.safetensors")
    path = tmp_path / "ours.safetensors"
    write_all(path, {}, metadata={})
    assert path.read_bytes()[8:].rstrip() == b'{"__metadata__":{}}'
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {} and list(f.keys()) == []
