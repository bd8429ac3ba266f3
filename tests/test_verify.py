import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_migrate.adapter import FusedQKV, ModuleDelta, ScaleProvenance
from lora_migrate.check.compare import compare, verify
from lora_migrate.check.report import ModuleCheck, VerifyReport, build_report, extra, missing, tolerance_for

from .builders import dense, make_adapter

F32_TOL = 4 * 2.0**-24
BF16_TOL = 4 * 2.0**-8


def mk(A, B, scale=1.0, module="m", **kw) -> ModuleDelta:
    r = A.shape[0] if A is not None else 1
    return ModuleDelta(module=module, A=A, B=B, scale=scale, provenance=ScaleProvenance(None, r, "test", "test"), **kw)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def lora(out=12, inn=10, r=4, seed=0, dtype=torch.float32, scale=2.0, **kw):
    return mk(rand(r, inn, seed=seed, dtype=dtype), rand(out, r, seed=seed + 1000, dtype=dtype), scale, **kw)


# ------------------------------------------------------------------------------------------------ tolerance


def test_tolerance_for():
    assert tolerance_for(torch.float32) == F32_TOL
    assert tolerance_for(torch.float16) == 4 * 2.0**-11
    assert tolerance_for(torch.bfloat16) == BF16_TOL
    assert tolerance_for(torch.float64) == 1e-12
    assert tolerance_for(torch.float32, torch.bfloat16, torch.float64) == BF16_TOL  # coarsest wins
    assert tolerance_for(torch.float8_e4m3fn) == 4 * 2.0**-4
    assert tolerance_for(torch.float8_e5m2) == 4 * 2.0**-3
    assert tolerance_for() == F32_TOL
    assert tolerance_for(torch.int64) == F32_TOL


# ------------------------------------------------------------------------------------------------ LoRA


def test_identical_is_exactly_zero():
    d = lora()
    for out in (d, mk(d.A.clone(), d.B.clone(), d.scale)):
        c = compare(d, out)
        assert c.status == "ok" and c.ok
        assert c.rel_fro == 0.0 and c.rel_probe == 0.0 and c.rel_bias is None
        assert c.tolerance == F32_TOL
        # identical factors are an exact proof: no norm is computed at all
        assert c.norm is None and c.detail == "exact: A identical, B' = B"
    # a rescale that rounds is not exact: the norm then comes from a float32 Gram form (only the denominator)
    c = compare(d, mk(d.A, (d.B.double() * 3).float(), d.scale / 3))
    assert c.ok and not c.detail.startswith("exact") and 0 < c.rel_fro < F32_TOL
    assert math.isclose(c.norm, torch.linalg.matrix_norm(dense(d)).item(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1.0, 2.0, 0.25, 64.0])
def test_power_of_two_rescale_is_proven_exact(dtype, c):
    d = lora()
    d = mk(d.A.to(dtype), d.B.to(dtype), d.scale)
    out = mk(d.A, (d.B.double() * c).to(dtype), d.scale / c)
    chk = compare(d, out)
    assert chk.ok and chk.rel_fro == 0.0 and chk.detail.startswith("exact")
    # one element off by one ulp: no longer exact, and measured (not claimed) instead
    B = out.B.clone()
    B.view(-1)[3] = torch.nextafter(B.view(-1)[3], torch.tensor(float("inf"), dtype=dtype))
    chk = compare(d, mk(d.A, B, out.scale))
    assert not chk.detail.startswith("exact") and chk.rel_fro > 0
    # a rescale that underflows or overflows is not exact either
    tiny = mk(d.A, d.B * torch.finfo(dtype).tiny, d.scale)
    down = mk(d.A, (tiny.B.double() / 2**60).to(dtype), d.scale * 2**60)
    assert not compare(tiny, down).detail.startswith("exact")
    big = mk(d.A, d.B * (torch.finfo(dtype).max / 4), d.scale)
    up = mk(d.A, (big.B.double() * 2**10).to(dtype), d.scale / 2**10)
    assert not compare(big, up).ok


@pytest.mark.parametrize("finite_source", [False, True])  # True: the source is not scanned again, the output is
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_claim_in_native_dtype_agrees_with_float64_for_every_value(dtype, finite_source):
    """The exact test runs in fp16/bf16 itself; over every finite value it claims exact iff float64 says so."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[every.isfinite()]
    A = torch.ones(1, 1, dtype=dtype)
    for c in (2.0, 8.0, 2.0**20, 0.5, 2.0**-7):
        for part in every.split(4096):  # slices with and without overflow / underflow of c·B
            B1 = part.reshape(-1, 1)
            B2 = (B1.double() * c).to(dtype)
            truth = bool(B2.isfinite().all()) and torch.equal(B2.double(), B1.double() * c)
            claim = compare(mk(A, B1, c), mk(A, B2, 1.0), finite_source=finite_source).detail.startswith("exact")
            assert claim == truth, (dtype, c, part[0].item())
    B1 = every[(every.abs() < 1000) & (every.abs() > 1e-3)].reshape(-1, 1)
    B2 = B1 * 4
    assert compare(mk(A, B1, 4.0), mk(A, B2, 1.0)).detail.startswith("exact")
    for i in (0, B2.shape[0] // 2, B2.shape[0] - 1):  # any single element one ulp off
        B3 = B2.clone()
        B3[i] = torch.nextafter(B3[i], torch.tensor(float("inf"), dtype=dtype))
        assert not compare(mk(A, B1, 4.0), mk(A, B3, 1.0)).detail.startswith("exact")


@settings(max_examples=150, deadline=None)
@given(
    out=st.integers(1, 20),
    inn=st.integers(1, 20),
    r1=st.integers(1, 7),
    r2=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    s1=st.floats(0.05, 20),
    s2=st.floats(0.05, 20),
    share=st.sampled_from(["none", "A", "B"]),
    eps=st.sampled_from([0.0, 1e-9, 1e-6, 1e-3, 1.0]),
)
def test_factored_gram_matches_dense_reference(out, inn, r1, r2, seed, s1, s2, share, eps):
    A1, B1 = rand(r1, inn, seed=seed, dtype=torch.float64), rand(out, r1, seed=seed + 1, dtype=torch.float64)
    A2, B2 = rand(r2, inn, seed=seed + 2, dtype=torch.float64), rand(out, r2, seed=seed + 3, dtype=torch.float64)
    if share == "A":
        A2, B2 = A1, B1 * (s1 / s2) + eps * rand(out, r1, seed=seed + 4, dtype=torch.float64)
    elif share == "B":
        B2, A2 = B1, A1 * (s1 / s2) + eps * rand(r1, inn, seed=seed + 4, dtype=torch.float64)
    src, o = mk(A1, B1, s1), mk(A2, B2, s2)
    c = compare(src, o)
    S, O = dense(src), dense(o)
    ref_norm = torch.linalg.matrix_norm(S).item()
    ref_rel = (torch.linalg.matrix_norm(S - O) / ref_norm).item()
    ref_probe_x = torch.randn(inn, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_probe = ((S - O) @ ref_probe_x).norm(dim=0) / (S @ ref_probe_x).norm(dim=0)
    if c.detail.startswith("exact"):  # proven equal without a norm: the dense reference must agree
        assert c.norm is None and c.rel_fro == 0.0 and ref_rel <= 1e-15
        return
    assert math.isclose(c.norm, ref_norm, rel_tol=1e-12)
    # the distance, in units of ‖ΔW_src‖, agrees with brute force to 1e-12 (relatively, where it is large)
    assert abs(c.rel_fro - ref_rel) <= 1e-12 * max(1.0, ref_rel)
    assert abs(c.rel_probe - ref_probe.max().item()) <= 1e-12 * max(1.0, ref_probe.max().item())


def test_scale_moved_into_B():
    d = lora(scale=0.75)
    c = compare(d, mk(d.A, d.B * 2, 0.375))
    assert c.ok and c.rel_fro <= 1e-15 and c.rel_probe <= 1e-15


def test_scale_folded_into_A():
    d = lora(scale=3.0)
    c = compare(d, mk(d.A * 3, d.B, 1.0))  # one fp32 rounding per element of A
    assert c.ok and c.rel_fro < F32_TOL / 4


def test_zero_padded_rank():
    d = lora(r=4)
    A = torch.cat([d.A, rand(3, d.A.shape[1], seed=7)])  # arbitrary rows where B is zero
    B = torch.cat([d.B, torch.zeros(d.B.shape[0], 3)], 1)
    c = compare(d, mk(A, B, d.scale))
    assert c.ok and c.rel_fro <= 1e-15
    assert compare(mk(A, B, d.scale), d).ok  # and the other way round


def test_added_and_subtracted_term_is_the_same_delta():
    d = lora(out=16, inn=24, r=4)
    A0, B0 = rand(5, 24, seed=11) * 10, rand(16, 5, seed=12) * 10  # larger than the delta itself
    A = torch.cat([d.A, A0, A0])
    B = torch.cat([d.B, B0, -B0], 1)
    c = compare(d, mk(A, B, d.scale))
    assert c.ok and c.rel_fro <= 1e-13 and c.rel_probe <= 1e-13
    # dropping one of the two copies is caught
    bad = compare(d, mk(torch.cat([d.A, A0]), torch.cat([d.B, B0], 1), d.scale))
    assert not bad.ok and bad.status == "mismatch"


def test_float64_rotation_passes_the_float64_tolerance():
    # ΔW = (B Q)(Qᵀ A) with Q orthogonal: exact math, float64 rounding only. The literal Gram sum
    # tr((BsᵀBs)(AsAsᵀ)) cannot resolve this (floor ~1e-8 > 1e-12); the factored form must.
    d = lora(out=64, inn=48, r=8, dtype=torch.float64)
    Q, _ = torch.linalg.qr(rand(8, 8, seed=5, dtype=torch.float64))
    c = compare(d, mk(Q.T @ d.A, d.B @ Q, d.scale))
    assert c.tolerance == 1e-12
    assert c.ok and c.rel_fro < 1e-14, c


def test_fused_qkv_compact_vs_expanded():
    E, r, inn = 6, 3, 10
    A = rand(2 * r, inn, seed=1)
    B = rand(2 * E, r, seed=2)
    fused = mk(A, B, 0.5, fused=FusedQKV((0, 2)))
    A_full, B_full = fused.factors()
    plain = mk(A_full, B_full, 0.5)
    assert B_full.shape == (3 * E, 2 * r)
    assert compare(fused, plain).ok and compare(fused, plain).rel_fro == 0.0
    assert compare(plain, fused).ok
    # the same compact tensors on the wrong thirds are a different delta
    wrong = compare(fused, mk(A, B, 0.5, fused=FusedQKV((0, 1))))
    assert not wrong.ok and wrong.rel_fro > 0.5


@pytest.mark.parametrize("factor", [50.0, 1 / 50])
def test_single_element_perturbation(factor):
    d = lora(out=32, inn=40, r=4)
    norm = torch.linalg.matrix_norm(dense(d)).item()
    delta = factor * F32_TOL * norm / d.scale
    # ΔW_out = ΔW_src + delta·e_i e_jᵀ, written as one more rank
    e_i = torch.zeros(32, 1)
    e_i[5, 0] = 1
    e_j = torch.zeros(1, 40)
    e_j[0, 17] = delta
    c = compare(d, mk(torch.cat([d.A, e_j]), torch.cat([d.B, e_i], 1), d.scale))
    assert math.isclose(c.rel_fro, factor * F32_TOL, rel_tol=1e-6)
    if factor > 1:
        assert not c.ok and c.status == "mismatch"
        assert c.rel_fro > c.tolerance and c.rel_probe > c.tolerance
        assert "Frobenius" in c.detail and "probes" in c.detail
    else:
        assert c.ok and c.rel_probe < c.tolerance


def test_perturbing_one_factor_element_fails_both_metrics():
    d = lora(out=32, inn=40, r=4)
    B = d.B.clone()
    B[3, 1] *= 1 + 1e-4
    c = compare(d, mk(d.A, B, d.scale))
    assert c.rel_fro > 10 * F32_TOL and c.rel_probe > 10 * F32_TOL and not c.ok


def test_bf16_fold_passes_bf16_tolerance_but_scale_error_fails_fp32():
    d = lora(out=64, inn=64, r=8, dtype=torch.bfloat16, scale=32 / 24)
    folded = mk(d.A, (d.scale * d.B.double()).to(torch.bfloat16), 1.0)  # one bf16 rounding per element
    c = compare(d, folded)
    assert c.tolerance == BF16_TOL
    assert c.ok and 0 < c.rel_fro < BF16_TOL / 2
    # the same rounding error would not pass an fp32 comparison
    d32 = mk(d.A.float(), d.B.float(), d.scale)
    assert not compare(d32, mk(folded.A.float(), folded.B.float(), 1.0)).ok
    # and a 1 % scale error fails fp32 with a clear message
    bad = compare(d32, mk(d32.A, d32.B, d.scale * 1.01))
    assert not bad.ok and math.isclose(bad.rel_fro, 0.01, rel_tol=1e-6)
    assert math.isclose(bad.rel_probe, 0.01, rel_tol=1e-6)
    assert "scales 1.33333 / 1.34667" in bad.detail


def test_ranks_may_differ_in_detail_of_failure():
    d = lora(r=4)
    c = compare(d, lora(r=6, seed=3))
    assert not c.ok and "ranks 4 / 6" in c.detail


# ------------------------------------------------------------------------------------------------ zero deltas


def test_zero_deltas():
    A1, A2 = rand(4, 10, seed=1), rand(6, 10, seed=2)
    z1, z2 = mk(A1, torch.zeros(12, 4), 2.0), mk(A2, torch.zeros(12, 6), 1.0)
    c = compare(z1, z2)
    assert c.ok and c.norm == 0.0 and c.rel_fro == 0.0 and c.rel_probe == 0.0
    assert "zero" in c.detail
    nonzero = lora(out=12, inn=10, r=4)
    bad = compare(z1, nonzero)
    assert not bad.ok and bad.rel_fro > 0.1 and bad.rel_probe > 0.1
    bad = compare(nonzero, z1)
    assert not bad.ok and bad.rel_fro == 1.0 and bad.rel_probe == 1.0


def test_zero_rank():
    z = mk(torch.zeros(0, 10), torch.zeros(12, 0))
    assert compare(z, z).ok
    assert not compare(z, lora(out=12, inn=10)).ok


# ------------------------------------------------------------------------------------------------ shapes, kinds


def test_shape_mismatch():
    d = lora(out=12, inn=10)
    for other in (lora(out=12, inn=11), lora(out=13, inn=10)):
        c = compare(d, other)
        assert c.status == "shape_mismatch" and not c.ok and c.rel_fro is None
        assert "12×10" in c.detail
    c = compare(d, mk(None, d.B))
    assert c.status == "shape_mismatch" and "without A" in c.detail
    c = compare(d, mk(rand(3, 10), rand(12, 4)))
    assert c.status == "shape_mismatch" and "inner" in c.detail


def test_kind_mismatch():
    c = compare(lora(), mk(None, torch.ones(12, 1), kind="ia3"))
    assert c.status == "shape_mismatch" and "kind lora" in c.detail and "ia3" in c.detail


def test_ia3():
    l = rand(12, 1, seed=4) + 1
    src = mk(None, l, 2.0, kind="ia3")
    assert compare(src, mk(None, l * 2, 1.0, kind="ia3")).rel_fro == 0.0
    c = compare(src, mk(None, l.reshape(-1) * 2, 1.0, kind="ia3"))  # (out,) vs (out, 1) storage
    assert c.ok and c.norm == pytest.approx(2 * l.double().norm().item())
    folded = mk(None, (l.double() * 1.1).bfloat16(), 1.0, kind="ia3")
    c = compare(mk(None, l.bfloat16(), 1.1, kind="ia3"), folded)
    assert c.ok and c.tolerance == BF16_TOL
    bad = compare(src, mk(None, l, 2.02, kind="ia3"))
    assert not bad.ok and math.isclose(bad.rel_fro, 0.01, rel_tol=1e-6)
    assert math.isclose(bad.rel_probe, 0.01, rel_tol=1e-6)
    assert compare(src, mk(None, torch.ones(13, 1), kind="ia3")).status == "shape_mismatch"


# ------------------------------------------------------------------------------------------------ bias


def test_bias_scaled_like_the_delta():
    d = lora(scale=4.0)
    b = rand(12, seed=9)
    c = compare(d.replace(bias=b), mk(d.A, d.B * 4, 1.0, bias=b * 4))
    assert c.ok and c.rel_bias == 0.0
    bad = compare(d.replace(bias=b), mk(d.A, d.B * 4, 1.0, bias=b))  # bias scale forgotten
    assert not bad.ok and bad.rel_fro == 0.0 and bad.rel_bias == pytest.approx(0.75)
    assert "bias" in bad.detail


def test_bias_missing_on_one_side():
    d = lora()
    zero = d.replace(bias=torch.zeros(12))
    c = compare(d, zero)
    assert c.ok and c.rel_bias == 0.0 and "no bias in source" in c.detail
    assert compare(zero, d).ok
    nz = d.replace(bias=rand(12, seed=3))
    assert not compare(d, nz).ok and compare(d, nz).rel_bias == 1.0
    assert not compare(nz, d).ok and compare(nz, d).rel_bias == 1.0
    c = compare(d, d.replace(bias=torch.zeros(11)))
    assert c.status == "shape_mismatch" and "bias" in c.detail


# ------------------------------------------------------------------------------------------------ misc


def test_non_finite_fails():
    d = lora()
    B = d.B.clone()
    B[0, 0] = float("nan")
    c = compare(d, mk(d.A, B, d.scale))
    assert not c.ok and c.rel_fro == float("inf")


def test_probes_are_seeded():
    d, o = lora(), lora(seed=5)
    assert compare(d, o, seed=3) == compare(d, o, seed=3)
    assert compare(d, o, probes=0).rel_probe == 0.0


# ------------------------------------------------------------------------------------------------ report


def test_report_ok():
    checks = [compare(lora(module=f"m{i}", seed=i), lora(module=f"m{i}", seed=i)) for i in range(3)]
    r = build_report(checks, 0.25)
    assert r.ok and r.n_modules == 3 and r.n_failed == 0 and r.failures() == []
    assert r.tolerance == F32_TOL and r.seconds == 0.25
    assert r.summary() == "3 modules, max relative error 0 (Frobenius) / 0 (probes), tolerance 2.4e-07: OK"


def test_report_failures():
    d = lora(module="a")
    checks = [
        compare(d, d),
        compare(d, mk(d.A, d.B, d.scale * 1.5, module="a")),
        missing("b"),
        missing(lora(module="c", dtype=torch.float64)),
        extra("d"),
    ]
    r = build_report(checks, 1.0)
    assert not r.ok and r.n_modules == 5 and r.n_failed == 4
    assert [m.module for m in r.failures()] == ["a", "b", "c", "d"]
    assert r.max_rel_fro == pytest.approx(0.5) and r.max_rel_probe == pytest.approx(0.5)
    assert r.tolerance == F32_TOL  # from compared modules only
    s = r.summary()
    assert s.startswith("5 modules, max relative error 0.5 (Frobenius) / 0.5 (probes), tolerance 2.4e-07: FAILED")
    assert "4 of 5" in s and "2 missing_in_output" in s and "1 extra_in_output" in s and "1 mismatch" in s
    assert checks[3].tolerance == 1e-12 and checks[3].module == "c"
    # round trip through JSON, including an infinite error
    r2 = build_report([*checks, ModuleCheck(module="x", status="mismatch", rel_fro=float("inf"), tolerance=1.0,
                                            ok=False)], 1.0)
    back = VerifyReport.model_validate(json.loads(r2.model_dump_json()))
    assert back.max_rel_fro == float("inf") and back == r2


def test_empty_report_is_not_ok():
    r = build_report([], 0.0)
    assert not r.ok and r.n_modules == 0 and "nothing was compared" in r.summary()


def test_verify_matches_by_name():
    src = [lora(module="a", seed=1), lora(module="b", seed=2), lora(module="c", seed=3)]
    out = [lora(module="b", seed=2), lora(module="a", seed=1), lora(module="z", seed=4)]
    r = verify(src, out)
    assert [(m.module, m.status) for m in r.modules] == [
        ("a", "ok"), ("b", "ok"), ("c", "missing_in_output"), ("z", "extra_in_output")
    ]
    assert verify({d.module: d for d in src}, src).ok
    with pytest.raises(ValueError, match="twice"):
        verify(src + src[:1], out)


def test_dora_magnitude_must_be_carried_over_bit_for_bit():
    A, B, m = rand(4, 8), rand(6, 4, seed=1), rand(6, seed=2)
    assert compare(mk(A, B, magnitude=m), mk(A, B, magnitude=m.clone())).ok
    bumped = m.clone()
    bumped[0] = torch.nextafter(bumped[0], torch.tensor(2.0))
    for out in (mk(A, B, magnitude=bumped), mk(A, B)):
        c = compare(mk(A, B, magnitude=m), out)
        assert not c.ok and "magnitude" in c.detail


@pytest.mark.parametrize("alpha", [2.0231436903402713e26, 1e-30])
def test_a_huge_or_tiny_scale_is_checked_without_overflow(alpha, tmp_path):
    """Found by test_bad_inputs' config fuzzing: alpha = 2e26 folds s = alpha/r ≈ 5e25 into B; the check's float32
    quadratic form squared that to inf and reported a mismatch (exit 1) for an exact conversion. It now scales by
    a power of two first."""
    from lora_migrate import api

    src = make_adapter(tmp_path / "src", config={"alpha": alpha})
    r = api.convert(src, tmp_path / "out", to="adapters-1.0")
    assert r.ok and all(a.verify.max_rel_fro <= a.verify.tolerance for a in r.adapters)


@pytest.mark.parametrize("alpha,what", [(4e39, "overflows"), (2.4e-181, "underflows")])
def test_a_scale_the_dtype_cannot_hold_is_refused(alpha, what, tmp_path):
    """Folded into float32 B, alpha/r = 1e39 gives Inf and 6e-182 gives zeros (found by test_bad_inputs' config
    fuzzing: a check failure, exit 1): refused, one line, exit 2, nothing written."""
    from click.testing import CliRunner

    from lora_migrate.cli import main
    src = make_adapter(tmp_path / "src", config={"alpha": alpha})
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--to", "adapters-1.0"])
    assert r.exit_code == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
