"""MoE experts between mlx-lm's LoRASwitchLinear and PEFT's target_parameters, on the committed goldens
(golden/mlx/mlxlm0322): each case holds an adapter written by one real library and its equivalent in the other,
built by hand and proven there with logits (results/FINDINGS_MLX.md). Both files read by lora-migrate must hold the
same ΔW per expert, and a conversion of the one must verify against the other. The runtimes themselves load the
converted files in golden/families/mlx (ACCEPTANCE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_migrate import api
from lora_migrate.errors import UnsupportedFeature

GOLD = Path(__file__).resolve().parents[3] / "golden" / "mlx" / "mlxlm0322"
MLX_WRITTEN = {"qwen2moe_switch": "qwen2_moe", "mixtral_switch": "mixtral", "qwen2moe_all_last1": "qwen2_moe",
               "qwen3moe_switch": "qwen3_moe", "olmoe_switch": "olmoe", "glm4moe_switch": "glm4_moe"}
PEFT_WRITTEN = {"peft_qwen2moe": "qwen2_moe", "peft_mixtral_rslora": "mixtral", "peft_qwen2moe_down": "qwen2_moe",
                "peft_qwen2moe_gateup": "qwen2_moe", "peft_qwen3moe": "qwen3_moe", "peft_olmoe": "olmoe",
                "peft_glm4moe": "glm4_moe"}


def _ok(report):
    assert report.ok, [m for r in report.adapters.values() for m in r.modules if not m.ok][:2]
    return max(m.rel_fro or 0.0 for r in report.adapters.values() for m in r.modules)


@pytest.mark.parametrize("case", sorted(MLX_WRITTEN))
def test_mlx_switch_equals_its_peft_equivalent(case):
    """The PEFT equivalent (gate_up_proj at rank 2r, block-diagonal; the router as a raw parameter) was written by
    peft 0.21.2 and gives mlx-lm's logits to 2.6e-6; our two readers must agree expert by expert."""
    _ok(api.verify(GOLD / case / "adapter", GOLD / case / "peft_equivalent"))


@pytest.mark.parametrize("case", sorted(PEFT_WRITTEN))
def test_peft_target_parameters_equal_their_mlx_equivalent(case):
    """Nested ParamWrappers (which one holds gate_up_proj is told by shape), rsLoRA, one parameter alone."""
    _ok(api.verify(GOLD / case / "adapter", GOLD / case / "mlx_equivalent"))


@pytest.mark.parametrize("case", sorted(PEFT_WRITTEN))
def test_peft_to_mlx_verifies_against_the_proven_equivalent(case, tmp_path):
    out = tmp_path / "out"
    r = api.convert(GOLD / case / "adapter", out, to="mlx-lm", model_type=PEFT_WRITTEN[case])
    assert r.ok
    cfg = json.loads((out / "adapter_config.json").read_text())
    ref = json.loads((GOLD / case / "mlx_equivalent" / "adapter_config.json").read_text())
    assert sorted(cfg["lora_parameters"]["keys"]) == sorted(ref["lora_parameters"]["keys"])
    _ok(api.verify(out, GOLD / case / "mlx_equivalent"))


@pytest.mark.parametrize("case", sorted(MLX_WRITTEN))
def test_mlx_to_peft_verifies_against_the_proven_equivalent(case, tmp_path):
    out = tmp_path / "out"
    assert api.convert(GOLD / case / "adapter", out, to="peft", model_type=MLX_WRITTEN[case]).ok
    cfg = json.loads((out / "adapter_config.json").read_text())
    ref = json.loads((GOLD / case / "peft_equivalent" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(ref["target_parameters"])
    _ok(api.verify(out, GOLD / case / "peft_equivalent"))


def test_peft_to_mlx_needs_the_model_type():
    with pytest.raises(Exception, match="model type"):
        api.convert(GOLD / "peft_qwen2moe" / "adapter", "/nonexistent/never-written", to="mlx-lm")


def test_inspect_says_older_eras_are_not_established():
    by = {c.convention: c for c in api.inspect(GOLD / "qwen2moe_switch" / "adapter").adapters[0].as_loaded}
    assert not by["mlx-lm-2024-06"].same and "LoRASwitchLinear" in by["mlx-lm-2024-06"].detail


def test_router_lora_into_mlx_only_where_mlx_lm_routes_by_a_linear(tmp_path):
    """qwen2moe_all_last1's PEFT equivalent adapts the router (mlp.gate.weight): mlx-lm's qwen2_moe router is an
    nn.Linear (the golden loads it), glm4_moe's a MoEGate, on which mlx-lm 0.32.2 refuses LoRA."""
    src = GOLD / "qwen2moe_all_last1" / "peft_equivalent"
    r = api.convert(src, tmp_path / "ok", to="mlx-lm", model_type="qwen2_moe")
    assert r.ok and "mlp.gate" in json.loads((tmp_path / "ok" / "adapter_config.json").read_text())[
        "lora_parameters"]["keys"]
    with pytest.raises(UnsupportedFeature, match="MoEGate"):
        api.convert(src, tmp_path / "refused", to="mlx-lm", model_type="glm4_moe")


def test_glm4_first_dense_blocks_take_the_moe_keys_they_lack(tmp_path):
    """peft_glm4moe: block 0 is dense (q/v only), block 1 MoE (q/v + experts). mlx-lm applies one keys list to
    every block and skips the paths a block lacks (the proven equivalent loads so); for a type without dense first
    blocks the same adapter is refused as uneven."""
    src = GOLD / "peft_glm4moe" / "adapter"
    r = api.convert(src, tmp_path / "glm", to="mlx-lm", model_type="glm4_moe")
    assert r.ok and json.loads((tmp_path / "glm" / "adapter_config.json").read_text())["num_layers"] == 2
    with pytest.raises(UnsupportedFeature, match="one set of lora_parameters.keys"):
        api.convert(src, tmp_path / "qwen3", to="mlx-lm", model_type="qwen3_moe")


def _rename(src, dst, old, new):
    """A copy of an mlx-lm adapter folder with one module path renamed (keys and config)."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    w = load_file(str(src / "adapters.safetensors"))
    save_file({k.replace(old, new): v for k, v in w.items()}, str(dst / "adapters.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = [k.replace(old, new) for k in cfg["lora_parameters"]["keys"]]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_peft_refuses_linears_it_would_retarget_to_the_experts(tmp_path):
    """glm4moe_switch with its q_proj LoRA moved onto the shared expert's down_proj (same shape family: a Linear
    named down_proj): peft 0.21.2 turns `…shared_experts.down_proj` into target_parameters `down_proj` on this type
    (golden probe), so writing it for PEFT is refused; for qwen2_moe (not rewritten by peft) it is written."""
    src = _rename(GOLD / "glm4moe_switch" / "adapter", tmp_path / "src", "self_attn.q_proj",
                  "mlp.shared_experts.down_proj")
    with pytest.raises(UnsupportedFeature, match="peft ≥ 0.19 rewrites"):
        api.convert(src, tmp_path / "out", to="peft", model_type="glm4_moe")
    assert api.convert(src, tmp_path / "ok", to="peft", model_type="qwen2_moe").ok
    with pytest.raises(UnsupportedFeature, match="depends on the model type"):  # no type, and experts: ask
        api.convert(src, tmp_path / "unknown", to="peft")


def test_inspect_a_0_20_file_with_more_blocks_than_num_layers():
    """mlx-lm 0.20.6 saved both blocks for num_layers 1 (layers[-min(n, 0):]); 0.32.2 refuses that file as it is
    (golden mlxlm0206/llama_dora, measured), which inspect must say; num_layers -1 loads."""
    old = GOLD.parent / "mlxlm0206"
    by = {c.convention: c for c in api.inspect(old / "llama_dora" / "adapter").adapters[0].as_loaded}
    assert not by["mlx-lm"].same and "incompatible tensors" in by["mlx-lm"].detail
    by = {c.convention: c for c in api.inspect(old / "llama_all_minus1" / "adapter").adapters[0].as_loaded}
    assert "incompatible" not in by["mlx-lm"].detail
