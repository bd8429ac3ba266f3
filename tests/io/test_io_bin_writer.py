"""save_bin: weights_only-loadable, and views do not drag their whole storage into the file."""

import pytest
import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import OutOfSpace, open_tensors, save_bin
from lora_migrate.io import bin_writer as bin_module


def test_round_trip_weights_only(tmp_path):
    d = {
        "a": torch.randn(4, 8),
        "b": torch.randn(3, dtype=torch.float64).to(torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "grad": torch.randn(2, requires_grad=True),
        "fp8": torch.randn(5).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3),
    }
    path = tmp_path / "adapter_model.bin"
    save_bin(path, d)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(d)
    for k, t in d.items():
        assert type(loaded[k]) is torch.Tensor and loaded[k].dtype == t.dtype
        assert torch.equal(loaded[k].reshape(-1).view(torch.uint8), t.detach().reshape(-1).view(torch.uint8)), k
    with open_tensors(path) as tf:
        assert tf.keys() == list(d)


def test_views_are_compacted(tmp_path):
    big = torch.randn(1000, 1000)  # 4 MB storage
    d = {"row": big[3], "col": big[:, 7], "block": big[10:12, 20:24].T}
    path = tmp_path / "v.bin"
    save_bin(path, d)
    assert path.stat().st_size < 64_000
    loaded = torch.load(path, weights_only=True)
    for k, t in d.items():
        assert torch.equal(loaded[k], t) and loaded[k].is_contiguous()
    assert d["row"].untyped_storage().data_ptr() == big.untyped_storage().data_ptr()  # inputs untouched


def test_owned_tensors_not_copied():
    t = torch.randn(10)
    assert bin_module._compact(t).data_ptr() == t.data_ptr()
    assert bin_module._compact(t[2:]).data_ptr() != t.data_ptr()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError):
        save_bin(tmp_path / "x.bin", {"a": 1})
    with pytest.raises(ValueError):
        save_bin(tmp_path / "x.bin", [torch.ones(1)])


def test_disk_full(tmp_path, monkeypatch):
    import errno

    def full_save(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bin_module.torch, "save", full_save)
    path = tmp_path / "x.bin"
    with pytest.raises(OutOfSpace, match=f"^no space left on device while writing {path}$"):
        save_bin(path, {"a": torch.ones(1)})
    assert not path.exists()


def test_unwritable(tmp_path):
    with pytest.raises(LoraMigrateError, match="cannot write"):
        save_bin(tmp_path / "missing-dir" / "x.bin", {"a": torch.ones(1)})
