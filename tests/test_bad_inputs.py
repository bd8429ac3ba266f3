"""Every bad input the CLI handles, end to end: one line on stderr, the exit code, nothing written, input intact.

``CASES`` is the single list of them; ``scripts/gen_bad_input_table.py`` runs the same list through the CLI and
writes docs/bad-inputs.md, and :func:`test_bad_inputs_doc_is_current` fails when that file is out of date.
A case builds its input under a fresh folder and returns the CLI arguments; ``{src}`` and ``{out}`` in messages
stand for the paths.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_migrate.cli import main

from .builders import make_adapter, snapshot, tensors

TO = ["--to", "adapters-1.0"]
ST = dict(version="adapters.1.3.0", file="adapter.safetensors")


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as the table in docs/bad-inputs.md names it
    build: Callable[[Path], list]  # folder → CLI arguments (after "convert" when they start with a path)
    expect: str  # a fragment of the one-line message
    code: int = 2


# ------------------------------------------------------------------------------------------------ builders


def _conv(src, out, *more):
    return ["convert", src, out, *TO, *more]


def _st_adapter(d: Path, sd=None, **kw) -> Path:
    return make_adapter(d / "src", sd=sd, **{**ST, **kw})


def _rewrite_header(path: Path, edit) -> None:
    """Parse a safetensors file's header, let ``edit`` change the dict, write it back with the data unchanged."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _st_case(edit=None, raw=None):
    """A valid adapters-1.1 safetensors adapter, then its header edited (``edit``) or its bytes replaced (``raw``)."""

    def build(d: Path):
        src = _st_adapter(d)
        f = src / "adapter.safetensors"
        if edit is not None:
            _rewrite_header(f, edit)
        if raw is not None:
            f.write_bytes(raw(f.read_bytes()))
        return _conv(src, d / "out")

    return build


def _first(h):
    return h[next(k for k in h if k != "__metadata__")]


def _set(field, value, which=_first):
    def edit(h):
        which(h)[field] = value
    return edit


def _overlap(h):
    keys = [k for k in h if k != "__metadata__"]
    a, b = [k for k in keys if h[k]["shape"] == h[keys[0]]["shape"]][:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _config_case(change=None, text=None, drop=None):
    def build(d: Path):
        src = make_adapter(d / "src")
        p = src / "adapter_config.json"
        if text is not None:
            p.write_text(text)
        else:
            cfg = json.loads(p.read_text())
            if drop:
                del cfg["config"][drop]
            cfg["config"].update(change or {})
            p.write_text(json.dumps(cfg))
        return _conv(src, d / "out")

    return build


def _sd_case(mutate, **kw):
    def build(d: Path):
        sd = tensors()
        mutate(sd)
        return _conv(make_adapter(d / "src", sd=sd, **kw), d / "out")

    return build


def _key(m=0, p="A", name="m1"):
    mods = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v"]
    return f"{mods[m]}.loras.{name}.lora_{p}"


class _Payload:
    """A pickle that would create a file when unpickled by a trusting loader."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickle_payload(d: Path):
    src = make_adapter(d / "src")
    torch.save({**tensors(), "x": _Payload(d / "pwned")}, src / "pytorch_adapter.bin")
    return _conv(src, d / "out")


def _truncated_bin(keep: float):
    def build(d: Path):
        src = make_adapter(d / "src")
        p = src / "pytorch_adapter.bin"
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
        return _conv(src, d / "out")
    return build


def _escaping_name(name):
    def build(d: Path):
        make_adapter(d / "src" / "a", name=name, sd=tensors(name))
        make_adapter(d / "src" / "b", name="ok", sd=tensors("ok"))
        return _conv(d / "src", d / "out")
    return build


def _dup_adapters(d: Path) -> Path:
    make_adapter(d / "src" / "a", name="m1")
    make_adapter(d / "src" / "b", name="m1", sd=tensors("m1", seed=5))
    return d / "src"


def _nonfinite(value):
    def mutate(sd):
        sd[_key(1, "B")][2, 1] = value
    return _sd_case(mutate)


def _existing_output(d: Path):
    src = make_adapter(d / "src")
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine")
    return _conv(src, d / "out")


def _enospc(d: Path):
    os.environ["LORA_MIGRATE_FAULT"] = "enospc:write:2"
    return _conv(make_adapter(d / "src"), d / "out")


_GGUF = Path(__file__).resolve().parents[1] / "golden" / "gguf" / "llamacpp"


def _gguf(name: str, edit=lambda b: b):
    """A llama.cpp GGUF from the goldens copied into the case folder (bytes edited), as SRC of --to peft."""
    def build(d: Path):
        src = d / "src.gguf"
        src.write_bytes(edit((_GGUF / name).read_bytes()))
        return ["convert", src, d / "out", "--to", "peft"]
    return build


def _to_gguf(*more, out="out.gguf"):
    def build(d: Path):
        import shutil
        shutil.copytree(_GGUF / "llama_plain" / "adapter", d / "src")
        return ["convert", d / "src", d / out, "--to", "gguf", *more]
    return build


CASES: list[Case] = [
    # safetensors headers
    Case("st_truncated", "safetensors file cut short (interrupted download)",
         _st_case(raw=lambda b: b[: len(b) - 100]), "not a valid safetensors file: tensor data needs"),
    Case("st_header_len_past_eof", "safetensors header length beyond the file",
         _st_case(raw=lambda b: struct.pack("<Q", len(b) * 2) + b[8:]), "runs past the end of the file"),
    Case("st_lying_offsets", "safetensors data_offsets that lie (wrong size)",
         _st_case(_set("data_offsets", [0, 4])), "invalid shape, data type, or offset"),
    Case("st_overlap", "safetensors tensors with overlapping byte ranges", _st_case(_overlap), "overlaps the tensor before it"),
    Case("st_huge_shape", "safetensors huge shape", _st_case(_set("shape", [2**62, 2**62])), "overflow"),
    Case("st_negative_shape", "safetensors negative shape", _st_case(_set("shape", [-4, 16])), "invalid value: integer `-4`"),
    Case("st_unknown_dtype", "safetensors unknown dtype", _st_case(_set("dtype", "F33")), "unknown variant `F33`"),
    Case("st_not_utf8", "safetensors header not UTF-8",
         _st_case(raw=lambda b: b[:8] + b"\xff" + b[9:]), "invalid UTF-8 in header"),
    Case("st_not_json", "safetensors header not JSON",
         _st_case(raw=lambda b: b[:8] + b"[" + b[9:]), "invalid JSON in header"),
    Case("st_empty", "empty weights file", _st_case(raw=lambda b: b""), "file is empty"),
    # .bin
    Case("bin_truncated", "pytorch_adapter.bin cut short (half)", _truncated_bin(0.5),
         "not a readable PyTorch checkpoint (truncated or corrupt?)"),
    Case("bin_truncated_late", "pytorch_adapter.bin cut short (last bytes missing)", _truncated_bin(0.97),
         "the file is cut short"),
    Case("bin_pickle_payload", "pytorch_adapter.bin carrying a pickle payload (would create a file)",
         _pickle_payload, "refused: the pickle holds something other than tensors"),
    # adapter_config.json
    Case("cfg_not_json", "adapter_config.json not valid JSON", _config_case(text="{not json"), "not valid JSON"),
    Case("cfg_not_object", "adapter_config.json not an object", _config_case(text="[1]"), "expected a JSON object"),
    Case("cfg_wrong_type", "config field of the wrong type (r: \"eight\")", _config_case({"r": "eight"}),
         "config: r: Input should be a valid integer"),
    Case("cfg_missing_field", "config field missing (r)", _config_case(drop="r"), "config: r: Field required"),
    Case("cfg_unknown_field", "config field unknown to the convention", _config_case({"foo": 1}),
         "unknown field for this convention"),
    Case("cfg_alpha_zero", "alpha ≤ 0", _config_case({"alpha": 0}), "config: alpha: Input should be greater than 0"),
    Case("cfg_alpha_nan", "alpha NaN", _config_case(text=None, change={"alpha": float("nan")}),
         "config: alpha: Input should be a finite number"),
    Case("cfg_r_zero", "r = 0", _config_case({"r": 0}), "config: r: Input should be greater than 0"),
    # key sets and shapes
    Case("keys_unclaimed", "keys no schema claims",
         _sd_case(lambda sd: sd.update({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(12, 16)})),
         "keys no AdapterHub LoRA template claims"),
    Case("keys_a_without_b", "lora_A without lora_B", _sd_case(lambda sd: sd.pop(_key(0, "B"))), "has no b tensor"),
    Case("keys_rank_mismatch", "rank of A and B disagree",
         _sd_case(lambda sd: sd.update({_key(0, "B"): torch.zeros(12, 3)})), "lora_B"),
    Case("keys_shape_vs_config", "shapes that contradict the config (r=8, tensors r=4)",
         _config_case({"r": 8}), "contradict the config's r=8"),
    Case("keys_two_adapters", "two adapters in one save_adapter file",
         _sd_case(lambda sd: sd.update(tensors("m2"))), "adapters ['m2'] besides 'm1'"),
    Case("keys_duplicate_adapters", "two adapter folders holding adapters of the same name",
         lambda d: _conv(_dup_adapters(d), d / "out"), "two adapter folders hold adapters of the same name"),
    # names and paths
    Case("name_dotdot", "adapter name that would escape the output folder (../x)", _escaping_name("../x"),
         "name: adapter name '../x' is not a plain folder name"),
    Case("name_absolute", "adapter name that is an absolute path (/tmp/x)", _escaping_name("/tmp/x"),
         "name: adapter name '/tmp/x' is not a plain folder name"),
    Case("name_nul", "adapter name holding NUL", _escaping_name("a\0b"),
         "name: adapter name 'a\\x00b' is not a plain folder name"),
    # values
    Case("value_nan", "NaN in a tensor", _nonfinite(float("nan")),
         "module encoder.block.0.layer.0.SelfAttention.v: lora_B holds 1 NaN of 48 values"),
    Case("value_inf", "Inf in a tensor", _nonfinite(float("inf")), "lora_B holds 1 Inf of 48 values"),
    # output and file system
    Case("out_exists", "existing output without --overwrite", _existing_output, "already exists; pass --overwrite"),
    Case("out_is_src", "output = input", lambda d: _conv(make_adapter(d / "src"), d / "src"), "is the input"),
    Case("out_inside_src", "output inside the input", lambda d: _conv(make_adapter(d / "src"), d / "src" / "o"),
         "is inside the input"),
    Case("disk_full", "disk full while writing (ENOSPC)", _enospc, "no space left on device while writing"),
    # llama.cpp GGUF
    Case("gguf_truncated", "GGUF adapter cut short", _gguf("llama_plain/llamacpp-f32.gguf", lambda b: b[:3000]),
         "not a readable GGUF file"),
    Case("gguf_bad_version", "GGUF with an unknown version", _gguf("qwen2_plain/llamacpp-f32.gguf",
                                                                    lambda b: b[:4] + b"\x07\x07\x07\x07" + b[8:]),
         "not a readable GGUF file"),
    Case("gguf_no_heads", "Llama GGUF adapter without the base model's heads (q/k rows permuted)",
         _gguf("llama_plain/llamacpp-f32.gguf"), "pass --base-model"),
    Case("gguf_unknown_type", "PEFT → GGUF without the base model's type", _to_gguf(),
         "model_type, which is not known"),
    Case("gguf_out_suffix", "GGUF output not ending in .gguf", _to_gguf(out="out.bin"), "must end in .gguf"),
    Case("gguf_outtype", "unknown --outtype", _to_gguf("--outtype", "q4_0", "--model-type", "llama"),
         "--outtype 'q4_0'"),
    # usage
    Case("src_missing", "source does not exist", lambda d: _conv(d / "nope", d / "out"), "no such"),
    Case("to_unknown", "unknown target convention", lambda d: ["convert", make_adapter(d / "src"), d / "out",
                                                             "--to", "nonsense-9"], "nonsense-9"),
]


# ------------------------------------------------------------------------------------------------ running


def run_case(case: Case, d: Path) -> tuple[int, str, str, dict, dict]:
    """(exit code, stdout, stderr, folder before, folder after) for one case run through the CLI in-process."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        args = [str(a) for a in case.build(d)]
        before = snapshot(d)
        r = CliRunner().invoke(main, args)
    finally:
        os.environ.pop("LORA_MIGRATE_FAULT", None)
    return r.exit_code, r.stdout, r.stderr, before, snapshot(d)


def shown(stderr: str, d: Path) -> str:
    """The message as docs/bad-inputs.md shows it: paths relative to the case folder."""
    return stderr.strip().replace(str(d.resolve()) + "/", "").replace(str(d) + "/", "")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(tmp_path, case):
    d = tmp_path / "case"
    code, out, err, before, after = run_case(case, d)
    assert code == case.code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err and "internal error" not in err
    assert case.expect in err, err
    assert after == before  # nothing written, nothing changed, no temp folder left behind
    assert not (d / "pwned").exists()


def test_bad_inputs_doc_is_current():
    from scripts.gen_bad_input_table import DOC, render

    assert DOC.is_file() and DOC.read_text(encoding="utf-8") == render(), \
        "docs/bad-inputs.md is out of date: run .venv/bin/python scripts/gen_bad_input_table.py"


# ------------------------------------------------------------------------------------------------ fuzzing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_never_crash(tmp_path_factory, data):
    """Random byte edits of a valid adapter.safetensors: either a clean conversion (exit 0) or one line, exit 2,
    nothing written. Never a traceback, an internal error, or a partial output."""
    tmp = tmp_path_factory.mktemp("fuzz")
    src = make_adapter(tmp / "src", **ST)
    f = src / "adapter.safetensors"
    good = f.read_bytes()
    raw = bytearray(good)
    op = data.draw(st.sampled_from(["truncate", "flip", "header_flip", "splice"]))
    (n,) = struct.unpack("<Q", good[:8])
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif op == "header_flip":
        i = data.draw(st.integers(0, 8 + n - 1))
        raw[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(8, 8 + n))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    f.write_bytes(bytes(raw))
    _convert_ends_cleanly(src, tmp)


def test_bin_whose_zip64_locator_claims_several_disks_is_bad_input(tmp_path):
    """A damaged ZIP64 end-of-central-directory locator ("total disks" 2) makes zipfile.is_zipfile itself raise
    BadZipFile ("zipfiles that span multiple disks are not supported"); found by the fuzz test below: it was an
    internal error (exit 3), it is bad input (exit 2)."""
    src = make_adapter(tmp_path / "src")
    f = src / "pytorch_adapter.bin"
    raw = bytearray(f.read_bytes())
    at = raw.find(b"PK\x06\x07")  # the locator: signature, disk of the zip64 record, its offset, total disks
    assert at > 0
    raw[at + 16:at + 20] = (2).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    _convert_ends_cleanly(src, tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bin_never_crash(tmp_path_factory, data):
    """Random truncations and byte edits of a pytorch_adapter.bin (zip records, data.pkl, tensor data)."""
    tmp = tmp_path_factory.mktemp("fuzzbin")
    src = make_adapter(tmp / "src")
    f = src / "pytorch_adapter.bin"
    raw = bytearray(f.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    f.write_bytes(bytes(raw))
    _convert_ends_cleanly(src, tmp)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(
    st.sampled_from(["r", "alpha", "dropout", "attn_matrices", "selfattn_lora", "use_gating", "leave_out", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=4), st.lists(st.sampled_from(["q", "k", "v", 3]), max_size=3)),
    max_size=3))
def test_fuzzed_config_never_crash(tmp_path_factory, config):
    """adapter_config.json with random values in its fields: exit 0 or one line with exit 2, nothing written."""
    tmp = tmp_path_factory.mktemp("cfg")
    src = make_adapter(tmp / "src")
    p = src / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["config"].update(config)
    p.write_text(json.dumps(cfg))
    _convert_ends_cleanly(src, tmp)


def _convert_ends_cleanly(src: Path, tmp: Path) -> None:
    """convert exits 0, or 2 with one line and nothing written (no output, no temporary folder); never a crash."""
    out = tmp / "out"
    r = CliRunner().invoke(main, ["convert", str(src), str(out), *TO])
    assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
    assert "Traceback" not in r.output and "internal error" not in r.stderr, r.stderr
    if r.exit_code == 2:
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
        assert not [p for p in tmp.iterdir() if "lora-migrate-tmp" in p.name]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z0-9_]+", i) for i in ids)
