"""The kohya codec on tiny synthetic files: claim, alpha semantics, Flux qkv / linear1 split and fuse, refusals,
and sd-scripts' hashes against a golden value made by sd-scripts' own function."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_migrate.adapter import ScaleProvenance
from lora_migrate.codecs.base import PlanOptions
from lora_migrate.codecs.kohya import CODEC, findings_of
from lora_migrate.codecs.kohya.hashes import sdscripts_hashes
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.schemas import get_convention
from lora_migrate.source import ModuleEntry, SourceAdapter, TensorStore
from lora_migrate.adapter import AdapterInfo

KOHYA = get_convention("kohya")
G = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


def kohya_file(path: Path, modules: dict, metadata=None) -> Path:
    """modules: kohya name → (down, up, alpha or None)"""
    sd = {}
    for name, (down, up, alpha) in modules.items():
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    save_file(sd, str(path), metadata)
    return path


def convert(a, tmp_path: Path, **opts) -> tuple:
    ex = CODEC.plan(a, KOHYA, PlanOptions(**opts), [], "out.safetensors")
    out = tmp_path / "out.safetensors"
    notes = CODEC.write(ex, out, ex.deltas())
    return ex, out, notes, CODEC.read_back(out, KOHYA, "out", PlanOptions())


def dw(a, e):
    d = a.load(e)
    A, B = d.factors()
    return d.scale * B.double() @ A.double()


def same_updates(a, b):
    bb = {e.module: e for e in b.modules}
    for e in a.modules:
        assert torch.allclose(dw(a, e), dw(b, bb[e.module]), rtol=0, atol=1e-12), e.module


SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_claim_and_alpha_semantics(tmp_path):
    f = kohya_file(tmp_path / "a.safetensors", {
        SD1: (rnd(4, 8), rnd(8, 4), 2.0),
        TE: (rnd(2, 8), rnd(8, 2), None),  # no .alpha: alpha = r, scale 1
        "lora_unet_mid_block_attentions_0_proj_in": (rnd(4, 8, 1, 1), rnd(8, 4, 1, 1), 0.0),  # alpha 0 = r
    })
    assert CODEC.claim(f).strength == 2
    a = CODEC.open(f).adapters[0]
    by = {e.module: e for e in a.modules}
    assert by["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 0.5
    assert by["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0
    conv = by["unet.mid_block.attentions.0.proj_in"]
    assert (conv.kind, conv.scale) == ("conv", 1.0)
    assert a.info.model_type == "sd1"
    (lvl, code, msg), = [f for f in findings_of(a) if f[1] == "missing-alpha"]
    assert "2 of 3 modules" in msg
    # written back: every alpha explicit (= s·r), the factors bit for bit
    _, out, _, back = convert(a, tmp_path)
    with safe_open(str(out), "pt") as s:
        assert s.get_tensor(TE + ".alpha").item() == 2.0
        assert s.get_tensor(SD1 + ".alpha").item() == 2.0
        q = by["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        assert s.get_tensor(SD1 + ".lora_up.weight").equal(a.load(q).B)
    assert not back.missing_alpha
    same_updates(a, back)


def test_not_claimed(tmp_path):
    save_file({"unet.a.lora_A.weight": rnd(2, 2)}, str(tmp_path / "p.safetensors"))
    assert CODEC.claim(tmp_path / "p.safetensors") is None


@pytest.mark.parametrize("suffix, feature", [(".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"),
                                             (".dora_scale", "LyCORIS DoRA"), (".oft_blocks", "OFT"),
                                             (".lora_mid.weight", "LoCon Tucker")])
def test_lycoris_refused_with_reason(tmp_path, suffix, feature):
    f = tmp_path / "l.safetensors"
    save_file({SD1 + ".lora_down.weight": rnd(2, 8), SD1 + ".lora_up.weight": rnd(8, 2),
               SD1 + suffix: rnd(2, 2)}, str(f))
    assert CODEC.claim(f) is not None
    with pytest.raises(UnsupportedFeature, match=f"{feature} \\(LyCORIS\\) cannot be converted exactly: .+"):
        CODEC.open(f)


def flux_file(path, hidden, mlp, r=2, alpha=1.0, dtype=torch.float32):
    return kohya_file(path, {
        "lora_unet_double_blocks_0_img_attn_qkv": (rnd(r, hidden, dtype=dtype), rnd(3 * hidden, r, dtype=dtype), alpha),
        "lora_unet_single_blocks_0_linear1": (rnd(r, hidden, dtype=dtype), rnd(3 * hidden + mlp, r, dtype=dtype), alpha),
        "lora_unet_final_layer_adaLN_modulation_1": (rnd(r, hidden, dtype=dtype), rnd(2 * hidden, r, dtype=dtype), alpha),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (rnd(r, 12, dtype=dtype), rnd(20, r, dtype=dtype), alpha),
    })


@pytest.mark.parametrize("hidden, mlp", [(16, 64), (24, 96), (3072, 12288 // 64)])
def test_flux_split_at_the_tensors_sizes_and_fuse_back_bit_for_bit(tmp_path, hidden, mlp):
    f = flux_file(tmp_path / "f.safetensors", hidden, mlp)
    a = CODEC.open(f).adapters[0]
    assert a.info.model_type == "flux"
    by = {e.module: e for e in a.modules}
    with safe_open(str(f), "pt") as s:
        U = s.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
        D = s.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight")
        F = s.get_tensor("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight")
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    sizes = [hidden, hidden, hidden, mlp]
    at = 0
    for p, n in zip(parts, sizes):
        d = a.load(by[f"transformer.single_transformer_blocks.0.{p}"])
        assert d.A.equal(D) and d.B.equal(U[at:at + n])  # A shared, B split by rows
        at += n
    nd = a.load(by["transformer.norm_out.linear"])
    assert nd.B.equal(torch.cat([F[hidden:], F[:hidden]]))  # (shift, scale) → (scale, shift)
    _, out, _, back = convert(a, tmp_path)
    with safe_open(str(f), "pt") as s1, safe_open(str(out), "pt") as s2:
        assert set(s1.keys()) == set(s2.keys())
        assert all(s1.get_tensor(k).equal(s2.get_tensor(k)) for k in s1.keys())
    same_updates(a, back)


def test_linear1_too_narrow_is_refused(tmp_path):
    f = kohya_file(tmp_path / "n.safetensors", {"lora_unet_single_blocks_0_linear1": (rnd(2, 16), rnd(48, 2), 1.0)})
    with pytest.raises(LoraMigrateError, match="cannot hold q, k, v of width 16 and an MLP"):
        CODEC.open(f)


def canonical_source(tmp_path, modules: dict) -> SourceAdapter:
    """A non-kohya canonical adapter: module → (A, B, scale)."""
    sd = {}
    for m, (A, B, _) in modules.items():
        sd[m + ".A"], sd[m + ".B"] = A, B
    save_file(sd, str(tmp_path / "src.safetensors"))
    store = TensorStore()
    store.add(tmp_path / "src.safetensors")
    entries = [ModuleEntry(module=m, kind="linear", keys={"a": m + ".A", "b": m + ".B"},
                           metas={"a": store.meta(m + ".A"), "b": store.meta(m + ".B")}, scale=s,
                           provenance=ScaleProvenance(alpha=s * A.shape[0], r=A.shape[0], rule="alpha/r",
                                                      convention="peft"))
               for m, (A, B, s) in modules.items()]
    return SourceAdapter(info=AdapterInfo(name="src", convention="peft"), convention=get_convention("peft"),
                         store=store, modules=entries, files=[])


def test_separate_qkv_fuse_block_diagonal_with_one_common_scale(tmp_path):
    blk = "transformer.transformer_blocks.0.attn."
    src = canonical_source(tmp_path, {blk + "to_q": (rnd(2, 16), rnd(16, 2), 2.0),
                                      blk + "to_k": (rnd(3, 16), rnd(16, 3), 2.0),
                                      blk + "to_v": (rnd(2, 16), rnd(16, 2), 0.75)})
    ex, out, _, back = convert(src, tmp_path)
    assert ex.plan.rescaled == 1
    assert any("B' = 0.375·B in 1 of 3" in s.what for s in ex.plan.steps), ex.plan.steps
    with safe_open(str(out), "pt") as s:
        up = s.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        assert up.shape == (48, 7) and s.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha").item() == 14.0
        assert not up[:16, 2:].any() and not up[16:32, :2].any()  # block-diagonal
    bb = {e.module: e for e in back.modules}
    # read back, each part is its own block again (lora_migrate_fused_ranks in the header; loaders ignore it)
    assert back.load(bb[blk + "to_k"]).A.equal(src.load(src.modules[1]).A)
    assert [bb[blk + p].rank for p in ("to_q", "to_k", "to_v")] == [2, 3, 2]
    for e in src.modules:  # one float32 rounding of 0.375·B per element of to_v's B: ≤ 2⁻²⁴ relative, r = 2 terms
        ref = dw(src, e)
        assert (ref - dw(back, bb[e.module])).abs().max() <= 2 * 2**-24 * ref.abs().max() * 2


def test_shared_a_fuses_compact_and_missing_mlp_is_zero_rows(tmp_path):
    blk = "transformer.single_transformer_blocks.0."
    A = rnd(2, 8)
    src = canonical_source(tmp_path, {blk + "attn.to_q": (A, rnd(8, 2), 1.0), blk + "attn.to_k": (A.clone(), rnd(8, 2), 1.0),
                                      blk + "attn.to_v": (A.clone(), rnd(8, 2), 1.0)})
    ex, out, _, back = convert(src, tmp_path)
    assert any("no proj_mlp" in n for n in ex.plan.notes)
    with safe_open(str(out), "pt") as s:
        assert s.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight").shape == (2, 8)
        assert s.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").shape == (8 * 3 + 32, 2)
    same_updates(src, back)
    mlp = next(e for e in back.modules if e.module.endswith("proj_mlp"))
    assert not back.load(mlp).B.any()


def test_alpha_written_exactly_in_the_factor_dtype_when_it_can(tmp_path):
    lin2 = "transformer.single_transformer_blocks.0.proj_out"
    src = canonical_source(tmp_path, {lin2: (rnd(4, 8, dtype=torch.bfloat16), rnd(8, 4, dtype=torch.bfloat16), 1 / 3)})
    ex, out, notes, back = convert(src, tmp_path)
    with safe_open(str(out), "pt") as s:
        alpha = s.get_tensor("lora_unet_single_blocks_0_linear2.alpha")
    assert alpha.dtype == torch.float32 and alpha.item() == pytest.approx(4 / 3, rel=1e-7)
    src2 = canonical_source(tmp_path, {lin2: (rnd(4, 8, dtype=torch.bfloat16), rnd(8, 4, dtype=torch.bfloat16), 0.5)})
    _, out2, _, _ = convert(src2, tmp_path)
    with safe_open(str(out2), "pt") as s:
        assert s.get_tensor("lora_unet_single_blocks_0_linear2.alpha").dtype == torch.bfloat16  # as save_weights


def test_unmapped_layer_refused_unless_dropped(tmp_path):
    lin2 = "transformer.single_transformer_blocks.0.proj_out"
    src = canonical_source(tmp_path, {lin2: (rnd(2, 8), rnd(8, 2), 1.0),
                                      "transformer.pos_embed.proj": (rnd(2, 8), rnd(8, 2), 1.0),
                                      "transformer.proj_out": (rnd(2, 8), rnd(8, 2), 1.0)})
    with pytest.raises(UnsupportedFeature, match=r"transformer.pos_embed.proj: kohya cannot hold it .*\(\+1 more\)"
                                                 r".*--drop"):
        CODEC.plan(src, KOHYA, PlanOptions(), [], "o")
    # final_layer_linear: a kohya name, but sd-scripts' network never builds it (diffusers' loader skips it too)
    with pytest.raises(UnsupportedFeature, match=r"transformer.proj_out: .*final_layer_linear: sd-scripts' Flux"):
        CODEC.plan(src, KOHYA, PlanOptions(drop=("transformer.pos_embed",)), [], "o")
    ex, _, _, back = convert(src, tmp_path, drop=("transformer.pos_embed", "transformer.proj_out"))
    assert [e.module for e in back.modules] == [lin2]
    assert any("dropped (--drop): transformer.pos_embed.proj" in n for n in ex.plan.notes)
    assert any("dropped (--drop): transformer.proj_out" in n for n in ex.plan.notes)


def test_unet_only_family_unknown_needs_model_type(tmp_path):
    f = kohya_file(tmp_path / "u.safetensors", {"lora_unet_input_blocks_1_1_proj_in": (rnd(2, 8), rnd(8, 2), 1.0)})
    a = CODEC.open(f).adapters[0]
    assert a.info.model_type is None and any(c == "family-unknown" for _, c, _ in findings_of(a))
    # the sai-named SD1 file: --model-type sd1 writes diffusers names (StableDiffusionPipeline reads only those)
    CODEC.prepare(a, PlanOptions(model_type="sd1"))
    _, out, _, back = convert(a, tmp_path)
    with safe_open(str(out), "pt") as s:
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in s.keys()
        assert s.metadata()["ss_base_model_version"] == "sd_v1"
    same_updates(a, back)


def test_te_widths_contradicting_sdxl_are_found(tmp_path):
    f = kohya_file(tmp_path / "s.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (rnd(2, 1280), rnd(1280, 2), 1.0),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (rnd(2, 768), rnd(768, 2), 1.0)})
    a = CODEC.open(f).adapters[0]
    assert "te-shape-contradicts-family" in {c for _, c, _ in findings_of(a)}


def fixed_tensors():
    t = {}
    for i, (r, n) in enumerate([(8, 20000), (8, 12000), (4, 3000)]):
        m = f"lora_unet_blocks_{i}_attn_to_q"
        t[m + ".lora_down.weight"] = (torch.arange(r * n, dtype=torch.float64).reshape(r, n) % 251 / 97 - 1).float()
        t[m + ".lora_up.weight"] = (torch.arange(n * r, dtype=torch.float64).reshape(n, r) % 113 / 53 - 1).to(
            torch.bfloat16)
        t[m + ".alpha"] = torch.tensor(float(r) / 2)
    return t


def test_hashes_equal_sd_scripts():
    """Golden values from sd-scripts 48d368fa itself, in the golden `sdscripts` env:
    GOLDEN_WORK=… /work/venvs/sdscripts/bin/python -c '…; tu = worker._import_sd_scripts()["library.train_util"];
    print(tu.precalculate_safetensors_hashes(fixed_tensors(), md))' with fixed_tensors() and md as here (1.3 MB,
    mixed float32/bfloat16, so the legacy window at 1 MiB holds data and the dtype order matters)."""
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
          "modelspec.title": "x"}
    assert sdscripts_hashes(fixed_tensors(), md) == (
        "7111d6c71ec80c9bf6d866b164c6b372fba8ece888084d07a58cf9565178928e", "56776292")


def test_written_file_carries_the_hashes_of_its_own_tensors(tmp_path):
    f = kohya_file(tmp_path / "big.safetensors", {
        SD1: (rnd(8, 20000), rnd(20000, 8, dtype=torch.float32), 4.0)}, {"ss_output_name": "x"})
    a = CODEC.open(f).adapters[0]
    _, out, _, _ = convert(a, tmp_path)
    with safe_open(str(out), "pt") as s:
        md = s.metadata()
        tensors = {k: s.get_tensor(k) for k in s.keys()}
    assert md["ss_output_name"] == "x" and md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4.0"
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == sdscripts_hashes(tensors, md)
    assert md["sshs_legacy_hash"] != "e3b0c442"  # the window holds data


def test_attention_alpha_off_the_common_one_is_found(tmp_path):
    """diffusers' kohya loader applies the most common U-Net alpha to attention layers (measured in the goldens)."""
    att = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    f = kohya_file(tmp_path / "p.safetensors", {att + "to_q": (rnd(2, 8), rnd(8, 2), 1.0),
                                                att + "to_k": (rnd(2, 8), rnd(8, 2), 1.0),
                                                att + "to_v": (rnd(2, 8), rnd(8, 2), 4.0), TE: (rnd(2, 8), rnd(8, 2), 3.0)})
    a = CODEC.open(f).adapters[0]
    (_, _, msg), = [x for x in findings_of(a) if x[1] == "alpha-diffusers-ignores"]
    assert msg.startswith("1 U-Net attention modules (e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0."
                          "attn1.to_v)") and "(1)" in msg
    ex = CODEC.plan(a, KOHYA, PlanOptions(), [], "o")
    assert any("keep their own alpha" in n for n in ex.plan.notes)


def test_factors_of_different_dtypes_keep_them(tmp_path):
    src = canonical_source(tmp_path, {"unet.mid_block.attentions.0.proj_out": (rnd(2, 8), rnd(8, 2).half(), 1.0)})
    _, out, _, back = convert(src, tmp_path, model_type="sd1")
    with safe_open(str(out), "pt") as s:
        k = "lora_unet_mid_block_attentions_0_proj_out"
        assert (s.get_tensor(k + ".lora_down.weight").dtype, s.get_tensor(k + ".lora_up.weight").dtype) == \
            (torch.float32, torch.float16)
        md = s.metadata()
        tensors = {k: s.get_tensor(k) for k in s.keys()}
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == sdscripts_hashes(tensors, md)  # written out of order
    same_updates(src, back)


def test_cli_convert_and_check(tmp_path):
    """Through the CLI once: convert (one file out, the check passes), a --drop'less refusal is exit 2 with one
    line, and `check` on the file finds the missing alphas."""
    import subprocess
    import sys

    f = kohya_file(tmp_path / "a.safetensors", {SD1: (rnd(4, 8), rnd(8, 4), 2.0), TE: (rnd(2, 8), rnd(8, 2), None)})
    cli = [sys.executable, "-m", "lora_migrate.cli"]
    p = subprocess.run([*cli, "convert", str(f), str(tmp_path / "o.safetensors"), "--to", "kohya"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "check: 2 modules" in p.stdout and ": OK" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([*cli, "check", str(f)], capture_output=True, text=True)
    assert "warning [missing-alpha]" in p.stdout, p.stdout
    lyc = tmp_path / "l" / "l.safetensors"
    lyc.parent.mkdir()
    save_file({SD1 + ".hada_w1_a": rnd(2, 2), SD1 + ".hada_w1_b": rnd(2, 2)}, str(lyc))
    p = subprocess.run([*cli, "convert", str(lyc), str(tmp_path / "o2"), "--to", "peft"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "LoHa (LyCORIS)" in p.stderr


GOLDEN_KOHYA = Path(__file__).resolve().parents[3] / "golden/diffusers/sdscripts"


@pytest.mark.skipif(not GOLDEN_KOHYA.is_dir(), reason="golden files not present")
@pytest.mark.parametrize("case", ["sd1_kohya_locon", "sdxl_kohya", "flux_kohya", "flux_kohya_globals",
                                  "flux_kohya_linear1"])
def test_round_trip_through_diffusers_gives_the_same_tensors(tmp_path, case):
    """kohya → diffusers → kohya (the CLI's API, each step checked): every tensor bit for bit (the Flux fused
    modules come back compact: their parts share A)."""
    import lora_migrate

    src = GOLDEN_KOHYA / case / "lora.safetensors"
    assert lora_migrate.convert(src, tmp_path / "d", to="diffusers").ok
    assert lora_migrate.convert(tmp_path / "d", tmp_path / "k.safetensors", to="kohya").ok
    with safe_open(str(src), "pt") as s1, safe_open(str(tmp_path / "k.safetensors"), "pt") as s2:
        assert set(s1.keys()) == set(s2.keys())
        assert all(s1.get_tensor(k).equal(s2.get_tensor(k)) for k in s1.keys())


GOLDEN_PEFT_UNET = Path(__file__).resolve().parents[3] / "golden/diffusers/diffusers/sd1_peft_unet/adapter"


def test_component_bare_peft_adapters_into_kohya(tmp_path):
    """--component: the real PEFT's bare-UNet adapter (diffusers' UNet, no unet. prefix) becomes lora_unet_…
    modules (conv with conv_dim), a bare CLIP one lora_te_text_model_… (the model family from --model-type); the
    check compares module by module. Without --component: refused, with the hint."""
    import lora_migrate
    from tests.builders import CLIP_LAYERS, peft_component_folder

    r = lora_migrate.convert(GOLDEN_PEFT_UNET, tmp_path / "u.safetensors", to="kohya", component="unet",
                             model_type="sd1")
    assert r.ok and r.adapters[0].verify.modules and len(r.adapters[0].verify.modules) == 96
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        names = {k.split(".", 1)[0] for k in f.keys()}
        assert "ss_network_args" in f.metadata()  # conv1/conv2 LoCon
    assert len(names) == 96 and all(n.startswith("lora_unet_") for n in names)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
    te = peft_component_folder(tmp_path / "te", CLIP_LAYERS)
    r = lora_migrate.convert(te, tmp_path / "t.safetensors", to="kohya", component="text_encoder", model_type="sd1")
    assert r.ok
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert {k.split(".", 1)[0] for k in f.keys()} == {
            "lora_te_text_model_" + m.replace(".", "_") for m in CLIP_LAYERS}
    with pytest.raises(UnsupportedFeature, match="pass --model-type"):
        lora_migrate.convert(te, tmp_path / "t2.safetensors", to="kohya", component="text_encoder")
    with pytest.raises(UnsupportedFeature, match="pass --component NAME"):
        lora_migrate.convert(te, tmp_path / "t3.safetensors", to="kohya")
    assert not any((tmp_path / n).exists() for n in ("t2.safetensors", "t3.safetensors"))
