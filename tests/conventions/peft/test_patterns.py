"""PEFT's rank_pattern / alpha_pattern matching, era by era, against PEFT's own code (peft.md §1.3).

- regex era (≥ 0.15): the real ``peft.utils.other.get_pattern_key`` of peft 0.21.2, on generated names and keys;
- split (0.14) and combined (0.6–0.13): the expressions those releases run, quoted from their source in
  peft.md §1.3 (the test venv cannot import two PEFT releases), including 0.13's chained-list bug (#873,
  fixed by #2195).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_migrate.codecs.peft.format import module_r_alpha, pattern_key_for

peft_other = pytest.importorskip("peft.utils.other")

R, ALPHA = 8, 16.0
SEGMENTS = ["model", "layers", "0", "1", "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "down_proj", "up_proj"]
KEYS = ["q_proj", "v_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", r"(k|v)_proj", r"layers\.0\..*",
        "mlp.down_proj", "model.layers.0.self_attn.k_proj", "proj", r"^model\.layers\.1\..*"]

names = st.lists(st.sampled_from(SEGMENTS), min_size=2, max_size=5).map(".".join)
patterns = st.dictionaries(st.sampled_from(KEYS), st.integers(1, 64), max_size=4)


def _suffix_key(keys, name):  # peft 0.6–0.14: re.match(rf".*\.{key}$", key_to_match), else the full name
    return next(filter(lambda key: re.match(rf".*\.{key}$", name), keys), name)


def peft_0_13(name, rank_pattern, alpha_pattern):
    """tuners/lora/model.py _create_and_replace, v0.6.0–v0.13.x: one chained list decides both lookups."""
    key = _suffix_key([*rank_pattern, *alpha_pattern], name)
    return rank_pattern.get(key, R), alpha_pattern.get(key, ALPHA)


def peft_0_14(name, rank_pattern, alpha_pattern):
    """v0.14.0: utils/other.py get_pattern_key, once per dict."""
    return (rank_pattern.get(_suffix_key(rank_pattern, name), R),
            alpha_pattern.get(_suffix_key(alpha_pattern, name), ALPHA))


def peft_latest(name, rank_pattern, alpha_pattern):
    """v0.15.0–HEAD: the real function of the installed peft."""
    g = peft_other.get_pattern_key
    return rank_pattern.get(g(list(rank_pattern), name), R), alpha_pattern.get(g(list(alpha_pattern), name), ALPHA)


ERAS = [("combined", peft_0_13), ("split", peft_0_14), ("regex", peft_latest)]


@pytest.mark.parametrize("matching,peft", ERAS, ids=[m for m, _ in ERAS])
@given(name=names, ranks=patterns, alphas=patterns)
def test_module_r_alpha_is_what_peft_computes(matching, peft, name, ranks, alphas):
    alphas = {k: float(v) for k, v in alphas.items()}
    assert module_r_alpha(matching, name, R, ALPHA, ranks, alphas) == peft(name, ranks, alphas)


def test_the_0_13_chained_list_bug_is_reproduced():
    """rank_pattern's key matches first, so 0.13 never looks at the alpha_pattern key that also matches."""
    name, ranks, alphas = "model.layers.0.self_attn.q_proj", {"q_proj": 4}, {"self_attn.q_proj": 64.0}
    assert module_r_alpha("combined", name, R, ALPHA, ranks, alphas) == (4, ALPHA)
    assert module_r_alpha("split", name, R, ALPHA, ranks, alphas) == (4, 64.0)
    assert module_r_alpha("regex", name, R, ALPHA, ranks, alphas) == (4, 64.0)


@pytest.mark.parametrize("matching,peft", ERAS, ids=[m for m, _ in ERAS])
@given(name=names, other=names)
def test_a_written_full_path_key_selects_exactly_its_module(matching, peft, name, other):
    """What lora-migrate writes (pattern_key_for) selects the module it names in that era, and no other."""
    pattern = {pattern_key_for(matching, name): 3}
    assert peft(name, pattern, {})[0] == 3
    if other != name and not other.endswith("." + name):
        assert peft(other, pattern, {})[0] == R
