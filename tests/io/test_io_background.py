"""BackgroundWriter: the same bytes as the writer alone, and every error of the worker thread reaches the caller
(with the partial file deleted)."""

import threading

import pytest
import torch

from lora_migrate.io import BackgroundWriter, BinWriter, OutOfSpace, SafetensorsWriter

WRITERS = [SafetensorsWriter, BinWriter]


def tensors(n=12):
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64, 3 + i, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(n)}


def write(w, d, names=None):
    with w:
        for k, t in d.items():
            w.add(k, t.dtype, t.shape)
        w.write_header()
        for k in names or d:
            w.write(k, d[k])


@pytest.mark.parametrize("writer", WRITERS)
def test_same_bytes_as_the_writer_alone(tmp_path, writer):
    d = tensors()
    for sub in ("direct", "threaded"):  # the same file name: a .bin names its zip folder after it
        (tmp_path / sub).mkdir()
    write(writer(tmp_path / "direct" / "w"), d)
    write(BackgroundWriter(writer(tmp_path / "threaded" / "w"), depth=2), d)
    assert (tmp_path / "threaded" / "w").read_bytes() == (tmp_path / "direct" / "w").read_bytes()
    assert not [t for t in threading.enumerate() if t.name == "lora-migrate-writer"]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_in_the_thread_is_raised_and_the_file_deleted(tmp_path, writer, monkeypatch):
    monkeypatch.setenv("LORA_MIGRATE_FAULT", "enospc:write:3")
    with pytest.raises(OutOfSpace, match="no space left on device"):
        write(BackgroundWriter(writer(tmp_path / "out")), tensors())
    assert not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name == "lora-migrate-writer"]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_tensor_off_the_plan_is_refused(tmp_path, writer):
    d = tensors()
    names = list(d)
    names[4], names[5] = names[5], names[4]
    with pytest.raises(ValueError, match="the plan expects 't4' next"):
        write(BackgroundWriter(writer(tmp_path / "out")), d, names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_an_error_of_the_caller_aborts(tmp_path, writer):
    d = tensors()
    w = BackgroundWriter(writer(tmp_path / "out"))
    with pytest.raises(KeyError):
        with w:
            for k, t in d.items():
                w.add(k, t.dtype, t.shape)
            w.write_header()
            w.write("t0", d["t0"])
            raise KeyError("stop")
    assert not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name == "lora-migrate-writer"]
