"""The torchtune codec on tiny synthetic files: claim, ``adapter_model.pt`` read weights-only, the HF name map, the
q/k lora_b row permutation for Llama (none for Qwen2) both ways, and the refusals. torchtune itself loads the
outputs in golden/families/torchtune (ACCEPTANCE)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_migrate.codecs.base import PlanOptions
from lora_migrate.codecs.torchtune import TorchtuneCodec
from lora_migrate.detect import open_source
from lora_migrate.errors import LoraMigrateError, UnsupportedFeature
from lora_migrate.plan import plan_adapter
from lora_migrate.schemas import get_convention
from tests.builders import LLAMA_CONFIG, dense, lora_pair, peft_folder

C = TorchtuneCodec()
QWEN2_CONFIG = dict(LLAMA_CONFIG, model_type="qwen2")
TT_DIMS = {"attn.q_proj": (64, 64), "attn.k_proj": (64, 32), "attn.v_proj": (64, 32), "attn.output_proj": (64, 64),
           "mlp.w1": (64, 128), "mlp.w3": (64, 128), "mlp.w2": (128, 64)}


def meta_rows(t, n):
    """Meta's interleaved order from the HF order, written as transformers' conversion script states the inverse:
    HF = w.view(n, hd/2, 2, …).transpose(1, 2); so Meta = HF.view(n, 2, hd/2, …).transpose(1, 2)."""
    hd = t.shape[0] // n
    return t.reshape(n, 2, hd // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def tt_folder(folder, rel=("attn.q_proj", "attn.v_proj"), r=4, alpha=8.0, seed=0, config=True, magnitude=False):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    sd = {}
    for n in (0, 1):
        for p in rel:
            A, B = lora_pair(*TT_DIMS[p], r, g)
            sd[f"layers.{n}.{p}.lora_a.weight"], sd[f"layers.{n}.{p}.lora_b.weight"] = A, B
            if magnitude:
                sd[f"layers.{n}.{p}.magnitude"] = torch.rand(B.shape[0], generator=g) + 0.5
    torch.save(sd, folder / "adapter_model.pt")
    if config:
        (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA",
                                                                "target_modules": ["q_proj", "v_proj"]}))
    return folder, sd


def read(folder, opts=PlanOptions()):
    a = C.open(folder, None).adapters[0]
    C.prepare(a, opts)
    return a


def convert(src, tmp_path, opts):
    target = get_convention("torchtune")
    ex = plan_adapter(src, target, ".", opts)
    out = tmp_path / "out"
    C.write(ex, out, ex.deltas())
    return ex, out, C.read_back(out, target, src.info.name, opts)


def test_claim(tmp_path):
    folder, sd = tt_folder(tmp_path / "t")
    assert C.claim(folder).strength == 3  # above PEFT's 2 for the adapter_config.json (peft_type) beside it
    assert C.claim(peft_folder(tmp_path / "p")) is None
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, str(folder / "adapter_model.safetensors"))
    assert "beside its PEFT export" in C.claim(folder).why
    assert C.claim(folder / "adapter_model.safetensors") is None  # the export itself is PEFT's file
    assert open_source(folder).convention.name == "torchtune"


def test_read_pt_weights_only_names_and_scale(tmp_path):
    folder, sd = tt_folder(tmp_path / "t", rel=("attn.v_proj", "attn.output_proj", "mlp.w2"), r=4, alpha=8.0)
    a = read(folder)
    assert sorted(e.module for e in a.modules) == [f"model.layers.{n}.{p}" for n in (0, 1) for p in
                                                   ("mlp.down_proj", "self_attn.o_proj", "self_attn.v_proj")]
    e = next(e for e in a.modules if e.module == "model.layers.1.mlp.down_proj")
    d = a.load(e)
    assert torch.equal(d.A, sd["layers.1.mlp.w2.lora_a.weight"]) and torch.equal(d.B, sd["layers.1.mlp.w2.lora_b.weight"])
    assert d.scale == 2.0 and d.provenance.rule == "alpha/r"


def test_pickle_with_code_is_refused(tmp_path):
    folder, _ = tt_folder(tmp_path / "t")
    torch.save({"layers.0.attn.v_proj.lora_a.weight": torch.zeros(4, 64), "evil": print}, folder / "adapter_model.pt")
    with pytest.raises(LoraMigrateError):
        read(folder)


def test_no_config_no_alpha(tmp_path):
    folder, _ = tt_folder(tmp_path / "t", config=False)
    with pytest.raises(LoraMigrateError, match="carries no alpha"):
        C.open(folder, None)


@pytest.mark.parametrize("cfg, permuted", [(LLAMA_CONFIG, True), (QWEN2_CONFIG, False)])
def test_qk_rows_to_and_from_hf(tmp_path, cfg, permuted):
    folder, sd = tt_folder(tmp_path / "t", rel=("attn.q_proj", "attn.k_proj"))
    a = read(folder, PlanOptions(base_config=cfg))
    for n, proj, heads in ((0, "q_proj", 4), (1, "k_proj", 2)):
        e = next(e for e in a.modules if e.module == f"model.layers.{n}.self_attn.{proj}")
        B_tt = sd[f"layers.{n}.attn.{proj}.lora_b.weight"]
        B_hf = a.load(e).B
        assert torch.equal(meta_rows(B_hf, heads), B_tt) if permuted else torch.equal(B_hf, B_tt)
        assert permuted == (not torch.equal(B_hf, B_tt))
    # back into torchtune: the same bytes
    _, out, back = convert(a, tmp_path, PlanOptions(base_config=cfg))
    w = torch.load(out / "adapter_model.pt", weights_only=True)
    assert set(w) == set(sd) and all(torch.equal(w[k], sd[k]) for k in sd)


def test_peft_to_torchtune_llama_dora_magnitude_permuted(tmp_path):
    peft = peft_folder(tmp_path / "p", rel=("self_attn.q_proj", "self_attn.k_proj"), use_dora=True)
    from safetensors.torch import load_file
    w = load_file(str(peft / "adapter_model.safetensors"))
    for k in list(w):
        if k.endswith("lora_B.weight"):
            w[k.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(w[k].shape[0]) + 0.5
    save_file(w, str(peft / "adapter_model.safetensors"), metadata={"format": "pt"})
    src = open_source(peft).adapters[0]
    ex, out, back = convert(src, tmp_path, PlanOptions(base_config=LLAMA_CONFIG))
    tt = torch.load(out / "adapter_model.pt", weights_only=True)
    m = w["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert torch.equal(tt["layers.0.attn.q_proj.magnitude"], meta_rows(m, 4))
    assert ex.config["recipe"]["use_dora"] is True
    bm = {e.module: e for e in back.modules}
    for e in src.modules:
        d, o = src.load(e), back.load(bm[e.module])
        assert torch.equal(dense(d), dense(o)) and torch.equal(d.magnitude, o.magnitude)


def test_qk_needs_the_model_type(tmp_path):
    src = open_source(peft_folder(tmp_path / "p", rel=("self_attn.q_proj",))).adapters[0]
    with pytest.raises(UnsupportedFeature, match="model type is not known"):
        convert(src, tmp_path, PlanOptions())
    with pytest.raises(UnsupportedFeature, match="phi.*is not known here"):
        convert(src, tmp_path, PlanOptions(model_type="phi"))
    with pytest.raises(UnsupportedFeature, match="head counts are needed"):
        convert(src, tmp_path, PlanOptions(model_type="llama"))
    folder, _ = tt_folder(tmp_path / "t", rel=("attn.q_proj",))
    a = C.open(folder, None).adapters[0]
    with pytest.raises(UnsupportedFeature, match="pass --model-type"):
        a.load(a.modules[0])


@pytest.mark.parametrize("rel, layers, match", [
    (("mlp.gate_proj",), (0, 1), "adapts gate, up and down projections together"),
    (("self_attn.v_proj",), (1,), "LoRA on every layer; the source adapts blocks \\[1\\] of 2"),
])
def test_builder_shape_refusals(tmp_path, rel, layers, match):
    src = open_source(peft_folder(tmp_path / "p", rel=rel, layers=layers)).adapters[0]
    with pytest.raises(UnsupportedFeature, match=match):
        convert(src, tmp_path, PlanOptions(base_config=QWEN2_CONFIG))


def test_patterns_one_rank_one_alpha(tmp_path):
    src = open_source(peft_folder(tmp_path / "p", rel=("self_attn.v_proj", "self_attn.o_proj"), r=8, alpha=16,
                                  ranks={"model.layers.0.self_attn.o_proj": 2},
                                  alphas={"model.layers.1.self_attn.v_proj": 4})).adapters[0]
    ex, out, back = convert(src, tmp_path, PlanOptions(base_config=QWEN2_CONFIG))
    assert ex.config["r"] == 8 and ex.config["lora_alpha"] == 16
    assert ex.config["recipe"]["lora_attn_modules"] == ["output_proj", "v_proj"]
    bm = {e.module: e for e in back.modules}
    for e in src.modules:
        x, y = dense(src.load(e)), dense(back.load(bm[e.module]))
        assert torch.allclose(x, y, rtol=0, atol=8 * torch.finfo(torch.float32).eps * x.abs().max().item())


def test_finding_scrambled_qwen2_export(tmp_path):
    folder, sd = tt_folder(tmp_path / "t", rel=("attn.q_proj", "attn.k_proj"))
    export = {f"base_model.model.model.layers.{n}.self_attn.{p}.lora_B.weight":
              meta_rows(sd[f"layers.{n}.attn.{p}.lora_b.weight"], 4 if p == "q_proj" else 2).contiguous()
              for n in (0, 1) for p in ("q_proj", "k_proj")}
    save_file(export, str(folder / "adapter_model.safetensors"))
    assert [f.code for f in C.findings(read(folder, PlanOptions(base_config=QWEN2_CONFIG)))] == ["export-scrambled"]
    assert C.findings(read(folder, PlanOptions(base_config=LLAMA_CONFIG))) == []


def test_cli_convert_verify_and_back(tmp_path):
    from click.testing import CliRunner

    from lora_migrate.cli import main

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        return r.exit_code, r.output

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    src = peft_folder(tmp_path / "p", rel=("self_attn.q_proj", "self_attn.k_proj"))
    code, out = run("convert", src, tmp_path / "tt", "--to", "torchtune")
    assert code == 2 and "model type is not known" in out
    code, out = run("convert", src, tmp_path / "tt", "--to", "torchtune", "--base-model", base)
    assert code == 0 and "OK" in out, out
    code, out = run("verify", src, tmp_path / "tt")  # our own config records the q/k layout
    assert code == 0, out
    code, out = run("convert", tmp_path / "tt", tmp_path / "back", "--to", "peft")
    assert code == 0, out
    code, out = run("verify", src, tmp_path / "back")
    assert code == 0 and "max relative error 0 " in out, out


def test_pissa_with_qk_into_torchtune(tmp_path):
    """A PiSSA adapter saved with its initial adapter, on q/v of a Llama: --initial-adapter gives the init and
    --base-model the head counts; the result equals PEFT's own subtract_mutated_init conversion (golden)."""
    from pathlib import Path

    from lora_migrate import api
    g = Path(__file__).resolve().parents[3] / "golden" / "peft" / "pf21" / "llama_pissa"
    out = tmp_path / "tt"
    assert api.convert(g / "adapter", out, to="torchtune", initial_adapter=g / "pissa_init",
                       base_model=g / "residual_base").ok
    assert api.verify(g / "converted_by_peft", out, base_model=g / "residual_base").ok
    with pytest.raises(LoraMigrateError, match="pass one"):  # nothing in a PEFT target needs the config
        api.convert(g / "adapter", tmp_path / "p", to="peft", initial_adapter=g / "pissa_init",
                    base_model=g / "residual_base")
