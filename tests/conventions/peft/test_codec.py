"""The PEFT codec's claim, read, write and read-back on adapters the real PEFT wrote (golden/peft), without the
CLI: each method is called as the pipeline calls it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from lora_migrate.codecs import CODECS, PlanOptions, codec_for
from lora_migrate.codecs.peft import PEFT
from lora_migrate.detect import open_source
from lora_migrate.errors import DetectionError, LoraMigrateError, VerificationFailed
from lora_migrate.plan import plan_adapter
from lora_migrate.schemas import get_convention

from ...builders import assert_same_deltas, codec_write

GOLDEN = Path(__file__).resolve().parents[3] / "golden"
RSLORA = GOLDEN / "peft" / "pf21" / "llama_rslora" / "adapter"
PATTERNS = GOLDEN / "peft" / "pf21" / "llama_patterns" / "adapter"
AH = GOLDEN / "at31" / "t5_qv" / "adapter"


def test_claims_its_folders_and_files_and_nothing_else(tmp_path):
    assert PEFT.claim(RSLORA).strength == 2
    assert PEFT.claim(RSLORA / "adapter_model.safetensors") is not None
    assert "folders" in PEFT.claim(RSLORA.parent).why  # the case folder holds the adapter folder
    assert PEFT.claim(RSLORA.parent.parent) is None  # adapters two levels down are not claimed
    assert PEFT.claim(AH) is None
    assert PEFT.claim(tmp_path) is None
    multi = tmp_path / "two"
    for n in ("a", "b"):
        shutil.copytree(RSLORA, multi / n)
    assert "folders" in PEFT.claim(multi).why


def test_detection_prefers_peft_over_a_bare_adapterhub_claim():
    claims = {c.id: c.claim(RSLORA) for c in CODECS}
    assert claims["peft"].strength > claims["adapterhub"].strength  # AdapterHub sees only adapter_config.json
    assert open_source(RSLORA).convention.family == "peft"


def test_from_naming_another_family_is_refused():
    with pytest.raises(DetectionError, match="names an AdapterHub convention, but this is a PEFT adapter"):
        open_source(RSLORA, "adapters-1.0")


def test_read_rslora_scale_and_typed_adapter_fields():
    s = PEFT.open(RSLORA, None)
    try:
        a = s.adapters[0]
        assert s.layout == "adapter" and a.convention.name == "peft"
        assert "rslora" in a.features and a.info.r == 8 and a.info.alpha == 16
        for e in a.modules:
            assert e.scale == 16 / math.sqrt(8) and e.provenance.rule.startswith("alpha/sqrt(r)")
        assert a.info.fan_in_fan_out is False and a.info.base_model is None and a.info.coverage_unproven is None
        assert not a.init_mutates
    finally:
        s.close()


def test_read_patterns_per_module():
    s = PEFT.open(PATTERNS, None)
    try:
        a = s.adapters[0]
        cfg = a.peft
        scales = {(e.rank, e.scale) for e in a.modules}
        assert len(scales) > 1  # the patterns give modules their own (r, alpha)
        for e in a.modules:
            assert e.scale == e.alpha / e.rank
        assert cfg.rank_pattern or cfg.alpha_pattern
    finally:
        s.close()


@pytest.mark.parametrize("target", ["peft", "peft-0.13", "lorax"])
def test_write_then_read_back_holds_every_module(tmp_path, target):
    """plan → write → read_back through the codec: every module's ΔW equals the source's (the scale moves into
    alpha or, for one global alpha, into B), and the written config reads as the target."""
    s = PEFT.open(RSLORA, None)
    conv = get_convention(target)
    try:
        src = s.adapters[0]
        ex = plan_adapter(src, conv, ".", PlanOptions())
        codec = codec_for(conv)
        notes = codec.write(ex, tmp_path / "o", ex.deltas())
        assert isinstance(notes, list)
        back = codec.read_back(tmp_path / "o", conv, "default", PlanOptions())
        try:
            assert {e.module for e in back.modules} == {e.module for e in src.modules}
            assert_same_deltas(src, back)
        finally:
            back.store.close()
    finally:
        s.close()


def test_read_back_refuses_a_config_read_as_another_era(tmp_path):
    codec_write(RSLORA, "peft", tmp_path / "o")
    with pytest.raises(VerificationFailed, match="would be read as"):
        PEFT.read_back(tmp_path / "o", get_convention("peft-0.13"), "default", PlanOptions())


def test_a_peft_config_without_weights_says_so(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(RSLORA / "adapter_config.json", tmp_path / "a")
    with pytest.raises(LoraMigrateError, match="a PEFT adapter .* but no adapter_model"):
        open_source(tmp_path / "a")
