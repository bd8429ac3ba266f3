"""Each rule's docstring identity, on tiny random tensors."""

import math

import pytest
import torch

from lora_migrate.adapter import FusedQKV, ModuleDelta, ScaleProvenance
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.rules.refuse import refuse_gated, refuse_kinds
from lora_migrate.rules.scale import choose_alpha, rescale
from lora_migrate.rules.select import select_adapters
from lora_migrate.schemas import get_convention

from .builders import dense

P = ScaleProvenance(alpha=16, r=8, rule="alpha/r", convention="test")


def delta(dtype=torch.float32, kind="lora", bias=False, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ia3":
        return ModuleDelta("m", B=torch.randn(6, 1, generator=g).to(dtype), scale=scale, provenance=P, kind="ia3")
    return ModuleDelta("m", A=torch.randn(4, 5, generator=g).to(dtype), B=torch.randn(6, 4, generator=g).to(dtype),
                       scale=scale, provenance=P, bias=torch.randn(6, generator=g).to(dtype) if bias else None)


@pytest.mark.parametrize("target", [1.0, 0.5, 3.0, 1 / math.sqrt(8)])
def test_rescale_keeps_delta_w_and_bias(target):
    d = delta(bias=True)
    e = rescale(d, target, P)
    assert e.scale == target
    assert torch.equal(e.A, d.A)  # A is never touched
    torch.testing.assert_close(dense(e), dense(d), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.scale * e.bias.double(), d.scale * d.bias.double(), rtol=1e-6, atol=1e-7)


def test_rescale_to_one_folds_the_scale_exactly_for_powers_of_two():
    d = delta(scale=2.0)
    e = rescale(d, 1.0, P)
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


def test_refusals_say_why():
    with pytest.raises(UnsupportedFeature, match="gate replaces alpha/r"):
        refuse_gated("m1", True)
    refuse_gated("m1", False)
    refuse_kinds("m1", {"linear", "ia3"}, get_convention("adapters-1.1"))


def _truncation(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_rebuild_pissa_init_is_the_rank_r_truncation_over_s(fan_in_fan_out):
    from lora_migrate.rules.inits import rebuild_pissa_init

    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))  # (out, in)
    stored = W.T.contiguous() if fan_in_fan_out else W
    A0, B0 = rebuild_pissa_init(stored, 3, 2.5, fan_in_fan_out=fan_in_fan_out)
    assert A0.shape == (3, 5) and B0.shape == (6, 3) and A0.dtype == B0.dtype == torch.float32
    assert torch.allclose(2.5 * (B0.double() @ A0.double()), _truncation(W, 3), atol=1e-5)
    # A₀ and B₀ share the singular values equally: A₀A₀ᵀ = B₀ᵀB₀ = diag(S_r / s)
    assert torch.allclose(A0 @ A0.T, B0.T @ B0, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_rebuild_olora_init_is_what_peft_subtracts(fan_in_fan_out):
    from lora_migrate.rules.inits import rebuild_olora_init

    stored = torch.randn(5, 5 if fan_in_fan_out else 7, generator=torch.Generator().manual_seed(4))
    A0, B0 = rebuild_olora_init(stored, 2, 0.5, fan_in_fan_out=fan_in_fan_out)
    Q, R = torch.linalg.qr(stored)
    peft_removed = 0.5 * Q[:, :2] @ R[:2]  # in the stored layout: weight -= s·lora_B @ lora_A
    ours = 0.5 * B0 @ A0  # in the (out, in) layout
    assert torch.allclose(ours.T if fan_in_fan_out else ours, peft_removed, atol=1e-6)
    assert A0.shape == (2, stored.shape[0 if fan_in_fan_out else 1])


def test_olora_stored_init_turns_peft_saved_factors_into_what_the_init_removed():
    from lora_migrate.rules.inits import olora_stored_init, rebuild_olora_init

    stored = torch.randn(6, 6, generator=torch.Generator().manual_seed(5))  # Conv1D (in, out), square
    Q, R = torch.linalg.qr(stored)
    saved = ModuleDelta("m", A=R[:3].contiguous(), B=Q[:, :3].contiguous(), scale=0.5, provenance=P)  # as PEFT stores
    A0, B0 = rebuild_olora_init(stored, 3, 0.5, fan_in_fan_out=True)
    d = olora_stored_init(saved)
    assert torch.equal(d.A, A0) and torch.equal(d.B, B0) and d.scale == 0.5


def test_rebuild_refuses_a_rank_above_the_weight():
    from lora_migrate.rules.inits import rebuild_olora_init, rebuild_pissa_init

    for fn in (rebuild_pissa_init, rebuild_olora_init):
        with pytest.raises(LoraMigrateError, match="rank 5 is larger"):
            fn(torch.randn(4, 6), 5, 1.0, module="m")


def test_which_inits_mutate_and_which_can_be_rebuilt():
    from lora_migrate.schemas.peft import mutating_init, rebuild_rule

    for init in ("pissa", "pissa_niter_4", "olora", "OLoRA", "corda", "loftq", "lora_ga"):
        assert mutating_init(init), init
    for init in (True, False, None, "gaussian", "eva", "orthogonal", "mica"):
        assert not mutating_init(init), init
    assert rebuild_rule("pissa") == "rebuild_pissa_init" and rebuild_rule("OLoRA") == "rebuild_olora_init"
    for init in ("pissa_niter_4", "corda", "loftq", "lora_ga", "eva", True):
        assert rebuild_rule(init) is None, init
