"""LoRAX drops a layer type in every layer when any layer lacks its weights (peft.md §7.3). ``--to lorax`` fills
the missing layers with zero adapters (exact no-ops), from the config's proof of coverage or ``--num-layers``, and
refuses when neither says how many layers the model has; ``check --expect lorax`` and ``inspect`` predict the
drop. The end-to-end test uses the real peft and an emulation of LoRAX's loader (tests/lorax_emulation.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_migrate import api
from lora_migrate.adapter import ModuleDelta, ScaleProvenance
from lora_migrate.gate import check
from lora_migrate.cli import main
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.rules.coverage import layer_type, missing_layers, zero_adapter

Q, V = "model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj"


def peft_dir(folder, modules, r=4, alpha=8, **config):
    """A PEFT adapter folder with random factors for ``modules`` (hidden size 16), config fields as given."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for m in modules:
        sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(16, r, generator=g)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
           "layers_to_transform": None, "layers_pattern": None, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def written(out):
    return load_file(str(out / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------- the rule


def test_layer_type_replaces_the_first_layer_index():
    assert layer_type("model.layers.3.self_attn.q_proj") == ("model.layers.*.self_attn.q_proj", 3)
    assert layer_type("transformer.h.11.attn.c_attn") == ("transformer.h.*.attn.c_attn", 11)
    assert layer_type("model.layers.2.mlp.experts.5.w1") == ("model.layers.*.mlp.experts.5.w1", 2)
    assert layer_type("lm_head") == ("lm_head", None)
    mods = [Q.format(0), Q.format(1), V.format(0), "lm_head"]
    assert missing_layers(mods, range(3)) == {"model.layers.*.self_attn.q_proj": [2],
                                              "model.layers.*.self_attn.v_proj": [1, 2]}


def test_zero_adapter_is_an_exact_no_op():
    p = ScaleProvenance(alpha=8, r=4, rule="alpha/r", convention="test")
    like = ModuleDelta("m", A=torch.randn(4, 5), B=torch.randn(6, 4, dtype=torch.bfloat16), scale=2.0, provenance=p)
    z = zero_adapter(like)
    assert z.A.shape == like.A.shape and z.B.shape == like.B.shape and z.B.dtype == torch.bfloat16
    assert torch.count_nonzero(z.B.float() @ z.A) == 0 and z.scale == 2.0


# ------------------------------------------------------------------------------------------------- planning


def test_layers_to_transform_needs_num_layers(tmp_path):
    src = peft_dir(tmp_path / "src", [Q.format(0), V.format(0)], layers_to_transform=[0])
    with pytest.raises(UnsupportedFeature, match=r"layers_to_transform=\[0\].*LoRAX drops a layer type.*--num-layers"):
        api.convert(src, tmp_path / "out", to="lorax")
    assert not (tmp_path / "out").exists()
    r = api.convert(src, tmp_path / "out", to="lorax", num_layers=3)
    assert r.ok and r.adapters[0].plan.modules == 6
    assert any(s.rule == "zero_adapter" for s in r.adapters[0].plan.steps)
    sd = written(tmp_path / "out")
    for i in (1, 2):
        for m in (Q, V):
            key = f"base_model.model.{m.format(i)}"
            a, b = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
            assert a.shape == (8, 16) and b.shape == (16, 8) and not a.any() and not b.any()  # padded rank, zeros
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None and cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 8
    # `verify` counts a module only the output has as ok when it is a zero adapter, and as extra otherwise
    assert api.verify(src, tmp_path / "out").ok
    other = peft_dir(tmp_path / "other", [Q.format(0), V.format(0), Q.format(1)], layers_to_transform=[0, 1])
    r = api.verify(src, other)
    assert not r.ok and [m.status for m in r.adapters["default"].modules][-1] == "extra_in_output"


def test_partial_target_list_is_filled_from_the_layers_seen_only_with_num_layers(tmp_path):
    """A plain target list proves every layer is covered; a file that still lacks a layer of one type (v_proj in
    layer 1 while q_proj has it) is refused without --num-layers, and filled with it."""
    src = peft_dir(tmp_path / "src", [Q.format(0), Q.format(1), V.format(0)])
    with pytest.raises(UnsupportedFeature, match="v_proj lacks layer 1 that other types have"):
        api.convert(src, tmp_path / "out", to="lorax")
    r = api.convert(src, tmp_path / "out", to="lorax", num_layers=2)
    assert r.ok and r.adapters[0].plan.modules == 4
    assert not written(tmp_path / "out")[f"base_model.model.{V.format(1)}.lora_B.weight"].any()


def test_full_coverage_proven_by_the_config_needs_nothing(tmp_path):
    src = peft_dir(tmp_path / "src", [m.format(i) for i in range(2) for m in (Q, V)])
    r = api.convert(src, tmp_path / "out", to="lorax")
    assert r.ok and r.adapters[0].plan.modules == 4
    assert not any(s.rule == "zero_adapter" for s in r.adapters[0].plan.steps)


def test_regex_target_modules_needs_num_layers_even_when_complete(tmp_path):
    src = peft_dir(tmp_path / "src", [m.format(i) for i in range(2) for m in (Q, V)],
                   target_modules=r".*layers\.[01]\..*(q|v)_proj")
    with pytest.raises(UnsupportedFeature, match="target_modules is a regex"):
        api.convert(src, tmp_path / "out", to="lorax")
    r = api.convert(src, tmp_path / "out", to="lorax", num_layers=4)
    assert r.ok and r.adapters[0].plan.modules == 8


def test_num_layers_is_checked(tmp_path):
    src = peft_dir(tmp_path / "src", [Q.format(0), Q.format(2)], layers_to_transform=[0, 2])
    with pytest.raises(LoraMigrateError, match="--num-layers 2, but the adapter has layer 2"):
        api.convert(src, tmp_path / "out", to="lorax", num_layers=2)
    with pytest.raises(LoraMigrateError, match="--num-layers is for --to lorax"):
        api.convert(src, tmp_path / "out", to="vllm", num_layers=3)


def test_cli_refuses_in_one_line_and_fills_with_num_layers(tmp_path):
    src = peft_dir(tmp_path / "src", [Q.format(0)], layers_to_transform=[0])
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "lorax"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--num-layers N" in lines[0], r.output
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "lorax", "--num-layers", "2"])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_check_expect_lorax_predicts_the_drop(tmp_path):
    gap = peft_dir(tmp_path / "gap", [Q.format(0), Q.format(1), V.format(0)])
    r = check(gap, expect="lorax")
    assert not r.ok and any(f.code == "misdeclared" and "LoRAX drops v_proj in every layer" in f.message
                            for f in r.findings)
    some = peft_dir(tmp_path / "some", [Q.format(0)], layers_to_transform=[0])
    r = check(some, expect="lorax")
    warn = [f for f in r.findings if f.code == "lorax-coverage"]
    assert r.ok and warn and warn[0].level == "warning" and "other than 0" in warn[0].message
    lx = {c.convention: c for c in api.inspect(gap).adapters[0].as_loaded}["lorax"]
    assert not lx.same and "--num-layers N" in lx.detail
    api.convert(some, tmp_path / "out", to="lorax", num_layers=2)
    assert check(tmp_path / "out", expect="lorax").findings == []


# ------------------------------------------------------------------------------------------------- end to end


def test_layers_to_transform_adapter_served_by_emulated_lorax(tmp_path):
    """A real peft adapter with layers_to_transform=[0] on the 2-layer tiny Llama: (i) LoRAX loses its types,
    (ii) the --num-layers 2 output under the emulated LoRAX gives the PEFT logits, (iii) and so does real PEFT."""
    pytest.importorskip("peft")
    from .lorax_emulation import lorax_logits
    from .peft_models import make_peft, peft_logits

    src = tmp_path / "src"
    ref, base = make_peft(src, "llama", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                          use_rslora=True, layers_to_transform=[0])
    assert (ref - base).abs().max() > 1e-2
    raw, dropped = lorax_logits(src)
    assert sorted(dropped) == ["down_proj", "q_proj", "v_proj"]
    assert (raw - base).abs().max().item() <= 1e-6 and (raw - ref).abs().max().item() > 1e-2  # (i)
    r = api.convert(src, tmp_path / "out", to="lorax", num_layers=2)
    assert r.ok
    served, dropped = lorax_logits(tmp_path / "out")
    assert dropped == [] and (served - ref).abs().max().item() <= 1e-5  # (ii)
    assert (peft_logits(tmp_path / "out", "llama") - ref).abs().max().item() <= 1e-5  # (iii)


def test_lorax_emulation_matches_peft_on_a_full_coverage_adapter(tmp_path):
    """The emulation itself: a plain adapter on every layer is served as PEFT computes it; an rsLoRA one is not
    (alpha/r instead of alpha/√r), until converted."""
    pytest.importorskip("peft")
    from .lorax_emulation import lorax_logits
    from .peft_models import make_peft

    ref, _ = make_peft(tmp_path / "plain", "llama", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    assert (lorax_logits(tmp_path / "plain")[0] - ref).abs().max().item() <= 1e-5
    ref, _ = make_peft(tmp_path / "rs", "llama", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                       use_rslora=True)
    assert (lorax_logits(tmp_path / "rs")[0] - ref).abs().max().item() > 1e-2
    api.convert(tmp_path / "rs", tmp_path / "rs_out", to="lorax")
    assert (lorax_logits(tmp_path / "rs_out")[0] - ref).abs().max().item() <= 1e-5
