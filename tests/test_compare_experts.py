"""The check on stacked-experts deltas (A (E, r, in), B (E, out, r)): each expert is its own ΔW_e = s·B[e]@A[e]."""

from __future__ import annotations

import torch

from lora_migrate.adapter import ModuleDelta, ScaleProvenance
from lora_migrate.check.compare import compare
from lora_migrate.rules.scale import rescale
from lora_migrate.rules.shape import pad_rank

P = ScaleProvenance(alpha=4.0, r=2, rule="alpha/r", convention="test")


def experts(E=5, r=2, i=12, o=10, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return ModuleDelta(module="m.experts.down_proj", A=torch.randn(E, r, i, generator=g),
                       B=torch.randn(E, o, r, generator=g), scale=scale, provenance=P, kind="experts")


def test_rescaled_and_padded_stack_passes_expert_by_expert():
    d = experts()
    out = pad_rank(rescale(d, 0.7, P), 4)  # B·(2/0.7) rounded once, two zero ranks per expert
    assert out.A.shape == (5, 4, 12) and out.B.shape == (5, 10, 4)
    c = compare(d, out)
    assert c.ok and 0 < c.rel_fro < 1e-6 and "experts differ" not in c.detail


def test_exact_copy_is_proven_at_once():
    d = experts()
    assert compare(d, d.replace(A=d.A.clone(), B=d.B.clone())).detail.startswith("exact")


def test_one_wrong_expert_fails_the_module_and_is_named():
    d = experts()
    B = d.B.clone()
    B[3] *= 1.001  # a relative error far above float32's tolerance, in one expert only
    c = compare(d, d.replace(B=B))
    assert not c.ok and "1 of 5 experts differ" in c.detail and "[3]" in c.detail


def test_experts_swapped_fail():
    """The stack's norm is unchanged by a permutation of experts; each expert's ΔW is not."""
    d = experts()
    perm = torch.tensor([1, 0, 2, 3, 4])
    c = compare(d, d.replace(A=d.A[perm], B=d.B[perm]))
    assert not c.ok and "2 of 5 experts differ" in c.detail


def test_shape_and_count_mismatch():
    d = experts()
    assert compare(d, experts(E=4)).status == "shape_mismatch"
    flat = d.replace(A=d.A.reshape(-1, 12), B=d.B.permute(1, 2, 0).reshape(10, -1))  # PEFT's stored layout
    assert compare(d, flat).status == "shape_mismatch"
