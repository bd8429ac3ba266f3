"""open_tensors: valid files read lazily; every malformed input is a one-line LoraMigrateError naming the file."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io import TensorMeta, open_tensors


def raises_oneline(path, match=None):
    """Context: expect a LoraMigrateError whose single-line message names ``path``."""

    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(LoraMigrateError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            assert str(path) in msg, msg
            return handled

    return _Check()


def _sample():
    return {
        "b.lora_A.weight": torch.randn(4, 8),
        "a.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16),
        "alpha": torch.tensor(16.0, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


# ------------------------------------------------------------------------------------------- valid files


def test_safetensors_round_trip(tmp_path):
    d = _sample()
    path = tmp_path / "adapter_model.safetensors"
    save_file(d, path, metadata={"format": "pt"})
    with open_tensors(path) as tf:
        assert tf.format == "safetensors" and tf.path == path
        assert tf.metadata == {"format": "pt"}
        assert sorted(tf.keys()) == sorted(d)
        # file order = data order: save_file puts F64 first, then F32 by name, then BF16
        assert tf.keys() == ["alpha", "b.lora_A.weight", "empty", "a.lora_B.weight"]
        assert tf.meta("a.lora_B.weight") == TensorMeta("a.lora_B.weight", (8, 4), torch.bfloat16, 64)
        assert tf.meta("alpha") == TensorMeta("alpha", (), torch.float64, 8)
        assert tf.meta("empty").nbytes == 0
        got = {k: tf.get(k) for k in tf.keys()}
        assert "alpha" in tf and len(tf) == 4
        with pytest.raises(KeyError):
            tf.meta("nope")
    for k, t in d.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)  # still valid after close
    with pytest.raises(ValueError):
        tf.get("alpha")


def test_safetensors_without_metadata_and_unknown_suffix(tmp_path):
    path = tmp_path / "weights.data"
    save_file({"x": torch.arange(3)}, path)
    with open_tensors(path) as tf:
        assert tf.format == "safetensors" and tf.metadata is None
        assert torch.equal(tf.get("x"), torch.arange(3))


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_round_trip(tmp_path, legacy):
    d = _sample()
    path = tmp_path / "adapter_model.bin"
    torch.save(d, path, _use_new_zipfile_serialization=not legacy)
    with open_tensors(path) as tf:
        assert tf.format == "bin" and tf.metadata is None
        assert tf.keys() == list(d)  # pickle (insertion) order
        assert tf.meta("a.lora_B.weight") == TensorMeta("a.lora_B.weight", (8, 4), torch.bfloat16, 64)
        for k, t in d.items():
            assert tf.get(k).dtype == t.dtype and torch.equal(tf.get(k), t)


# ---------------------------------------------------------------------------------- malformed safetensors


def _st(path, header, data=b"", n=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_HEADERS = {
    "header_past_eof": (b"{}", b"", 1000, "runs past the end"),
    "header_over_limit": (b"{}", b"", 10**9, "header too large"),
    "header_u64_max": (b"{}", b"", 2**64 - 1, "header too large"),
    "not_utf8": (b'{"\xff\xfe":1}', b"", None, "invalid UTF-8"),
    "not_json": (b'{"a": ', b"", None, "invalid JSON"),
    "deep_json": (b"[" * 100_000, b"", None, "invalid JSON"),
    "nan_constant": (b'{"a": NaN}', b"", None, "invalid JSON"),
    "duplicate_key": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                      b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab", None, "data_offsets"),
    "not_object": (b"[1, 2]", b"", None, "invalid JSON"),
    "entry_not_object": ({"a": [1]}, b"", None, "invalid JSON"),
    "metadata_not_strings": ({"__metadata__": {"k": 1}}, b"", None, "expected a string"),
    "unknown_dtype": ({"a": {**F32x2, "dtype": "F33"}}, bytes(8), None, "unknown variant `F33`"),
    "dtype_not_string": ({"a": {**F32x2, "dtype": ["F32"]}}, bytes(8), None, "invalid JSON"),
    "f6_unsupported": ({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, bytes(3), None, "F6_E2M3"),
    "negative_dim": ({"a": {**F32x2, "shape": [-2]}}, bytes(8), None, "invalid value: integer `-2`"),
    "float_dim": ({"a": {**F32x2, "shape": [2.0]}}, bytes(8), None, "invalid type: floating point"),
    "bool_dim": ({"a": {**F32x2, "shape": [True, 2]}}, bytes(8), None, "invalid type: boolean"),
    "shape_not_list": ({"a": {**F32x2, "shape": 2}}, bytes(8), None, "expected a sequence"),
    "huge_shape": ({"a": {**F32x2, "shape": [2**62, 2**62]}}, bytes(8), None, "overflow"),
    "missing_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "missing field `data_offsets`"),
    "offsets_three": ({"a": {**F32x2, "data_offsets": [0, 4, 8]}}, bytes(8), None, "invalid length 3"),
    "offsets_negative": ({"a": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8), None, "invalid value: integer `-8`"),
    "offsets_reversed": ({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8), None, "end before"),
    "size_mismatch": ({"a": {**F32x2, "data_offsets": [0, 4]}}, bytes(4), None, "invalid shape, data type, or offset"),
    "overlap": ({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12), None, "overlaps"),
    "hole": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}},
             bytes(20), None, "hole"),
    "hole_at_start": ({"a": {**F32x2, "data_offsets": [4, 12]}}, bytes(12), None, "hole"),
    "data_out_of_file": ({"a": F32x2}, bytes(4), None, "truncated"),
    "trailing_bytes": ({"a": F32x2}, bytes(12), None, "trailing"),
    "f4_odd_last_dim": ({"a": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, bytes(3), None, "even"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_safetensors(tmp_path, case):
    header, data, n, reason = BAD_HEADERS[case]
    path = _st(tmp_path / "bad.safetensors", header, data, n)
    with raises_oneline(path, match="not a valid safetensors file") as info:
        open_tensors(path)
    assert reason in str(info.value)


def test_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_sample(), good)
    raw = good.read_bytes()
    for cut in (3, 8, 20, len(raw) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(raw[:cut])
        with raises_oneline(path, match="not a valid safetensors file"):
            open_tensors(path)


# -------------------------------------------------------------------------------------- other bad inputs


def test_missing_directory_empty(tmp_path):
    with raises_oneline(tmp_path / "nope.safetensors", match="no such file"):
        open_tensors(tmp_path / "nope.safetensors")
    with raises_oneline(tmp_path, match="is a directory"):
        open_tensors(tmp_path)
    for name in ("e.safetensors", "e.bin"):
        (tmp_path / name).write_bytes(b"")
        with raises_oneline(tmp_path / name, match="empty"):
            open_tensors(tmp_path / name)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_or_garbage_bin(tmp_path, legacy):
    good = tmp_path / "good.bin"
    torch.save(_sample(), good, _use_new_zipfile_serialization=not legacy)
    raw = good.read_bytes()
    for cut in (1, 30, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"cut{cut}.bin"
        path.write_bytes(raw[:cut])
        # A legacy pickle cut inside a global's name ("torch.") reads as a forbidden global: refused is fine too.
        with raises_oneline(path, match="not a readable PyTorch checkpoint" + ("|refused" if legacy else "")):
            open_tensors(path)
    (tmp_path / "garbage.bin").write_bytes(b"this is not a pickle at all")
    with raises_oneline(tmp_path / "garbage.bin", match="not a readable PyTorch checkpoint"):
        open_tensors(tmp_path / "garbage.bin")


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code execution."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_refused(tmp_path, legacy):
    target = tmp_path / "pwned"
    path = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.ones(2), "x": _Payload(target)}, path, _use_new_zipfile_serialization=not legacy)
    with raises_oneline(path, match=r"refused: the pickle holds something other than tensors.*weights_only=True"):
        open_tensors(path)
    assert not target.exists()
    # The payload is real: an unrestricted load would have run it.
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"a": {"b": torch.ones(1)}}, "'a' holds a nested dict"),
        ([torch.ones(1)], "expected a dict of tensors, found a list"),
        ({"a": 3}, "'a' holds a int value"),
        ({1: torch.ones(1)}, "expected string keys"),
    ],
)
def test_bin_not_flat_dict_of_tensors(tmp_path, obj, match):
    path = tmp_path / "x.bin"
    torch.save(obj, path)
    with raises_oneline(path, match=match):
        open_tensors(path)
