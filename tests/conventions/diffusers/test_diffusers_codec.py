"""The diffusers codec: claim, read (every spelling, per-module scales as diffusers computes them), plan, write
(metadata as save_lora_weights lays it out), read back; against files diffusers 0.42.1 itself wrote (golden/).

``loaded_scales.json``: for each golden diffusers file, every LoRA layer's (r, scaling) after
``pipe.load_lora_weights`` in diffusers 0.42.1 / peft 0.21.2 on the golden tiny pipelines (module names as the
model has them: transformers 5, no ``text_model.`` in CLIPTextModel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_migrate.check.report import UNIT_ROUNDOFF
from lora_migrate.codecs.base import PlanOptions
from lora_migrate.codecs.diffusers import DIFFUSERS
from lora_migrate.codecs.diffusers.format import pattern_name
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.plan import plan_adapter
from lora_migrate.schemas import get_convention
from tests.builders import dense, diffusers_file

GOLDEN = Path(__file__).parents[3] / "golden" / "diffusers" / "diffusers"
LOADED = json.loads((Path(__file__).with_name("loaded_scales.json")).read_text())
CODEC = DIFFUSERS
UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
TE_Q = "text_encoder.encoder.layers.0.self_attn.q_proj"


def _open(path, conv=None):
    src = CODEC.open(path, get_convention(conv) if conv else None)
    return src, src.adapters[0]


def _model_name(module: str) -> str:
    comp, rel = pattern_name(module)
    return f"{comp}.{rel}"


def _convert(a, target, tmp_path, name="out"):
    t = get_convention(target)
    ex = plan_adapter(a, t, ".", PlanOptions())
    dest = tmp_path / name
    CODEC.write(ex, dest, ex.deltas())
    return ex, dest, CODEC.read_back(dest, t, "default", PlanOptions())


# ------------------------------------------------------------------------------------------------ claim


def test_claim_folder_file_and_not_others(tmp_path):
    d = diffusers_file(tmp_path / "d", {UNET_Q: (2, 8, 8)}, {"unet": {"r": 2, "lora_alpha": 4}})
    assert CODEC.claim(d).strength == 2 and "lora_adapter_metadata" in CODEC.claim(d).why
    assert CODEC.claim(d / "pytorch_lora_weights.safetensors") is not None
    bare = diffusers_file(tmp_path / "bare", {UNET_Q: (2, 8, 8)})
    assert CODEC.claim(bare).strength == 1
    (bare / "adapter_config.json").write_text("{}")  # a PEFT adapter folder is PEFT's
    assert CODEC.claim(bare) is None
    kohya = GOLDEN.parent / "sdscripts" / "sd1_kohya" / "lora.safetensors"
    assert CODEC.claim(kohya) is None
    peftish = diffusers_file(tmp_path / "p", {"base_model.model.layers.0.q_proj": (2, 8, 8)})
    assert CODEC.claim(peftish) is None


# ------------------------------------------------------------------------------------------------ read


@pytest.mark.parametrize("case", sorted(LOADED))
def test_scales_equal_what_diffusers_computed(case):
    """Every module diffusers loaded has our reader's rank and scale; the modules it left out are exactly the ones
    the mixed-spellings finding names."""
    src, a = _open(GOLDEN / case)
    try:
        ours = {_model_name(e.module): (e.rank, e.scale) for e in a.modules}
        theirs = {_model_name(m): tuple(v) for m, v in LOADED[case].items()}  # text_model. compared away
        for m, (r, s) in theirs.items():
            assert ours[m][0] == r and math.isclose(ours[m][1], s, rel_tol=1e-12), m
        skipped = {_model_name(f.module) for f in CODEC.findings(a) if f.code == "mixed-spellings"}
        missing = set(ours) - set(theirs)
        assert (len(missing) == 48) if case.endswith("mixed") else not missing
        if missing:
            assert next(iter(skipped)) in missing
    finally:
        src.close()


@pytest.mark.parametrize("case,family", [("sd1_diffusers", "sd1"), ("sdxl_diffusers", "sdxl"),
                                         ("flux_diffusers", "flux")])
def test_model_type_and_components(case, family):
    src, a = _open(GOLDEN / case)
    assert a.info.model_type == family
    assert a.info.components == {"sd1": ("unet", "text_encoder"), "flux": ("transformer", "text_encoder"),
                                 "sdxl": ("unet", "text_encoder", "text_encoder_2")}[family]
    assert any(e.module.startswith("text_encoder.text_model.encoder.") for e in a.modules)  # canonical CLIP path
    src.close()


def test_spellings_read_as_one(tmp_path):
    """.lora.down/up (UNet attention) and .lora_linear_layer.down/up (text encoder) read as PEFT's lora_A/B."""
    mods = {UNET_Q: (2, 8, 8), TE_Q: (2, 8, 8)}

    def old(m):
        return (".lora.down.weight", ".lora.up.weight") if m.startswith("unet") else \
            (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")

    p1 = diffusers_file(tmp_path / "old", mods, spelling=old)
    p2 = diffusers_file(tmp_path / "new", mods)
    (s1, a1), (s2, a2) = _open(p1), _open(p2)
    assert [e.module for e in a1.modules] == [e.module for e in a2.modules]
    for e1, e2 in zip(a1.modules, a2.modules):
        assert torch.equal(dense(a1.load(e1)), dense(a2.load(e2)))
    assert not [f for f in CODEC.findings(a1) if f.code == "mixed-spellings"]
    s1.close(), s2.close()


def test_processor_spelling_from_bin(tmp_path):
    """diffusers ≤ 0.20's .bin with attention-processor keys (…attn1.processor.to_out_lora.down.weight, a CLIP
    …self_attn.to_q_lora.up.weight) reads as the modules its loader renames them to."""
    g = torch.Generator().manual_seed(3)
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight":
          torch.randn(2, 8, generator=g),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight":
          torch.randn(8, 2, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.randn(2, 8, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.randn(8, 2, generator=g)}
    (tmp_path / "old").mkdir()
    torch.save(sd, tmp_path / "old" / "pytorch_lora_weights.bin")
    assert CODEC.claim(tmp_path / "old") is not None
    src, a = _open(tmp_path / "old")
    assert sorted(e.module for e in a.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    _, dest, back = _convert(a, "diffusers", tmp_path)
    assert {e.module: dense(back.load(e)) for e in back.modules}.keys() == {e.module for e in a.modules}
    for e, b in zip(sorted(a.modules, key=lambda e: e.module), sorted(back.modules, key=lambda e: e.module)):
        assert torch.equal(dense(a.load(e)), dense(back.load(b)))
    src.close(), back.store.close()


def test_mixed_spellings_found(tmp_path):
    """proj_in (lora_A, first in name order) beside attention keys spelled .lora.down: the loader skips the latter."""
    proj = "unet.down_blocks.0.attentions.0.proj_in"
    p = diffusers_file(tmp_path / "m", {proj: (2, 8, 8), UNET_Q: (2, 8, 8)},
                       spelling=lambda m: (".lora.down.weight", ".lora.up.weight") if m == UNET_Q else
                       (".lora_A.weight", ".lora_B.weight"))
    src, a = _open(p)
    f = [f for f in CODEC.findings(a) if f.code == "mixed-spellings"]
    assert len(f) == 1 and f[0].module == UNET_Q and len(a.modules) == 2
    src.close()


def test_missing_metadata_eras(tmp_path):
    """No metadata: ≥ 0.40 alpha = r (scale 1); 0.34–0.39 and < 0.34 take the first module's rank as alpha."""
    p = diffusers_file(tmp_path / "n", {UNET_K: (4, 8, 8), UNET_Q: (2, 8, 8)})  # attn1.to_k sorts first: r=4
    src, a = _open(p)
    assert {e.scale for e in a.modules} == {1.0}
    assert [f.code for f in CODEC.findings(a)] == ["missing-metadata"]
    loaded = {c.convention: c for c in CODEC.as_loaded(a)}
    assert not loaded["diffusers-0.34"].same and "2 instead of 1" in loaded["diffusers-0.34"].detail
    src.close()
    src, a = _open(p, "diffusers-0.34")
    assert {e.module: e.scale for e in a.modules} == {UNET_K: 1.0, UNET_Q: 2.0}
    src.close()


def test_rslora_from_metadata(tmp_path):
    md = {"unet": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["to_q"]}}
    src, a = _open(diffusers_file(tmp_path / "r", {UNET_Q: (4, 8, 8)}, md))
    assert a.modules[0].scale == 8 / math.sqrt(4) and "rslora" in a.features
    _, dest, back = _convert(a, "diffusers", tmp_path)
    meta = json.loads(safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    assert meta["unet.use_rslora"] is True and back.modules[0].scale == a.modules[0].scale
    src.close(), back.store.close()


@pytest.mark.parametrize("md,tensors,err,what", [
    ({"unet": {"r": 2, "lora_alpha": 2, "use_dora": True}}, {}, LoraMigrateError, "no lora_magnitude_vector"),
    ({"unet": {"r": 3, "lora_alpha": 2}}, {}, LoraMigrateError, "rank 2 but"),
    (None, {UNET_Q + ".dora_scale": torch.ones(8)}, UnsupportedFeature, "LyCORIS DoRA"),
    (None, {UNET_Q + ".lora_magnitude_vector": torch.ones(5)}, LoraMigrateError, "for 8 outputs"),
    (None, {UNET_Q + ".lora_B.bias": torch.ones(8)}, UnsupportedFeature, "LoRA bias"),
    (None, {"unet.mid_block.alpha": torch.tensor(1.0)}, LoraMigrateError, "not a diffusers LoRA key"),
    ({"text_encoder": {"r": 2, "lora_alpha": 2}}, {}, LoraMigrateError, "no entries for 'unet'"),
])
def test_refusals(tmp_path, md, tensors, err, what):
    p = _with(diffusers_file(tmp_path / "x", {UNET_Q: (2, 8, 8)}, md), tensors)
    with pytest.raises(err, match=what):
        CODEC.open(p, None)


def _with(folder, tensors):
    """``folder``'s weights file with ``tensors`` added (header metadata kept)."""
    from safetensors.torch import load_file, save_file

    f = folder / "pytorch_lora_weights.safetensors"
    if tensors:
        save_file({**load_file(str(f)), **tensors}, str(f), safe_open(str(f), "pt").metadata())
    return folder


def test_dora_carried_and_text_encoder_key_spelled_as_its_loader_takes(tmp_path):
    """DoRA (use_dora): magnitudes carried bit for bit; a text encoder's written …lora_magnitude_vector.weight
    (diffusers 0.42.1 on transformers 5 skips the bare key: finding), the UNet's as PEFT spells it."""
    md = {"unet": {"r": 2, "lora_alpha": 4, "use_dora": True}, "text_encoder": {"r": 2, "lora_alpha": 2,
                                                                                "use_dora": True}}
    g = torch.Generator().manual_seed(5)
    mags = {UNET_Q + ".lora_magnitude_vector": torch.rand(8, generator=g) + 0.5,
            TE_Q + ".lora_magnitude_vector": torch.rand(8, generator=g) + 0.5}
    src, a = _open(_with(diffusers_file(tmp_path / "d", {UNET_Q: (2, 8, 8), TE_Q: (2, 8, 8)}, md), mags))
    assert "dora" in a.features and [f.code for f in CODEC.findings(a)] == ["dora-text-encoder-key"]
    _, dest, back = _convert(a, "diffusers", tmp_path)
    f = safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt")
    assert UNET_Q + ".lora_magnitude_vector" in f.keys()
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector.weight" in f.keys()
    flat = json.loads(f.metadata()["lora_adapter_metadata"])
    assert flat["unet.use_dora"] is flat["text_encoder.use_dora"] is True
    got = {e.module: back.load(e) for e in back.modules}
    for e in a.modules:
        assert torch.equal(a.load(e).magnitude, got[e.module].magnitude)
    assert not CODEC.findings(back)
    src.close(), back.store.close()


def test_dora_off_magnitudes_left_out(tmp_path):
    md = {"unet": {"r": 2, "lora_alpha": 4, "use_dora": False}}
    src, a = _open(_with(diffusers_file(tmp_path / "d", {UNET_Q: (2, 8, 8)}, md),
                         {UNET_Q + ".lora_magnitude_vector": torch.ones(8)}))
    assert "dora" not in a.features and "magnitude" not in a.modules[0].keys
    assert "use_dora is false" in a.notes[0]
    src.close()


# ------------------------------------------------------------------------------------------------ write


@pytest.mark.parametrize("case", ["sd1_diffusers_patterns", "sdxl_diffusers", "flux_diffusers", "sd1_diffusers_mixed",
                                  "sd1_diffusers_nometa"])
def test_write_reproduces_scales_and_factors(case, tmp_path):
    """Into diffusers: factors copied bit for bit, every module's (r, scale) read back equal; the header is
    ``format: pt`` plus lora_adapter_metadata laid out as save_lora_weights lays it out."""
    src, a = _open(GOLDEN / case)
    ex, dest, back = _convert(a, "diffusers", tmp_path)
    assert ex.plan.rescaled == 0
    got = {e.module: e for e in back.modules}
    for e in a.modules:
        b = got[e.module]
        assert (b.rank, b.scale) == (e.rank, e.scale), e.module
        x, y = a.load(e), back.load(b)
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
    f = dest / "pytorch_lora_weights.safetensors"
    meta = safe_open(str(f), "pt").metadata()
    golden_meta = safe_open(str(GOLDEN / "sd1_diffusers_patterns" / "pytorch_lora_weights.safetensors"),
                            "pt").metadata()
    assert sorted(meta) == sorted(golden_meta) == ["format", "lora_adapter_metadata"] and meta["format"] == "pt"
    flat = json.loads(meta["lora_adapter_metadata"])
    assert meta["lora_adapter_metadata"] == json.dumps(flat, indent=2, sort_keys=True)
    golden_fields = {k.partition(".")[2] for k in json.loads(golden_meta["lora_adapter_metadata"])}
    comps = {k.partition(".")[0] for k in flat}
    assert comps == set(a.info.components) and {k.partition(".")[2] for k in flat} <= golden_fields
    src.close(), back.store.close()


@pytest.mark.parametrize("case", ["sd1_diffusers_patterns", "sdxl_diffusers", "flux_diffusers"])
def test_metadata_values_equal_what_diffusers_wrote(case, tmp_path):
    """Every field written equals the one save_lora_weights wrote (the source's own patterns are kept), except
    target_modules: the exact module paths instead of the user's leaf names (the same modules)."""
    src, a = _open(GOLDEN / case)
    _, dest, back = _convert(a, "diffusers", tmp_path)
    ours = json.loads(safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    theirs = json.loads(safe_open(str(GOLDEN / case / "pytorch_lora_weights.safetensors"), "pt").metadata()
                        ["lora_adapter_metadata"])
    for k, v in ours.items():
        if k.endswith(".target_modules"):
            def hits(m, t):  # PEFT's list matching: the name, or a suffix at a dot
                return m == t or m.endswith("." + t)

            assert all(any(hits(m, t) for t in theirs[k]) for m in v), k
            assert all(any(hits(m, t) for m in v) for t in theirs[k]), k
        else:
            assert theirs[k] == v, k
    src.close(), back.store.close()


def test_full_path_patterns_for_foreign_alphas(tmp_path):
    """Per-module alphas with no source patterns (a no-metadata file read as 0.34: alpha = first rank) become
    escaped full-path keys, text-encoder paths without text_model. (found by PEFT's suffix match either way)."""
    te_k = "text_encoder.encoder.layers.0.self_attn.k_proj"
    p = diffusers_file(tmp_path / "n", {UNET_K: (4, 8, 8), UNET_Q: (2, 8, 8), te_k: (4, 8, 8), TE_Q: (2, 8, 8)})
    src, a = _open(p, "diffusers-0.34")
    _, dest, back = _convert(a, "diffusers", tmp_path)
    flat = json.loads(safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    assert flat["unet.rank_pattern"] == {r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q": 2}
    assert flat["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.q_proj"]
    assert {e.module: e.scale for e in back.modules} == {e.module: e.scale for e in a.modules}
    assert any(k.startswith("text_encoder.text_model.encoder.") for k in
               safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt").keys())
    src.close(), back.store.close()


def test_old_era_one_rank_scale_folded(tmp_path):
    """Into diffusers < 0.34 (no alpha): one rank per component (zero padding), scale folded into B: ΔW within one
    rounding of B."""
    src, a = _open(GOLDEN / "sd1_diffusers_patterns")
    ex, dest, back = _convert(a, "diffusers-0.33", tmp_path)
    assert "lora_adapter_metadata" not in safe_open(str(dest / "pytorch_lora_weights.safetensors"), "pt").metadata()
    got = {e.module: e for e in back.modules}
    u = UNIT_ROUNDOFF[torch.float32]
    for comp in a.info.components:
        assert len({got[e.module].rank for e in a.modules if e.module.startswith(comp + ".")}) == 1
    for e in a.modules:
        x, y = a.load(e), back.load(got[e.module])
        assert y.scale == 1.0
        A, B = x.factors()
        bound = 2 * u * (abs(x.scale) * B.double().abs() @ A.double().abs())
        assert ((dense(x) - dense(y)).abs() <= bound).all(), e.module
    src.close(), back.store.close()


def test_refuses_modules_without_component(tmp_path):
    src, a = _open(GOLDEN / "sd1_diffusers")
    a.modules[0].module = "model.layers.0.q_proj"
    with pytest.raises(UnsupportedFeature, match="no diffusers component prefix"):
        CODEC.plan(a, get_convention("diffusers"), PlanOptions(), [], ".")
    src.close()


def test_cli_convert_verify_inspect_check(tmp_path):
    """Through the CLI: detection picks the codec, convert and verify pass, check reports the trap by code."""
    from click.testing import CliRunner

    from lora_migrate.cli import main

    run = CliRunner().invoke
    out = tmp_path / "o"
    r = run(main, ["convert", str(GOLDEN / "sd1_diffusers_mixed"), str(out), "--to", "diffusers"])
    assert r.exit_code == 0 and "check: 104 modules" in r.output, r.output
    assert run(main, ["verify", str(GOLDEN / "sd1_diffusers_mixed"), str(out)]).exit_code == 0
    r = run(main, ["check", "--json", str(GOLDEN / "sd1_diffusers_mixed")])
    assert r.exit_code == 0 and [f["code"] for f in json.loads(r.output)[0]["findings"]] == ["mixed-spellings"]
    r = run(main, ["check", "--json", str(out)])
    assert r.exit_code == 0 and json.loads(r.output)[0]["findings"] == []
    r = run(main, ["inspect", "--json", str(GOLDEN / "flux_diffusers")])
    a = json.loads(r.output)["adapters"][0]
    assert (r.exit_code, a["model_type"], a["components"]) == (0, "flux", ["transformer", "text_encoder"])


# ------------------------------------------------------------------------------------------------ --component

PEFT_UNET = GOLDEN / "sd1_peft_unet" / "adapter"  # get_peft_model(unet, LoraConfig).save_pretrained, diffusers 0.42.1


def _cli(*args):
    from click.testing import CliRunner

    from lora_migrate.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _keys(folder):
    return set(safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt").keys())


def test_component_puts_a_bare_peft_unet_into_the_unet(tmp_path):
    """The real PEFT's bare-UNet adapter (keys base_model.model.down_blocks…, no unet.): --component unet writes
    every module under unet. with its own (r, alpha) in the metadata, the check compares module by module, and
    verify needs --component as well (without it no module of the source is in the output)."""
    r = _cli("convert", PEFT_UNET, tmp_path / "o", "--to", "diffusers", "--component", "unet")
    assert r.exit_code == 0 and "check: 96 modules" in r.output and ": OK" in r.output, r.output
    peft = {k.removeprefix("base_model.model.") for k in
            safe_open(str(PEFT_UNET / "adapter_model.safetensors"), "pt").keys()}
    assert _keys(tmp_path / "o") == {"unet." + k for k in peft}
    flat = json.loads(safe_open(str(tmp_path / "o" / "pytorch_lora_weights.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    assert (flat["unet.r"], flat["unet.lora_alpha"]) == (4, 8) and set(flat["unet.rank_pattern"].values()) == {2}
    assert _cli("verify", PEFT_UNET, tmp_path / "o", "--component", "unet").exit_code == 0
    r = _cli("verify", PEFT_UNET, tmp_path / "o")
    assert r.exit_code == 1 and "missing" in r.output, r.output


def test_component_text_encoder_gets_the_clip_text_model_level(tmp_path):
    """A bare CLIP text-encoder adapter (transformers 5 paths, no text_model.) by the real PEFT: written as
    text_encoder.text_model.encoder… (what every diffusers/transformers pairing loads)."""
    from tests.builders import CLIP_LAYERS, peft_component_folder

    src = peft_component_folder(tmp_path / "te", CLIP_LAYERS, r=2, alpha=4, use_rslora=True)
    r = _cli("convert", src, tmp_path / "o", "--to", "diffusers", "--component", "text_encoder", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output
    assert {k.rsplit(".lora_", 1)[0] for k in _keys(tmp_path / "o")} == {
        "text_encoder.text_model." + m for m in CLIP_LAYERS}
    flat = json.loads(safe_open(str(tmp_path / "o" / "pytorch_lora_weights.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    assert flat["text_encoder.use_rslora"] is True and flat["text_encoder.lora_alpha"] == 4


@pytest.mark.parametrize("args, message", [
    ([GOLDEN / "sd1_diffusers", "--to", "diffusers", "--component", "unet"], "names its pipeline component already"),
    ([PEFT_UNET, "--to", "diffusers", "--component", "vae"], "--component vae: one of unet, transformer"),
    ([PEFT_UNET, "--to", "peft", "--component", "unet"], "--component means nothing for peft"),
    ([PEFT_UNET, "--to", "diffusers"], "pass --component NAME"),
])
def test_component_refusals_are_one_line(tmp_path, args, message):
    r = _cli("convert", args[0], tmp_path / "o", *args[1:])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()
