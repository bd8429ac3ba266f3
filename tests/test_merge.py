"""lora-migrate merge against PEFT's own merge_and_unload (real peft 0.21.2): DoRA and LoRA with lora_bias."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import lora_migrate
from lora_migrate.cli import main

from .models import build, inputs_for, logits as run_logits
from .peft_models import randomize


def _case(tmp, arch="llama", model_kw=None, **lora_kw):
    from peft import LoraConfig, get_peft_model

    base = build(arch, 0, **(model_kw or {}))
    base.save_pretrained(tmp / "base")
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(**lora_kw))
    randomize(model, 1)
    model.eval()
    unmerged = run_logits(model, inputs)
    model.save_pretrained(tmp / "adapter")
    peft_merged = run_logits(model.merge_and_unload().eval(), inputs)
    return inputs, unmerged, peft_merged


def _load(arch, folder):
    import transformers as tf

    cls = tf.LlamaForCausalLM if arch == "llama" else tf.GPT2LMHeadModel
    return cls.from_pretrained(folder).eval()


@pytest.mark.parametrize("arch,model_kw,lora_kw", [
    ("llama", {}, dict(r=8, lora_alpha=32, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", {}, dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    ("gpt2", {}, dict(r=4, lora_alpha=16, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])),
    ("llama", {"attention_bias": True}, dict(r=8, lora_alpha=32, lora_bias=True, target_modules=["q_proj", "v_proj"])),
])
def test_merge_matches_peft(tmp_path, arch, model_kw, lora_kw):
    inputs, unmerged, peft_merged = _case(tmp_path, arch, model_kw, **lora_kw)
    base_logits = run_logits(_load(arch, tmp_path / "base"), inputs)
    assert (base_logits - unmerged).abs().max() > 1e-2  # the adapter does something
    r = lora_migrate.merge_adapter(tmp_path / "adapter", tmp_path / "base", tmp_path / "out")
    assert r.ok and r.merged and r.untouched_identical
    assert all(t.dora for t in r.merged if t.what == "weight") == bool(lora_kw.get("use_dora"))
    got = run_logits(_load(arch, tmp_path / "out"), inputs)
    assert (got - peft_merged).abs().max() <= 1e-5
    assert (got - unmerged).abs().max() <= 1e-5


def test_merge_cli_errors(tmp_path):
    _case(tmp_path, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), str(tmp_path / "base"), str(tmp_path / "o"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    other = tmp_path / "gpt2base"
    build("gpt2", 0).save_pretrained(other)
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "adapter"), str(other), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "has no tensor" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o2").exists()
