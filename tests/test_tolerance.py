"""The tolerance model (tests/tolerance.py) keeps its teeth: the committed golden adapters, rewritten wrongly in the
smallest ways that matter, fail it, while the golden itself passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .models import inputs_for, load_base, logits
from .tolerance import assert_logits_close, base_noise

peft = pytest.importorskip("peft")

PF21 = Path(__file__).resolve().parent.parent / "golden" / "peft" / "pf21"


def _logits_with(case: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    meta = json.loads((case / "meta.json").read_text())
    base = load_base((case / meta["base"]).resolve())
    inputs = inputs_for(base, case / "input.json")
    refs = load_file(str(case / "logits.safetensors"))
    noise = base_noise(base, inputs, refs["base_logits"])
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    return logits(model, inputs), refs["logits"], noise


def test_the_golden_itself_passes():
    case = PF21 / "llama_plain"
    got, ref, noise = _logits_with(case, case / "adapter")
    assert_logits_close(got, ref, noise=noise)


def test_one_lora_b_off_by_1e_3_relative_fails_in_every_module(tmp_path):
    case = PF21 / "llama_plain"
    sd = load_file(str(case / "adapter" / "adapter_model.safetensors"))
    keys = [k for k in sd if ".lora_B." in k]
    assert len(keys) >= 4
    for k in keys:
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        shutil.copytree(case / "adapter", tmp_path / "a")
        save_file({**sd, k: sd[k] * (1 + 1e-3)}, str(tmp_path / "a" / "adapter_model.safetensors"))
        got, ref, noise = _logits_with(case, tmp_path / "a")
        with pytest.raises(AssertionError, match=r"max \|Δlogit\|"):
            assert_logits_close(got, ref, noise=noise, what=k)


def test_a_scale_off_by_one_rslora_factor_fails(tmp_path):
    """use_rslora dropped: α/r instead of α/√r, off by √r (√8 here)."""
    case = PF21 / "llama_rslora"
    shutil.copytree(case / "adapter", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    cfg["use_rslora"] = False
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    got, ref, noise = _logits_with(case, tmp_path / "a")
    with pytest.raises(AssertionError, match=r"max \|Δlogit\|"):
        assert_logits_close(got, ref, noise=noise)
    got, ref, noise = _logits_with(case, case / "adapter")
    assert_logits_close(got, ref, noise=noise)
