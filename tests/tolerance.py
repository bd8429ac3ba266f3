"""One tolerance model for comparing logits, written once.

Two forward passes of the same network that differ only in how the floating-point work is done (another library's
op order, another CPU's kernels: AVX-512, AVX2 or the scalar default, MKL's code paths) disagree by rounding, and
rounding scales with the unit roundoff u of the dtype and with the magnitude of the values:

    tol(ref) = ULPS · u(dtype) · max|ref|  +  NOISE_FACTOR · noise

- ``ULPS``: how many units of rounding of the output's magnitude a tiny model's forward pass (≤ 2 layers, hidden
  ≤ 64, an adapter with entries ~N(0, 0.2²)) may accumulate. Measured on this project's goldens and live tests
  (``LORA_MIGRATE_TOL_LOG``) under ``ATEN_CPU_CAPABILITY=default``, ``=avx2``, ``=avx512`` and
  ``MKL_ENABLE_INSTRUCTIONS=AVX2``: the worst legitimate difference was 70 u·max|ref| (a PiSSA adapter on the
  residual base against its rank-2r conversion on the original base, AVX2), 58 for a golden (adapter-transformers
  3.1's T5 FFN adapter replayed by adapters 1.3.0). The smallest wrong one, a single lora_B of the pf21
  llama_plain golden off by 1e-3 relative, moved the logits by 726 u·max|ref|. 192 sits between, ~2.7× from
  the legitimate worst and ~3.8× from that smallest error.
- ``noise``: the noise floor of the comparison, measured here: the base model's logits recomputed on this machine
  against the base logits the producing library stored (0 when the reference was computed in this process).
  Whatever the machine adds to the base it adds to the adapted model too.

Teeth (tests/test_tolerance.py): one lora_B off by 1e-3 relative, or a scale off by one rsLoRA factor, fails.
"""

from __future__ import annotations

import json
import os

import torch

from lora_migrate.check.report import UNIT_ROUNDOFF as PACKAGE_UNIT_ROUNDOFF

ULPS = 192
NOISE_FACTOR = 4

UNIT_ROUNDOFF = {**PACKAGE_UNIT_ROUNDOFF, torch.float64: 2.0**-53}  # the check's table, and float64


def logits_tol(ref: torch.Tensor, *, noise: float = 0.0, dtype: torch.dtype | None = None) -> float:
    """The largest max |Δlogit| allowed against ``ref`` (computed in ``dtype``, by default ref's own)."""
    u = UNIT_ROUNDOFF[dtype or ref.dtype]
    return ULPS * u * ref.abs().max().item() + NOISE_FACTOR * noise


def max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return (got.double() - ref.double()).abs().max().item()


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor, *, noise: float = 0.0,
                        dtype: torch.dtype | None = None, what: str = "") -> float:
    """Assert max |got − ref| ≤ :func:`logits_tol`; returns the difference. With ``LORA_MIGRATE_TOL_LOG=FILE``
    every comparison is appended to FILE (one JSON line), to re-measure ``ULPS`` on another CPU."""
    diff, tol = max_diff(got, ref), logits_tol(ref, noise=noise, dtype=dtype)
    log = os.environ.get("LORA_MIGRATE_TOL_LOG")
    if log:
        u = UNIT_ROUNDOFF[dtype or ref.dtype]
        with open(log, "a") as f:
            f.write(json.dumps({"what": what or os.environ.get("PYTEST_CURRENT_TEST", "?"), "diff": diff,
                                "max_ref": ref.abs().max().item(), "noise": noise, "tol": tol,
                                "ulps": diff / (u * max(ref.abs().max().item(), 1e-30))}) + "\n")
    assert diff <= tol, f"{what}: max |Δlogit| = {diff:.3g} > tolerance {tol:.3g} (max |ref| {ref.abs().max():.3g}, " \
                        f"noise floor {noise:.3g})"
    return diff


def base_noise(base_model, inputs: dict, stored_base_logits: torch.Tensor) -> float:
    """The noise floor of a golden comparison: the stored base logits against the base recomputed here."""
    with torch.no_grad():
        got = base_model(**inputs).logits.float()
    return max_diff(got, stored_base_logits)


def this_machine() -> str:
    """The CPU and the kernel set torch uses here: where claims of bit identity with another run can hold."""
    import platform

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{platform.machine()} {model} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


SVD_ULPS = 64


def assert_rebuilt_deltas_close(mine: dict, theirs: dict, base: dict, scale: float, *, what: str = "") -> float:
    """Two PEFT state dicts whose factors came out of an SVD or QR of the base weights (PiSSA, OLoRA) compute the
    same ΔW = s·B·A per module, to the rounding of that factorisation.

    An SVD/QR is backward stable: computed on two CPUs, the truncated product U_r·S_r·V_rᵀ differs by a few units
    of rounding of ‖W‖_F, not of ‖ΔW‖ (the trained delta can be much smaller than W's top-r part it is measured
    against). So the bound is ‖ΔW_mine − ΔW_theirs‖_F ≤ SVD_ULPS · u(fp32) · s · ‖W‖_F. Measured on the pf21
    goldens against PEFT's own conversion on another machine: ≤ 9.4 u (PiSSA), ≤ 1.7 u (OLoRA). Returns the worst
    ratio in units of u."""
    u = UNIT_ROUNDOFF[torch.float32]
    assert mine.keys() == theirs.keys(), (what, sorted(set(mine) ^ set(theirs)))
    worst, checked = 0.0, 0
    for ka in mine:
        if ".lora_A." not in ka:
            continue
        kb = ka.replace(".lora_A.", ".lora_B.")
        module = ka.split(".lora_A.")[0].removeprefix("base_model.model.")
        d1 = scale * (mine[kb].double() @ mine[ka].double())
        d2 = scale * (theirs[kb].double() @ theirs[ka].double())
        ratio = ((d1 - d2).norm() / (scale * base[f"{module}.weight"].double().norm())).item() / u
        assert ratio <= SVD_ULPS, f"{what} {module}: ΔW differs by {ratio:.3g} u·s·‖W‖ > {SVD_ULPS}"
        worst, checked = max(worst, ratio), checked + 1
    assert checked, f"{what}: no LoRA module compared"
    return worst
