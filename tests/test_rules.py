"""Each rule's docstring identity, on tiny random tensors."""

import math

import pytest
import torch

from lora_migrate.adapter import FusedQKV, ModuleDelta, ScaleProvenance
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.rules import RULES, describe
from lora_migrate.rules.keys import reprefix
from lora_migrate.rules.refuse import refuse_gated, refuse_kinds
from lora_migrate.rules.scale import choose_alpha, fold_scale, rescale
from lora_migrate.rules.select import select_adapters
from lora_migrate.schemas import get_convention

P = ScaleProvenance(alpha=16, r=8, rule="alpha/r", convention="test")


def delta(dtype=torch.float32, kind="lora", bias=False, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ia3":
        return ModuleDelta("m", B=torch.randn(6, 1, generator=g).to(dtype), scale=scale, provenance=P, kind="ia3")
    return ModuleDelta("m", A=torch.randn(4, 5, generator=g).to(dtype), B=torch.randn(6, 4, generator=g).to(dtype),
                       scale=scale, provenance=P, bias=torch.randn(6, generator=g).to(dtype) if bias else None)


def dense(d):
    A, B = d.factors()
    return d.scale * (B.double() @ A.double())


def test_every_rule_documents_its_math():
    for name in RULES:
        assert len(describe(name)) > 20, name


@pytest.mark.parametrize("target", [1.0, 0.5, 3.0, 1 / math.sqrt(8)])
def test_rescale_keeps_delta_w_and_bias(target):
    d = delta(bias=True)
    e = rescale(d, target, P)
    assert e.scale == target
    assert torch.equal(e.A, d.A)  # A is never touched
    torch.testing.assert_close(dense(e), dense(d), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.scale * e.bias.double(), d.scale * d.bias.double(), rtol=1e-6, atol=1e-7)


def test_fold_is_rescale_to_one_and_exact_for_powers_of_two():
    d = delta(scale=2.0)
    e = fold_scale(d, P)
    assert e.scale == 1.0 and torch.equal(e.B, d.B * 2)  # ×2 is exact in binary floating point


def test_rescale_rounds_once_into_the_factor_dtype():
    d = delta(dtype=torch.bfloat16, scale=3.0)
    e = rescale(d, 1.0, P)
    assert e.B.dtype == torch.bfloat16
    assert torch.equal(e.B, (d.B.double() * 3.0).to(torch.bfloat16))


def test_rescale_identity_keeps_factors_bit_for_bit():
    d = delta(scale=2.0)
    e = rescale(d, 2.0 * (1 + 1e-14), P)
    assert e.B is d.B


def test_rescale_ia3_scales_the_vector():
    d = delta(kind="ia3", scale=2.0)
    e = rescale(d, 1.0, P)
    torch.testing.assert_close(e.scale * e.B, d.scale * d.B)


def test_rescale_refuses_zero_target():
    with pytest.raises(UnsupportedFeature):
        rescale(delta(), 0.0, P)


def test_fused_expand_places_blocks_in_qkv_thirds():
    # q and v enabled, r=2, E=3: the expanded product equals the per-group products in rows of thirds 0 and 2
    A = torch.randn(4, 5)
    B = torch.randn(6, 2)
    d = ModuleDelta("c_attn", A=A, B=B, scale=1.0, provenance=P, fused=FusedQKV((0, 2)))
    W = dense(d)
    assert W.shape == (9, 5)
    torch.testing.assert_close(W[0:3], B[0:3].double() @ A[0:2].double())
    torch.testing.assert_close(W[3:6], torch.zeros(3, 5, dtype=torch.float64))
    torch.testing.assert_close(W[6:9], B[3:6].double() @ A[2:4].double())


def test_choose_alpha_for_adapters_1_0_writes_alpha_equal_r():
    alpha, t = choose_alpha([("linear", 2.0, 8)], get_convention("adapters-1.0"), 16.0, 8)
    assert alpha == 8 and t == {"linear": 1.0}


def test_choose_alpha_keeps_source_alpha_when_it_expresses_every_scale():
    alpha, t = choose_alpha([("linear", 2.0, 8)], get_convention("adapters-1.1"), 16.0, 8)
    assert alpha == 16 and t == {"linear": 2.0}


def test_choose_alpha_mixed_scales_keeps_the_majority():
    # adapters 1.0 GPT-2: c_attn alpha/r = 4, c_fc / c_proj 1.0 (two modules each layer)
    mods = [("fused_qkv", 4.0, 8), ("linear", 1.0, 8), ("linear", 1.0, 8)]
    alpha, t = choose_alpha(mods, get_convention("adapters-1.1"), 32.0, 8)
    assert alpha == 8 and t == {"fused_qkv": 1.0, "linear": 1.0}


def test_select_adapters():
    assert select_adapters(["m1", "m2"], None) == ["m1", "m2"]
    assert select_adapters(["m1", "m2"], "m2") == ["m2"]
    with pytest.raises(LoraMigrateError, match="holds m1, m2"):
        select_adapters(["m1", "m2"], "m3")


def test_reprefix():
    d = delta().replace(module="transformer.encoder.block.0.q")
    assert reprefix(d, "transformer.", "").module == "encoder.block.0.q"
    with pytest.raises(LoraMigrateError):
        reprefix(d, "model.", "")


def test_refusals_say_why():
    with pytest.raises(UnsupportedFeature, match="gate replaces alpha/r"):
        refuse_gated("m1", True)
    refuse_gated("m1", False)
    refuse_kinds("m1", {"linear", "ia3"}, get_convention("adapters-1.1"))
