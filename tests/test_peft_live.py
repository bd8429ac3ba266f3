"""Acceptance with the real libraries: PEFT adapters made by peft 0.21.2 on tiny models, converted, and loaded
back through each target's public API (PeftModel.from_pretrained, adapters' load_adapter). The converted
adapter must reproduce the source library's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_migrate import api
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature

from .tolerance import assert_logits_close
from .models import build
from .peft_models import adapters_logits, make_peft, peft_logits

pytest.importorskip("peft")


QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AH_OK = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # where AdapterHub's Llama LoRA attaches

CASES = {
    "plain": dict(arch="llama", lora=dict(target_modules=QV, r=8, lora_alpha=16)),
    "rslora": dict(arch="llama", lora=dict(target_modules=AH_OK, r=8, lora_alpha=16, use_rslora=True)),
    "patterns": dict(arch="llama", lora=dict(target_modules=AH_OK, r=4, lora_alpha=8,
                                             rank_pattern={"layers.0.self_attn.q_proj": 8},
                                             alpha_pattern={"v_proj": 32})),
    "rslora_patterns": dict(arch="llama", lora=dict(target_modules=QV, r=4, lora_alpha=8, use_rslora=True,
                                                    rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3})),
    "all_linear": dict(arch="llama", lora=dict(target_modules=ALL, r=4, lora_alpha=12)),
    "gpt2": dict(arch="gpt2", lora=dict(target_modules=["c_attn", "mlp.c_proj", "c_fc"], r=4, lora_alpha=8,
                                        fan_in_fan_out=True)),
    "t5": dict(arch="t5", lora=dict(target_modules=["q", "v", "wi_1", "wo"], r=4, lora_alpha=16)),
    "lora_bias": dict(arch="llama", model=dict(attention_bias=True), lora=dict(target_modules=QV, r=8,
                                                                                lora_alpha=32, lora_bias=True)),
    "embedding": dict(arch="llama", lora=dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)),
    "dora": dict(arch="llama", lora=dict(target_modules=QV, r=4, lora_alpha=8, use_dora=True)),
    "modules_to_save": dict(arch="llama", lora=dict(target_modules=QV, r=4, lora_alpha=8,
                                                    modules_to_save=["lm_head"])),
}

# (case, target) → None (must reproduce) or a message fragment (must be refused with exit code 2)
EXPECT = {
    ("plain", "peft"): None, ("plain", "peft-0.13"): None, ("plain", "lorax"): None, ("plain", "vllm"): None,
    ("plain", "adapters-1.1"): None, ("plain", "adapters-1.0"): None,
    ("rslora", "peft"): None, ("rslora", "peft-0.13"): None, ("rslora", "lorax"): None,
    ("rslora", "adapters-1.1"): None, ("rslora", "adapters-1.0"): None,
    ("patterns", "peft"): None, ("patterns", "peft-0.13"): None, ("patterns", "peft-0.14"): None,
    ("patterns", "vllm"): None, ("patterns", "lorax"): None, ("patterns", "adapters-1.1"): None,
    ("rslora_patterns", "peft"): None, ("rslora_patterns", "peft-0.13"): None, ("rslora_patterns", "vllm"): None,
    ("all_linear", "peft"): None, ("all_linear", "lorax"): None,
    ("all_linear", "adapters-1.1"): "AdapterHub LoRA cannot attach to",
    ("gpt2", "peft"): None, ("gpt2", "adapters-1.1"): None, ("gpt2", "adapters-1.0"): None, ("gpt2", "vllm"): None,
    ("t5", "peft"): None, ("t5", "adapters-1.1"): None, ("t5", "adapter-transformers-3.1"): None,
    ("lora_bias", "peft"): None, ("lora_bias", "peft-0.15"): None,
    ("lora_bias", "peft-0.13"): "lora_B.bias needs PEFT ≥ 0.14",
    ("lora_bias", "vllm"): "lora_B.bias is unsupported LoRA weight",
    ("lora_bias", "lorax"): "drops lora_B.bias", ("lora_bias", "adapters-1.1"): "lora_B.bias",
    ("embedding", "peft"): None, ("embedding", "vllm"): None,
    ("embedding", "lorax"): "cannot express", ("embedding", "adapters-1.1"): "cannot express",
    ("dora", "peft"): None, ("dora", "peft-0.13"): None,
    ("dora", "adapters-1.1"): "needs the base weights", ("dora", "vllm"): "vLLM does not yet support DoRA",
    ("dora", "lorax"): "ignores lora_magnitude_vector",
    ("modules_to_save", "peft"): None,
    ("modules_to_save", "vllm"): "vLLM only supports modules_to_save being None",
    ("modules_to_save", "lorax"): "drops modules_to_save", ("modules_to_save", "adapters-1.1"): "modules_to_save",
}

_made: dict = {}


def _source(case, tmp_path_factory):
    if case not in _made:
        c = CASES[case]
        d = tmp_path_factory.mktemp(case) / "src"
        ref, base = make_peft(d, c["arch"], model_kw=c.get("model"), **c["lora"])
        assert (ref - base).abs().max() > 1e-2  # the adapter does something
        _made[case] = (d, ref)
    return _made[case]


def _target_logits(out, target, c):
    if target.startswith("adapter"):
        return adapters_logits(out, c["arch"], model_kw=c.get("model"))
    return peft_logits(out, c["arch"], model_kw=c.get("model"))


@pytest.mark.parametrize("case,target", sorted(EXPECT), ids=[f"{c}->{t}" for c, t in sorted(EXPECT)])
def test_peft_source_reproduced_by_real_target(case, target, tmp_path, tmp_path_factory):
    src, ref = _source(case, tmp_path_factory)
    c = CASES[case]
    expect = EXPECT[(case, target)]
    if expect is not None:
        with pytest.raises(UnsupportedFeature, match=expect):
            api.convert(src, tmp_path / "out", to=target)
        assert not (tmp_path / "out").exists()
        return
    r = api.convert(src, tmp_path / "out", to=target)
    assert r.ok
    got = _target_logits(tmp_path / "out", target, c)
    assert_logits_close(got, ref)


def test_rslora_into_lorax_uses_alpha_times_sqrt_r_not_alpha_times_r(tmp_path, tmp_path_factory):
    src, ref = _source("rslora", tmp_path_factory)
    api.convert(src, tmp_path / "p13", to="peft-0.13")
    cfg = json.loads((tmp_path / "p13" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == pytest.approx(16 * 8 ** 0.5) and "use_rslora" not in cfg
    # the workaround posted for LoRAX (alpha·r) is wrong by √r: show it with the real PEFT
    cfg["lora_alpha"] = 16 * 8
    (tmp_path / "p13" / "adapter_config.json").write_text(json.dumps(cfg))
    wrong = peft_logits(tmp_path / "p13", "llama")
    assert (wrong - ref).abs().max().item() > 1e-2


def test_lorax_output_is_folded_and_padded(tmp_path, tmp_path_factory):
    src, _ = _source("patterns", tmp_path_factory)
    api.convert(src, tmp_path / "o", to="lorax")
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    # one global alpha for the most common scale (k, up, down: 8/4 = 2 → 2·8 = 16); q and v are folded into B
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg.get("rank_pattern") and not cfg.get("use_rslora")
    sd = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in sd.items() if "lora_A" in k} == {8}


def test_same_era_peft_copy_is_bit_identical(tmp_path, tmp_path_factory):
    src, _ = _source("patterns", tmp_path_factory)
    api.convert(src, tmp_path / "o", to="peft")
    a, b = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a = json.loads((src / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg_b["rank_pattern"] == cfg_a["rank_pattern"] and cfg_b["alpha_pattern"] == cfg_a["alpha_pattern"]


def test_peft_0_13_config_has_only_fields_it_knows(tmp_path, tmp_path_factory):
    from lora_migrate.schemas.peft import fields_of

    src, _ = _source("patterns", tmp_path_factory)
    api.convert(src, tmp_path / "o", to="peft-0.13")
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert set(cfg) <= set(fields_of("0.6"))


def test_multi_adapter_peft_folder_converts_one_subfolder_each(tmp_path):
    from peft import LoraConfig, get_peft_model

    from .models import inputs_for, logits
    from .peft_models import randomize

    base = build("llama", 0)
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(target_modules=QV, r=4, lora_alpha=8))
    model.add_adapter("m2", LoraConfig(target_modules=["v_proj", "up_proj"], r=8, lora_alpha=8, use_rslora=True))
    randomize(model, 3)
    model.eval()
    refs = {}
    for n in ("default", "m2"):
        model.set_adapter(n)
        refs[n] = logits(model, inputs)
    model.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "m2" / "adapter_config.json").is_file()
    r = api.convert(tmp_path / "src", tmp_path / "out", to="peft-0.13")
    assert sorted(a.plan.adapter for a in r.adapters) == ["default", "m2"]
    for n in ("default", "m2"):
        got = peft_logits(tmp_path / "out" / n, "llama")
        assert_logits_close(got, refs[n])
    # m2 adapts up_proj alone, and a config-built model names no base: say which AdapterHub mapping applies
    r = api.convert(tmp_path / "src", tmp_path / "ah", to="adapters-1.1", model_type="llama")
    for n in ("default", "m2"):
        got = adapters_logits(tmp_path / "ah" / n, "llama")
        assert_logits_close(got, refs[n])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_become_rank_2r_lora_on_the_original_weights(init, tmp_path):
    """Trained PiSSA/OLoRA adapter on the residual base == converted rank-2r adapter on the original base, and
    == what PEFT's own path_initial_model_for_weight_conversion writes."""
    from peft import LoraConfig, get_peft_model

    from .models import inputs_for, logits
    from .peft_models import randomize

    base = build("llama", 0)
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(target_modules=QV, r=4, lora_alpha=8, init_lora_weights=init))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    ref = logits(model, inputs)  # trained adapter on the residual base
    model.save_pretrained(tmp_path / "trained")
    with pytest.raises(UnsupportedFeature, match="--initial-adapter"):
        api.convert(tmp_path / "trained", tmp_path / "x", to="peft")
    r = api.convert(tmp_path / "trained", tmp_path / "out", to="peft", initial_adapter=tmp_path / "init")
    assert r.ok
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    got = peft_logits(tmp_path / "out", "llama")
    assert_logits_close(got, ref)
    r = api.convert(tmp_path / "trained", tmp_path / "ah", to="adapters-1.1", initial_adapter=tmp_path / "init")
    assert_logits_close(adapters_logits(tmp_path / "ah", "llama"), ref)
    del randomize


@pytest.mark.parametrize("arch,subdir", [("llama", "ad13/llama_ffn"), ("gpt2", "ad13/gpt2_mixed"),
                                         ("t5", "at31/t5_qv"), ("llama", "ad101/llama_ffn")])
def test_adapterhub_goldens_into_peft_reproduce_their_logits(arch, subdir, tmp_path):
    from pathlib import Path

    from .models import inputs_for, load_base, logits

    case = Path(__file__).parent.parent / "golden" / subdir
    meta = json.loads((case / "meta.json").read_text())
    ref = load_file(case / "logits.safetensors")["logits"]
    r = api.convert(case / "adapter", tmp_path / "out", to="peft")
    assert r.ok
    from peft import PeftModel

    base = load_base((case / meta["base"]).resolve())
    inputs = inputs_for(base, case / "input.json")
    model = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    assert_logits_close(logits(model, inputs), ref)


def test_unknown_module_keys_are_refused(tmp_path, tmp_path_factory):
    from safetensors.torch import save_file

    src, _ = _source("plain", tmp_path_factory)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = load_file(src / "adapter_model.safetensors")
    sd["something.else"] = torch.zeros(2)
    save_file(sd, d / "adapter_model.safetensors")
    with pytest.raises(LoraMigrateError, match="no PEFT LoRA schema claims"):
        api.convert(d, tmp_path / "o", to="peft")


def test_inspect_predicts_what_each_peft_era_and_server_computes(tmp_path_factory):
    src, _ = _source("rslora", tmp_path_factory)
    r = api.inspect(src)
    a = r.adapters[0]
    assert r.convention == "peft" and a.scales["linear"].startswith("5.65685")
    by = {c.convention: c for c in a.as_loaded}
    assert "TypeError" in by["peft-0.13"].detail and not by["peft-0.13"].same
    assert by["peft-0.16"].same
    lorax = by["lorax"].detail
    assert not by["lorax"].same and "×2 instead of ×5.65685" in lorax and "alpha·√r = 45.2548" in lorax
    assert "alpha·r = 128" in lorax
    src, _ = _source("patterns", tmp_path_factory)
    by = {c.convention: c for c in api.inspect(src).adapters[0].as_loaded}
    assert not by["vllm"].same and "built at r=4 for a rank-8 tensor" in by["vllm"].detail


def test_check_expect_lorax_flags_rslora_and_passes_after_conversion(tmp_path, tmp_path_factory):
    from lora_migrate.gate import check

    src, _ = _source("rslora", tmp_path_factory)
    r = check(src, expect="lorax")
    assert not r.ok and any(f.code == "misdeclared" and "alpha·√r" in f.message for f in r.findings)
    api.convert(src, tmp_path / "o", to="lorax")
    assert check(tmp_path / "o", expect="lorax").ok
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_version"] = "0.7.1"
    d = tmp_path / "old"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    assert any(f.code == "rslora-unknown" for f in check(d).findings)


# vLLM's key parser (vllm/lora/utils.py parse_fine_tuned_lora_name + is_base_embeddding_weights, newest and older):
# only these forms load; anything else raises "<name> is unsupported LoRA weight" in older releases.
_VLLM_KEY = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def test_embedding_into_vllm_leaves_out_the_frozen_base_copy(tmp_path, tmp_path_factory):
    src, ref = _source("embedding", tmp_path_factory)
    saved = load_file(src / "adapter_model.safetensors")
    copies = [k for k in saved if k.endswith("embed_tokens.base_layer.weight")]
    assert copies  # peft saves the full embedding when embed_tokens is a target
    r = api.convert(src, tmp_path / "o", to="vllm")
    assert any(s.rule == "drop_base_copies" for s in r.adapters[0].plan.steps)
    out = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert all(k.endswith(_VLLM_KEY) for k in out), sorted(k for k in out if not k.endswith(_VLLM_KEY))
    got = peft_logits(tmp_path / "o", "llama")  # the copy was the frozen base weight: nothing lost
    assert_logits_close(got, ref)
    v = api.verify(src, tmp_path / "o", to="vllm")
    assert v.ok


def test_saved_embedding_without_lora_on_it_is_refused_for_vllm(tmp_path):
    from peft import LoraConfig, get_peft_model

    from .peft_models import randomize

    model = get_peft_model(build("llama", 0), LoraConfig(target_modules=QV, r=4, lora_alpha=8))
    randomize(model, 1)
    model.save_pretrained(tmp_path / "src", save_embedding_layers=True)
    keys = load_file(tmp_path / "src" / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.weight") for k in keys)
    with pytest.raises(UnsupportedFeature, match="is unsupported LoRA weight"):
        api.convert(tmp_path / "src", tmp_path / "o", to="vllm")
    assert not (tmp_path / "o").exists()
    assert api.convert(tmp_path / "src", tmp_path / "p", to="peft").ok  # PEFT carries it bit for bit


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_adapterhub_mapping_follows_the_base_models_config(arch, tmp_path):
    """Where mlp.up_proj / mlp.down_proj go in AdapterHub depends on the model type: the built-in Llama mixin
    wraps down_proj as 'intermediate', the plug-in Qwen2 interface wraps up_proj; with only one of them adapted,
    the flag decides which module gets the LoRA. The type is read from the
    config.json of the base model PEFT recorded; without it the conversion is refused (a guess is wrong for one
    of the two, as the last part shows with the real library)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .models import inputs_for, logits
    from .peft_models import randomize

    build(arch, 0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8))
    randomize(model, 2)
    model.eval()
    ref = logits(model, inputs)
    model.save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "adapter_config.json"
    assert json.loads(cfg_path.read_text())["base_model_name_or_path"] == str(tmp_path / "base")

    r = api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.1")
    assert any(f"model_type '{arch}' from the config.json" in s.what for s in r.adapters[0].plan.steps)
    assert_logits_close(adapters_logits(tmp_path / "out", arch), ref)

    wrong = "llama" if arch == "qwen2" else "qwen2"
    api.convert(tmp_path / "src", tmp_path / "guess", to="adapters-1.1", model_type=wrong)
    assert (adapters_logits(tmp_path / "guess", arch) - ref).abs().max().item() > 1e-3

    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LoraMigrateError, match="pass --model-type"):
        api.convert(tmp_path / "src", tmp_path / "none", to="adapters-1.1")
    assert not (tmp_path / "none").exists()


def test_a_guessed_model_type_is_named_in_the_refusal(tmp_path):
    """A PEFT config that names no base model: the type comes from module paths, and a module AdapterHub cannot
    wrap is refused with that said (a Phi or Falcon base looks like llama or gpt2 by its paths)."""
    make_peft(tmp_path / "src", "llama", target_modules=["q_proj", "o_proj"], r=4, lora_alpha=8)
    cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    assert not cfg.get("base_model_name_or_path")
    with pytest.raises(UnsupportedFeature, match=r"o_proj.*guessed from module paths.*--model-type"):
        api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.1")
    with pytest.raises(UnsupportedFeature, match="o_proj") as info:
        api.convert(tmp_path / "src", tmp_path / "out", to="adapters-1.1", model_type="llama")
    assert "guessed" not in str(info.value)
