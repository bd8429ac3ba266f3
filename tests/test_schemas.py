import pytest

from lora_migrate.errors import LoraMigrateError
from lora_migrate.codecs.adapterhub.format import conventions_for_transformers, conventions_for_version
from lora_migrate.schemas import Scaling, get_convention
from lora_migrate.schemas.adapterhub import LoRAConfig31, LoRAConfig11


@pytest.mark.parametrize("name,expected", [
    ("adapters-1.0", "adapters-1.0"), ("adapters@1.0.1", "adapters-1.0"), ("adapters==0.2.2", "adapters-1.0"),
    ("adapters@1.3.0", "adapters-1.1"), ("adapters", "adapters-1.1"), ("ADAPTERS-1.1", "adapters-1.1"),
    ("adapter-transformers-3.1", "adapter-transformers-3.1"), ("adapter-transformers@3.2.1", "adapter-transformers-3.1"),
])
def test_names_resolve(name, expected):
    assert get_convention(name).name == expected


def test_unknown_name_suggests():
    with pytest.raises(LoraMigrateError, match="did you mean adapters-1.0"):
        get_convention("adapter-1.0")


@pytest.mark.parametrize("version,expected", [
    ("3.1.0", ["adapter-transformers-3.1"]), ("3.2.1", ["adapter-transformers-3.1"]),
    ("0.1.0", ["adapters-1.0"]), ("0.2.2", ["adapters-1.0"]),  # bare 0.x strings (adapterhub.md §2 gap 1)
    ("adapters.1.0.0", ["adapters-1.0"]), ("adapters.1.0.1", ["adapters-1.0"]),
    ("adapters.1.1.0.dev0", ["adapters-1.1"]),  # post-fix main already applied alpha/r
    ("adapters.1.3.0", ["adapters-1.1"]), ("2.3.0", []), ("", []), (None, []),
])
def test_version_strings(version, expected):
    assert [c.name for c in conventions_for_version(version)] == expected


@pytest.mark.parametrize("tv,expected", [("4.21.3", ["adapter-transformers-3.1"]), ("4.45.2", ["adapters-1.0"]),
                                         ("4.46.0", []), ("4.57.6", ["adapters-1.1"])])
def test_full_model_transformers_versions(tv, expected):
    assert [c.name for c in conventions_for_transformers(tv)] == expected


def test_scaling_rules():
    assert Scaling.ALPHA_OVER_R.scale(16, 8) == 2
    assert Scaling.ONE.scale(16, 8) == 1
    assert Scaling.ALPHA_OVER_SQRT_R.alpha_for(2.0, 4) == 4.0
    assert Scaling.ONE.alpha_for(2.0, 4) is None


def test_adapters_1_0_scaling_is_the_documented_bug():
    c = get_convention("adapters-1.0")
    assert c.scale("linear", 16, 8) == 1.0 and c.scale("fused_qkv", 16, 8) == 2.0
    assert c.alpha_equals_r_on_write


def test_configs_are_strict():
    ok = dict(architecture="lora", selfattn_lora=True, intermediate_lora=False, output_lora=False, r=8, alpha=16,
              dropout=0.0, attn_matrices=["q", "v"], composition_mode="add", init_weights="lora", use_gating=False)
    LoRAConfig31.model_validate(ok)
    with pytest.raises(Exception, match="dtype"):
        LoRAConfig31.model_validate({**ok, "dtype": None})  # 3.1 has no dtype field
    LoRAConfig11.model_validate({**ok, "dtype": "bfloat16", "leave_out": []})
    for bad in ({"r": 0}, {"alpha": -1}, {"alpha": float("nan")}, {"r": "eight"}):
        with pytest.raises(Exception):
            LoRAConfig31.model_validate({**ok, **bad})


def test_no_code_outside_the_schemas_asks_which_server_it_is():
    """What a server does (one global scale, rank padding, dropped layer types, frozen base copies, refusals) is
    Serving data on its convention: no module outside schemas/ names one."""
    import re
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "lora_migrate"
    hits = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if "schemas" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"""["'](lorax|vllm)["']""", line)]
    assert hits == []


def test_serving_profiles_are_declared_on_their_conventions():
    from lora_migrate.schemas import CONVENTIONS

    served = {c.name: c.serving for c in CONVENTIONS if c.serving is not None}
    assert set(served) == {"lorax", "vllm"}
    assert served["lorax"].drops_partial_layer_types and served["lorax"].pads_rank and served["lorax"].drops
    assert served["vllm"].skips_frozen_base_copies and served["vllm"].refuses and not served["vllm"].drops


def test_peft_eras_tile_the_releases_without_gap_or_overlap():
    """Era boundaries are declared once, in each era's ``versions``; detection derives its table from them."""
    from lora_migrate.codecs.peft.format import _ERA_STARTS
    from lora_migrate.schemas.peft import PEFT_ERAS

    bounds = [c.version_bounds() for c in PEFT_ERAS]
    assert all(hi == bounds[i + 1][0] for i, (_, hi) in enumerate(bounds[:-1])), bounds
    assert bounds[-1][1] is None  # the newest era is open-ended
    assert [str(lo) for lo, _ in bounds[1:]] == [s for s, _ in _ERA_STARTS[1:]]
