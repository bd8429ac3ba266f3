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

GOLD = Path(__file__).resolve().parents[3] / "golden" / "mlx" / "mlxlm0322"
MLX_WRITTEN = {"qwen2moe_switch": "qwen2_moe", "mixtral_switch": "mixtral", "qwen2moe_all_last1": "qwen2_moe"}
PEFT_WRITTEN = {"peft_qwen2moe": "qwen2_moe", "peft_mixtral_rslora": "mixtral", "peft_qwen2moe_down": "qwen2_moe",
                "peft_qwen2moe_gateup": "qwen2_moe"}


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
    assert api.convert(GOLD / case / "adapter", out, to="peft").ok
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
