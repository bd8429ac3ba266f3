"""Init rules: rebuild the initial adapter (A₀, B₀) of a PiSSA / OLoRA adapter from the original base weight W.

Both follow peft 0.21.2 ``tuners/lora/layer.py`` (``pissa_init``, ``olora_init``) operation for operation, in
float32, so that on the same torch the factors are PEFT's own. They return float32 factors in the
``nn.Linear`` layout of the canonical form, A₀: (r, in), B₀: (out, r), such that PEFT's init replaced W by the
residual W − s·B₀A₀ (in that layout). The caller rounds them as PEFT stores them (see ``initial.py``); the rank-2r
re-expression is then :func:`rules.shape.pissa_to_lora`, unchanged.
"""

from __future__ import annotations

import torch

from ..adapter import ModuleDelta
from ..errors import LoraMigrateError
from .registry import rule


def _fp32_linear(W: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """W as float32 in the (out, in) layout: GPT-2 ``Conv1D`` stores (in, out) (fan_in_fan_out)."""
    W = W.to(torch.float32)
    return W.T if fan_in_fan_out else W


def _check_rank(module: str, W: torch.Tensor, r: int) -> None:
    if r > min(W.shape):
        raise LoraMigrateError(f"{module}: rank {r} is larger than the base weight {list(W.shape)} allows")


@rule("rebuild_pissa_init")
def rebuild_pissa_init(W: torch.Tensor, r: int, scale: float, *, fan_in_fan_out: bool = False,
                       module: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: W = V·diag(S)·Uh (float32, (out, in)), A₀ = diag(√(S_r/s))·Uh_r, B₀ = V_r·diag(√(S_r/s)).

    The SVD is full (``torch.linalg.svd``), of W after the fan_in_fan_out transpose; S_r = S[:r], Uh_r = Uh[:r]
    (r, in), V_r = V[:, :r] (out, r). So s·B₀A₀ = V_r·diag(S_r)·Uh_r is the rank-r truncation of W, whatever the
    signs of the singular vectors.

    peft ``pissa_init`` with init_lora_weights="pissa"; s is the module's scale (alpha/r, or alpha/√r with
    use_rslora, per module from the rank/alpha patterns). "pissa_niter_N" (randomized svd_lowrank) cannot be
    rebuilt and is not handled here.
    """
    Wl = _fp32_linear(W, fan_in_fan_out)
    _check_rank(module, Wl, r)
    V, S, Uh = torch.linalg.svd(Wl, full_matrices=False)
    Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    Sr = Sr / scale
    A0 = torch.diag(torch.sqrt(Sr)) @ Uhr
    B0 = Vr @ torch.diag(torch.sqrt(Sr))
    return A0, B0


@rule("rebuild_olora_init")
def rebuild_olora_init(W: torch.Tensor, r: int, scale: float, *, fan_in_fan_out: bool = False,
                       module: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA: Q, R = qr(W as stored, float32), A₀ = R_r, B₀ = Q_r; with fan_in_fan_out A₀ = Q_rᵀ, B₀ = R_rᵀ.

    Q_r = Q[:, :r], R_r = R[:r]; PEFT does no fan_in_fan_out transpose here and no 1/s. It sets lora_A = R_r,
    lora_B = Q_r and the stored weight to W − s·Q_r·R_r.

    Plain layers: A₀ = R_r (r, in), B₀ = Q_r (out, r), and s·B₀A₀ = s·Q_r·R_r.

    fan_in_fan_out (GPT-2 ``Conv1D``, W stored (in, out)): the residual is W − s·Q_r·R_r in the stored layout, so
    in the (out, in) layout the init removed s·(Q_r·R_r)ᵀ = s·R_rᵀ·Q_rᵀ: A₀ = Q_rᵀ (r, in), B₀ = R_rᵀ (out, r).
    (PEFT's own lora_A/lora_B hold R_r, Q_r there, which only fit a square layer; its init then changes the
    model's output and its path_initial_model_for_weight_conversion subtracts Q_r·R_r, not its transpose.)
    """
    Ws = W.to(torch.float32)
    _check_rank(module, Ws, r)
    Q, R = torch.linalg.qr(Ws)
    Qr, Rr = Q[:, :r], R[:r]
    if fan_in_fan_out:
        return Qr.T.contiguous(), Rr.T.contiguous()
    return Rr.contiguous(), Qr.contiguous()


@rule("olora_stored_init")
def olora_stored_init(init: ModuleDelta) -> ModuleDelta:
    """OLoRA with fan_in_fan_out, saved initial adapter (lora_A = R_r, lora_B = Q_r): A₀ = Q_rᵀ, B₀ = R_rᵀ.

    PEFT's olora_init subtracted s·Q_r·R_r from W as stored (in, out), which is s·R_rᵀ·Q_rᵀ in the (out, in) layout
    of the canonical form (see :func:`rebuild_olora_init`): the saved factors, transposed and swapped, are the ones
    the residual lacks. PEFT's own conversion uses them as they are and is off by s·(Q_r·R_r − (Q_r·R_r)ᵀ).
    """
    return init.replace(A=init.B.T.contiguous(), B=init.A.T.contiguous())
