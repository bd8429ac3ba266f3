"""Acceptance with the real, latest `adapters` (1.3.0): sources written by its save_adapter / save_pretrained,
outputs loaded by its load_adapter + set_active_adapters, logits compared (≤ 1e-5, fp32)."""

from __future__ import annotations

import json

import pytest
import torch

adapters = pytest.importorskip("adapters")

from lora_migrate import api  # noqa: E402
from lora_migrate.errors import LoraMigrateError  # noqa: E402

from .tolerance import assert_logits_close
from .models import build, inputs_for, load_and_run, logits, randomize_loras, with_adapter  # noqa: E402



CASES = {
    "t5_qv": ("t5", lambda: adapters.LoRAConfig(r=8, alpha=16)),
    "t5_ffn": ("t5", lambda: adapters.LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v"],
                                                 intermediate_lora=True, output_lora=True)),
    "gpt2_mixed": ("gpt2", lambda: adapters.LoRAConfig(r=8, alpha=32, attn_matrices=["q", "v"],
                                                       intermediate_lora=True, output_lora=True)),
    "llama_ffn": ("llama", lambda: adapters.LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v"],
                                                       intermediate_lora=True, output_lora=True)),
    "t5_ia3": ("t5", lambda: adapters.IA3Config(alpha=2)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, cfg = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    name = "ia3" if "ia3" in request.param else "m1"
    model, ref = with_adapter(arch, d / "src", name, cfg())
    base = logits(build(arch), inputs_for(model))
    assert (ref - base).abs().max() > 1e-2, "the adapter must change the logits, or nothing is tested"
    return arch, d, ref


@pytest.mark.parametrize("target", ["adapters-1.0", "adapters-1.1"])
def test_converted_adapter_reproduces_logits(case, target):
    arch, d, ref = case
    out = d / f"out-{target}"
    r = api.convert(d / "src", out, to=target)
    assert r.source_convention == "adapters-1.1" and r.ok
    got = load_and_run(arch, out)
    assert_logits_close(got, ref)


def test_adapters_1_0_output_reads_right_under_the_load_shim(case):
    """adapters ≥ 1.1 rewrites alpha := r for `adapters.<1.1.0` configs; our 1.0 output has alpha = r already."""
    arch, d, ref = case
    out = d / "shim"
    api.convert(d / "src", out, to="adapters-1.0")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["version"] == "adapters.1.0.1"
    assert cfg["config"]["alpha"] == cfg["config"]["r"]
    assert_logits_close(load_and_run(arch, out), ref)


def test_round_trip_through_every_convention(case):
    arch, d, ref = case
    a = d / "rt-at31"
    b = d / "rt-ad10"
    c = d / "rt-ad11"
    api.convert(d / "src", a, to="adapter-transformers-3.1")
    api.convert(a, b, to="adapters-1.0")
    api.convert(b, c, to="adapters-1.1")
    assert_logits_close(load_and_run(arch, c), ref)
    assert api.verify(d / "src", c).ok


def test_safetensors_output_needs_use_safetensors(tmp_path):
    """Measured: load_adapter() reads adapter.safetensors only with use_safetensors=True, which is why the
    default output is pytorch_adapter.bin."""
    _, ref = with_adapter("t5", tmp_path / "src", "m1", adapters.LoRAConfig(r=8, alpha=16))
    out = tmp_path / "out"
    api.convert(tmp_path / "src", out, to="adapters-1.1", safetensors=True)
    assert (out / "adapter.safetensors").is_file() and not (out / "pytorch_adapter.bin").exists()
    assert_logits_close(load_and_run("t5", out, use_safetensors=True), ref)
    try:
        got = load_and_run("t5", out)
    except Exception:
        return  # refusing to load is also "not read"
    assert (got - ref).abs().max().item() > 1e-2


def _full_model(tmp_path):
    model = build("t5")
    adapters.init(model)
    model.add_adapter("m1", config=adapters.LoRAConfig(r=8, alpha=16))
    model.add_adapter("m2", config=adapters.LoRAConfig(r=4, alpha=32, intermediate_lora=True))
    randomize_loras(model, "m1", 1)
    randomize_loras(model, "m2", 2)
    refs = {}
    for n in ("m1", "m2"):
        model.set_active_adapters(n)
        refs[n] = logits(model, inputs_for(model))
    model.save_pretrained(str(tmp_path / "full"))
    return refs


def test_full_model_with_two_adapters_splits_into_subfolders(tmp_path):
    refs = _full_model(tmp_path)
    info = api.inspect(tmp_path / "full")
    assert info.layout == "full-model" and [a.name for a in info.adapters] == ["m1", "m2"]
    r = api.convert(tmp_path / "full", tmp_path / "out", to="adapters-1.0")
    assert [a.plan.output for a in r.adapters] == ["m1", "m2"]
    for n in ("m1", "m2"):
        assert_logits_close(load_and_run("t5", tmp_path / "out" / n), refs[n])
    assert any("base-model tensors" in note for note in r.adapters[0].notes)


def test_full_model_select_one_adapter(tmp_path):
    refs = _full_model(tmp_path)
    api.convert(tmp_path / "full", tmp_path / "out", to="adapters-1.1", adapter="m2")
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert_logits_close(load_and_run("t5", tmp_path / "out"), refs["m2"])


def test_static_head_copy_is_left_out_and_said(tmp_path):
    with_adapter("t5", tmp_path / "src", "m1", adapters.LoRAConfig(r=8, alpha=16))
    assert (tmp_path / "src" / "pytorch_model_head.bin").is_file()  # the library saves lm_head with the adapter
    r = api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.0")
    assert not (tmp_path / "out" / "pytorch_model_head.bin").exists()
    assert any("left out" in n and "lm_head" in n for n in r.adapters[0].notes)
    api.convert(tmp_path / "src", tmp_path / "kept", to="adapters-1.0", keep_head=True)
    assert (tmp_path / "kept" / "pytorch_model_head.bin").read_bytes() == \
        (tmp_path / "src" / "pytorch_model_head.bin").read_bytes()


def test_gated_lora_is_refused_and_nothing_written(tmp_path):
    with_adapter("t5", tmp_path / "src", "m1", adapters.LoRAConfig(r=8, alpha=16, use_gating=True))
    info = api.inspect(tmp_path / "src")
    assert info.adapters[0].gated and not info.adapters[0].convertible
    with pytest.raises(LoraMigrateError, match="gate replaces alpha/r"):
        api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.0")
    assert not (tmp_path / "out").exists()


def test_mixed_scaling_of_adapters_1_0_gpt2_is_folded_per_layer(tmp_path):
    """An adapters 1.0.x GPT-2 adapter used alpha/r on c_attn but 1.0 on c_fc / c_proj. Reading it as
    adapters-1.0 and writing adapters-1.1 must reproduce the 1.0.x math — here simulated by computing it
    with the ≥1.1 library at the per-layer scales that 1.0.x applied."""
    model, _ = with_adapter("gpt2", tmp_path / "src", "m1",
                            adapters.LoRAConfig(r=8, alpha=32, intermediate_lora=True, output_lora=True))
    # What 1.0.1 computes: LoRALinear at scale 1.0, LoRAMergedLinear (c_attn) at alpha/r = 4.
    with torch.no_grad():
        for k, p in model.named_parameters():
            if ".loras.m1.lora_B" in k and "c_attn" not in k:
                p.mul_(8 / 32)  # 1.3.0 applies alpha/r = 4 here; 1.0.1 applied 1.0
    ref_101 = logits(model, inputs_for(model))
    cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    cfg["version"] = "adapters.1.0.1"
    cfg["config"].pop("dtype"), cfg["config"].pop("init_weights_seed"), cfg["config"].pop("use_dora")
    cfg["config"].pop("vera_b"), cfg["config"].pop("vera_d")
    (tmp_path / "src" / "adapter_config.json").write_text(json.dumps(cfg))
    r = api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.1")
    assert r.source_convention == "adapters-1.0"
    p = r.adapters[0].plan
    assert p.scales_in == {"fused_qkv": 4.0, "linear": 1.0}
    assert_logits_close(load_and_run("gpt2", tmp_path / "out"), ref_101)


def test_sharded_full_model(tmp_path):
    model = build("llama")
    adapters.init(model)
    model.add_adapter("m1", config=adapters.LoRAConfig(r=4, alpha=8, intermediate_lora=True))
    randomize_loras(model, "m1", 7)
    model.set_active_adapters("m1")
    ref = logits(model, inputs_for(model))
    model.save_pretrained(str(tmp_path / "full"), max_shard_size="40KB")
    assert list((tmp_path / "full").glob("*.index.json")), "the checkpoint should be sharded"
    r = api.convert(tmp_path / "full", tmp_path / "out", to="adapters-1.0")
    assert r.layout == "full-model" and r.ok
    assert_logits_close(load_and_run("llama", tmp_path / "out"), ref)
