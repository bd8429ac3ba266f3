"""TensorFile.stream: a tensor's bytes in pieces through one reused buffer, equal to what get() holds, and a digest
of the pieces equal to the digest of the tensor (the write check's read-back relies on both)."""

import pytest
import torch
from safetensors.torch import save_file

from lora_migrate.io import open_tensors
from lora_migrate.io import bin_reader
from lora_migrate.check.written import stream_digest, tensor_digest
from tests.io.bitwise import SAVE_DTYPES, bits, random_tensor


def sample(dtypes):
    gen = torch.Generator().manual_seed(3)
    d = {f"t.{str(dt).split('.')[-1]}": random_tensor(dt, (7, 5), gen) for dt in dtypes}  # odd byte counts
    d["big"] = random_tensor(torch.bfloat16, (1000, 9), gen)  # several pieces at a small chunk size
    d["scalar"] = torch.tensor(-2.5, dtype=torch.bfloat16)
    d["empty"] = torch.zeros(0, 5, dtype=torch.float16)
    return d


def check_stream(path, chunk, whole=()):
    """``whole``: tensors that come as one piece from get() (not one span of the file)."""
    with open_tensors(path) as tf:
        for k in tf.keys():
            want = bits(tf.get(k)).numpy().tobytes()
            pieces = [p.tobytes() for p in tf.stream(k, chunk=chunk)]
            assert b"".join(pieces) == want, k
            assert all(len(p) % 8 == 0 for p in pieces[:-1])
            assert len(pieces) == 1 if k in whole else all(len(p) <= max(chunk, 8) for p in pieces), k
            m = tf.meta(k)
            assert stream_digest(m.dtype, m.shape, tf.stream(k, chunk=chunk)) == tensor_digest(tf.get(k)), k


@pytest.mark.parametrize("chunk", [8, 64, 1000, 1 << 22])
def test_safetensors_stream_equals_get(tmp_path, chunk):
    dtypes = [dt for dt in SAVE_DTYPES if dt not in (torch.complex128, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
              and not str(dt).startswith("torch.complex")]
    path = tmp_path / "a.safetensors"
    save_file(sample(dtypes), path)
    check_stream(path, chunk)


@pytest.mark.parametrize("chunk", [8, 64, 1000, 1 << 22])
def test_bin_stream_equals_get_views_included(tmp_path, chunk):
    d = sample(SAVE_DTYPES)
    t = torch.arange(24.0).reshape(6, 4)
    d.update({"view.a": t[:2], "view.T": t.T, "view.col": t[:, 1], "whole": torch.arange(10.0)})
    path = tmp_path / "a.bin"
    torch.save(d, path)
    with open_tensors(path) as tf:
        assert isinstance(tf._tensors, bin_reader._LazyBinTensors)
        assert tf._tensors.span("whole") is not None and tf._tensors.span("view.a") is None
    check_stream(path, chunk, whole=("view.a", "view.T", "view.col"))


def test_a_cut_short_file_says_so(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.randn(1000)}, path)
    with open_tensors(path) as tf:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 10)
        with pytest.raises(Exception, match="cut short"):
            list(tf.stream("x", chunk=1024))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_memory_of_dropped_tensors_is_reused_and_never_of_live_ones(tmp_path, fmt):
    d = {f"t{i}": torch.full((256, 64), float(i)) for i in range(6)}
    path = tmp_path / f"a.{fmt}"
    save_file(d, path) if fmt == "safetensors" else torch.save(d, path)
    with open_tensors(path) as tf:
        t0 = tf.get("t0")
        ptr = t0.data_ptr()
        t1 = tf.get("t1")
        assert t1.data_ptr() != ptr  # t0 is alive
        view, arr = t1[3:], t1.numpy()
        del t0
        t2 = tf.get("t2")
        assert t2.data_ptr() == ptr and torch.equal(t2, d["t2"])  # t0's memory, overwritten with t2
        del t1
        t3 = tf.get("t3")  # t1 lives on in a view and a numpy array
        assert t3.data_ptr() not in (ptr, view.data_ptr() - view.storage_offset() * 4)
        assert torch.equal(view, d["t1"][3:]) and (arr == 1.0).all()
        del view, arr, t2, t3
        for k in ("t4", "t5", "t0"):
            assert torch.equal(tf.get(k), d[k])
