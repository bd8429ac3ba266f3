"""The AdapterHub codec's claim, read, write and read-back on adapters the real AdapterHub libraries wrote
(golden/at31, golden/ad13), without the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_migrate.codecs import PlanOptions
from lora_migrate.codecs.adapterhub import ADAPTERHUB
from lora_migrate.detect import open_source
from lora_migrate.errors import VerificationFailed
from lora_migrate.plan import plan_adapter
from lora_migrate.schemas import get_convention

from ...builders import assert_same_deltas, codec_write

GOLDEN = Path(__file__).resolve().parents[3] / "golden"
AT31 = GOLDEN / "at31" / "t5_qv" / "adapter"
AD13 = GOLDEN / "ad13" / "t5_qv" / "adapter"
PEFT = GOLDEN / "peft" / "pf21" / "llama_plain" / "adapter"


def test_claims_adapter_folders_files_and_folders_of_them(tmp_path):
    assert ADAPTERHUB.claim(AT31) is not None
    assert ADAPTERHUB.claim(AT31 / "adapter_config.json") is not None
    assert ADAPTERHUB.claim(tmp_path) is None
    for n in ("a", "b"):
        shutil.copytree(AT31, tmp_path / "two" / n)
    assert "folders" in ADAPTERHUB.claim(tmp_path / "two").why
    assert ADAPTERHUB.claim(PEFT).strength == 0  # only "has adapter_config.json": PEFT's claim wins


def test_read_version_and_typed_fields():
    s = ADAPTERHUB.open(AT31, None)
    try:
        a = s.adapters[0]
        assert a.convention.name == "adapter-transformers-3.1" and a.info.model_type == "t5"
        assert a.info.fan_in_fan_out is False and a.info.r is not None
        raw = json.loads((AT31 / "adapter_config.json").read_text())
        assert a.info.base_model == raw.get("model_name")
    finally:
        s.close()


def test_unknown_version_is_a_config_finding(tmp_path):
    shutil.copytree(AD13, tmp_path / "a")
    p = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(p.read_text())
    raw["version"] = "adapterz.1.0.0"
    p.write_text(json.dumps(raw))
    found = ADAPTERHUB.config_findings(tmp_path / "a")
    assert [f.code for f in found] == ["unknown-version"] and "adapterz" in found[0].message
    assert ADAPTERHUB.config_findings(AD13) == []


@pytest.mark.parametrize("src,target", [(AT31, "adapters-1.0"), (AD13, "adapter-transformers-3.1"),
                                        (PEFT, "adapters-1.1")])
def test_write_then_read_back_holds_every_module(tmp_path, src, target):
    s = open_source(src)
    conv = get_convention(target)
    try:
        a = s.adapters[0]
        ex = plan_adapter(a, conv, ".", PlanOptions())
        ADAPTERHUB.write(ex, tmp_path / "o", ex.deltas())
        back = ADAPTERHUB.read_back(tmp_path / "o", conv, a.info.name, PlanOptions())
        try:
            assert_same_deltas(a, back)
            if a.convention.family != "adapterhub":  # a foreign source: the wrapper from the canonical fields
                cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
                assert cfg["model_type"] == "llama"
        finally:
            back.store.close()
    finally:
        s.close()


def test_read_back_refuses_what_reads_as_another_version(tmp_path):
    codec_write(AT31, "adapters-1.1", tmp_path / "o")
    with pytest.raises(VerificationFailed, match="would be read as"):
        ADAPTERHUB.read_back(tmp_path / "o", get_convention("adapter-transformers-3.1"), "m1", PlanOptions())
