"""The mlx-lm codec on tiny synthetic files: claim, the transposed factors, what ``scale`` means by era, one rank
and one scale on write, and the keys/num_layers selection (or its refusal). mlx-lm itself loads the outputs in
golden/families/mlx (ACCEPTANCE)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_migrate.codecs.base import PlanOptions
from lora_migrate.codecs.mlx_lm import MlxLmCodec
from lora_migrate.detect import open_source
from lora_migrate.errors import DetectionError, UnsupportedFeature
from lora_migrate.plan import plan_adapter
from lora_migrate.schemas import get_convention
from tests.builders import LLAMA_CONFIG, LLAMA_DIMS, dense, peft_folder

C = MlxLmCodec()


def mlx_folder(folder, lp, rel=("self_attn.q_proj", "self_attn.v_proj"), layers=(0, 1), seed=0, extra=None,
               **cfg):
    """An mlx-lm adapter folder as mlx_lm lora saves it: lora_a (in, r), lora_b (r, out), the args dict."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    sd = {}
    for n in layers:
        for p in rel:
            i, o = LLAMA_DIMS[p]
            sd[f"model.layers.{n}.{p}.lora_a"] = torch.randn(i, lp["rank"], generator=g)
            sd[f"model.layers.{n}.{p}.lora_b"] = torch.randn(lp["rank"], o, generator=g)
    sd.update(extra or {})
    save_file(sd, str(folder / "adapters.safetensors"), metadata={"format": "mlx"})
    (folder / "adapter_config.json").write_text(json.dumps({"lora_parameters": lp, **cfg}))
    return folder, sd


def convert(src, target, tmp_path, opts=None):
    target = get_convention(target)
    opts = opts or PlanOptions()
    ex = plan_adapter(src, target, ".", opts)
    out = tmp_path / "out"
    C.write(ex, out, ex.deltas())
    return ex, out, C.read_back(out, target, src.info.name, opts)


def same_deltas(a, b):
    bm = {e.module: e for e in b.modules}
    assert sorted(bm) == sorted(e.module for e in a.modules)
    for e in a.modules:
        x, y = dense(a.load(e)), dense(b.load(bm[e.module]))
        assert torch.allclose(x, y, rtol=0, atol=8 * torch.finfo(torch.float32).eps * x.abs().max().item()), e.module


def test_claim(tmp_path):
    folder, _ = mlx_folder(tmp_path / "m", {"rank": 4, "scale": 2.0}, fine_tune_type="lora", num_layers=2)
    assert C.claim(folder).strength == 2
    assert C.claim(folder / "adapters.safetensors") is not None
    assert C.claim(peft_folder(tmp_path / "p")) is None
    (folder / "adapter_config.json").write_text(json.dumps({"model": "x"}))
    assert C.claim(folder) is None


def test_read_transposes_and_keeps_scale_apart(tmp_path):
    folder, sd = mlx_folder(tmp_path / "m", {"rank": 4, "scale": 2.5, "dropout": 0.0}, fine_tune_type="lora",
                            num_layers=2)
    src = C.open(folder, None)
    a = src.adapters[0]
    assert src.convention.name == "mlx-lm"
    e = next(e for e in a.modules if e.module == "model.layers.1.self_attn.v_proj")
    d = a.load(e)
    assert torch.equal(d.A, sd[f"{e.module}.lora_a"].T) and torch.equal(d.B, sd[f"{e.module}.lora_b"].T)
    assert d.A.shape == (4, 64) and d.B.shape == (32, 4) and e.metas["a"].shape == (4, 64)
    assert d.scale == 2.5 and d.provenance.rule == "scale (absolute)"


def test_scale_eras(tmp_path):
    lp = {"rank": 4, "alpha": 16, "scale": 10.0, "dropout": 0.0}
    folder, _ = mlx_folder(tmp_path / "old", lp, lora_layers=2)
    with pytest.raises(DetectionError, match="scale·alpha/rank.*pass --from"):
        C.open(folder, None)
    # use_dora dates nothing: mlx-lm 0.13.1 (scale·alpha/rank) writes "use_dora": false too (golden/mlx/mlxlm0131)
    with pytest.raises(DetectionError, match="pass --from"):
        C.open(mlx_folder(tmp_path / "use_dora", lp, lora_layers=2, use_dora=False)[0], None)
    old = C.open(folder, get_convention("mlx-lm-2024-03")).adapters[0]
    assert old.modules[0].scale == 10.0 * 16 / 4  # 2024-03: scale·alpha/rank
    mid = C.open(folder, get_convention("mlx-lm-2024-06")).adapters[0]
    assert mid.modules[0].scale == 10.0  # from 0.14.2: scale alone
    assert any("ignored by mlx-lm ≥ 0.14.2" in f.message for f in C.findings(mid))
    dated, _ = mlx_folder(tmp_path / "dated", lp, num_layers=2, fine_tune_type="lora")
    src = C.open(dated, None)
    assert src.convention.name == "mlx-lm-2024-06" and src.adapters[0].modules[0].scale == 10.0
    same, _ = mlx_folder(tmp_path / "same", dict(lp, alpha=4), lora_layers=2)  # alpha = rank: every era agrees
    assert C.open(same, None).adapters[0].modules[0].scale == 10.0


def test_peft_patterns_to_one_rank_and_scale(tmp_path):
    mods = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    peft = peft_folder(tmp_path / "p", rel=mods, r=8, alpha=16, ranks={"model.layers.0.mlp.down_proj": 2},
                       alphas={"model.layers.1.self_attn.v_proj": 48}, use_rslora=True)
    src = open_source(peft).adapters[0]
    ex, out, back = convert(src, "mlx-lm", tmp_path)
    same_deltas(src, back)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["fine_tune_type"] == "lora" and "alpha" not in cfg["lora_parameters"]
    assert cfg["lora_parameters"]["keys"] == sorted(mods) and cfg["lora_parameters"]["rank"] == 8
    assert cfg["lora_parameters"]["scale"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA: the most common scale
    w = load_file(str(out / "adapters.safetensors"))
    assert w["model.layers.0.mlp.down_proj.lora_a"].shape == (128, 8)  # rank 2 padded to 8, stored (in, r)
    assert w["model.layers.0.mlp.down_proj.lora_b"].shape == (8, 64)
    assert not w["model.layers.0.mlp.down_proj.lora_a"][:, 2:].any()
    assert any(s.rule == "pad_rank" for s in ex.plan.steps) and ex.plan.rescaled == 2  # down_proj r=2, v_proj α=48


def test_older_era_target_writes_every_spelling(tmp_path):
    src = open_source(peft_folder(tmp_path / "p")).adapters[0]
    _, out, back = convert(src, "mlx-lm-2024-06", tmp_path)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["alpha"] == cfg["lora_parameters"]["rank"] == 4  # a 2024-03 loader: scale·1
    assert cfg["lora_layers"] == cfg["num_layers"] == 2 and cfg["use_dora"] is False
    same_deltas(src, back)


@pytest.mark.parametrize("kw, match", [
    ({"rel": ("self_attn.q_proj",), "layers": (0,)}, None),  # last block only: fine without a base config
    ({"rel": ("self_attn.q_proj",), "layers": (0,), "base": True}, "of 2 .* not a run ending at the last block"),
])
def test_num_layers_counts_from_the_last_block(tmp_path, kw, match):
    src = open_source(peft_folder(tmp_path / "p", rel=kw["rel"], layers=kw["layers"])).adapters[0]
    opts = PlanOptions(base_config=LLAMA_CONFIG) if kw.get("base") else PlanOptions()
    if match:
        with pytest.raises(UnsupportedFeature, match=match):
            convert(src, "mlx-lm", tmp_path, opts)
    else:
        ex, out, _ = convert(src, "mlx-lm", tmp_path, opts)
        assert json.loads((out / "adapter_config.json").read_text())["num_layers"] == 1
        assert any("block 0 is taken as the last" in n for n in ex.plan.notes)


def test_uneven_blocks_refused(tmp_path):
    peft = peft_folder(tmp_path / "p", rel=("self_attn.q_proj", "self_attn.v_proj"))
    w = load_file(str(peft / "adapter_model.safetensors"))
    w = {k: v for k, v in w.items() if "layers.0.self_attn.v_proj" not in k}
    save_file(w, str(peft / "adapter_model.safetensors"), metadata={"format": "pt"})
    src = open_source(peft).adapters[0]
    with pytest.raises(UnsupportedFeature, match="one set of lora_parameters.keys.*block 0 adapts self_attn.q_proj "
                                                 "but block 1 adapts self_attn.q_proj, self_attn.v_proj"):
        convert(src, "mlx-lm", tmp_path)


def test_unmeasured_expert_layouts_refused_with_the_reason(tmp_path):
    """3-D factors outside <block>.mlp.switch_mlp / block_sparse_moe.switch_mlp (gpt_oss, dots1, …: ``experts``,
    some with interleaved gate/up) are refused, nothing read, and the message says why."""
    module = "model.layers.0.mlp.experts.down_proj"
    folder, _ = mlx_folder(tmp_path / "m", {"rank": 4, "scale": 2.0}, num_layers=2, fine_tune_type="lora",
                           extra={f"{module}.lora_a": torch.zeros(2, 4, 8), f"{module}.lora_b": torch.zeros(2, 8, 4)})
    with pytest.raises(UnsupportedFeature) as e:
        C.open(folder, None)
    assert module in str(e.value) and "not been measured" in str(e.value) and "\n" not in str(e.value)


def switch_folder(folder, parent="mlp", parts=("gate_proj", "up_proj", "down_proj"), E=3, H=8, I=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for n in (0, 1):
        for p in parts:
            i, o = (I, H) if p == "down_proj" else (H, I)
            m = f"model.layers.{n}.{parent}.switch_mlp.{p}"
            extra[f"{m}.lora_a"], extra[f"{m}.lora_b"] = torch.randn(E, r, i, generator=g), torch.randn(E, o, r, generator=g)
    keys = ["self_attn.q_proj", *(f"{parent}.switch_mlp.{p}" for p in parts)]
    return mlx_folder(folder, {"rank": r, "scale": 1.5, "keys": keys}, rel=("self_attn.q_proj",), fine_tune_type="lora",
                      num_layers=2, extra=extra, seed=seed)


@pytest.mark.parametrize("parent,model_type", [("mlp", "qwen2_moe"), ("block_sparse_moe", "mixtral")])
def test_switch_reads_as_fused_gate_up_and_round_trips(tmp_path, parent, model_type):
    """gate + up with their own A → transformers 5's gate_up_proj at rank 2r, block-diagonal (ΔW_e rows: gate's,
    then up's); down as it is; back into mlx-lm (the model type names the parent) bit for bit."""
    folder, sd = switch_folder(tmp_path / "m", parent)
    a = C.open(folder, None).adapters[0]
    by = {e.module: e for e in a.modules}
    assert sorted(by) == sorted(f"model.layers.{n}.{m}" for n in (0, 1) for m in
                                ("self_attn.q_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    d = a.load(by["model.layers.1.mlp.experts.gate_up_proj"])
    assert d.kind == "experts" and tuple(d.A.shape) == (3, 4, 8) and tuple(d.B.shape) == (3, 12, 4)
    p = f"model.layers.1.{parent}.switch_mlp."
    for e in range(3):
        ref = torch.cat([sd[p + "gate_proj.lora_b"][e] @ sd[p + "gate_proj.lora_a"][e],
                         sd[p + "up_proj.lora_b"][e] @ sd[p + "up_proj.lora_a"][e]])
        assert torch.allclose(d.B[e] @ d.A[e], ref, rtol=0, atol=1e-5)
    with pytest.raises(UnsupportedFeature, match="model type"):
        convert(a, "mlx-lm", tmp_path / "none")
    _, out, back = convert(a, "mlx-lm", tmp_path, PlanOptions(model_type=model_type))
    w = load_file(str(out / "adapters.safetensors"))
    # the fused pair went back to gate/up: rank 2r (block-diagonal) for each, q_proj padded to it
    assert sorted(w) == sorted(sd) and w[p + "gate_proj.lora_a"].shape == (3, 4, 8)
    assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["keys"] == sorted(
        ["self_attn.q_proj", *(f"{parent}.switch_mlp.{x}" for x in ("gate_proj", "up_proj", "down_proj"))])
    by2 = {e.module: e for e in back.modules}
    for e in a.modules:
        x, y = a.load(e), back.load(by2[e.module])
        if e.kind == "experts":
            assert torch.allclose(torch.einsum("eor,eri->eoi", x.B, x.A), torch.einsum("eor,eri->eoi", y.B, y.A),
                                  rtol=0, atol=1e-5), e.module


def test_only_gate_adapted_leaves_up_rows_zero(tmp_path):
    folder, sd = switch_folder(tmp_path / "m", parts=("gate_proj",))
    a = C.open(folder, None).adapters[0]
    d = a.load(next(e for e in a.modules if e.kind == "experts"))
    assert tuple(d.B.shape) == (3, 12, 2) and not d.B[:, 6:].any()


def test_mlx_round_trip_bit_for_bit(tmp_path):
    folder, sd = mlx_folder(tmp_path / "m", {"rank": 4, "scale": 2.5, "dropout": 0.0,
                                             "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
                            fine_tune_type="lora", num_layers=2)
    src = C.open(folder, None).adapters[0]
    _, out, _ = convert(src, "mlx-lm", tmp_path)
    w = load_file(str(out / "adapters.safetensors"))
    assert set(w) == set(sd) and all(torch.equal(w[k], sd[k]) for k in sd)


def test_finding_tensors_outside_keys(tmp_path):
    folder, _ = mlx_folder(tmp_path / "m", {"rank": 4, "scale": 2.0, "keys": ["self_attn.q_proj"]},
                           fine_tune_type="lora", num_layers=2)
    a = C.open(folder, None).adapters[0]
    assert any("does not select (self_attn.v_proj)" in f.message for f in C.findings(a))


def test_cli_convert_verify_and_a_wrong_scale(tmp_path):
    from click.testing import CliRunner

    from lora_migrate.cli import main

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        return r.exit_code, r.output

    src = peft_folder(tmp_path / "p", r=8, alpha=16, use_rslora=True)
    code, out = run("convert", src, tmp_path / "m", "--to", "mlx-lm")
    assert code == 0 and "OK" in out, out
    code, out = run("verify", src, tmp_path / "m")
    assert code == 0, out
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    cfg["lora_parameters"]["scale"] = 16 / 8  # what a converter that ignores use_rslora writes (alpha/r)
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(cfg))
    code, out = run("verify", src, tmp_path / "m")
    assert code == 1, out


def test_loaded_as_is_by_the_other_eras(tmp_path):
    lp = {"rank": 4, "alpha": 16, "scale": 10.0, "dropout": 0.0}
    folder, _ = mlx_folder(tmp_path / "old", lp, lora_layers=2)
    a = C.open(folder, get_convention("mlx-lm-2024-03")).adapters[0]
    by = {x.convention: x for x in C.as_loaded(a)}
    assert not by["mlx-lm-2024-06"].same and "scale 10 instead of 40" in by["mlx-lm-2024-06"].detail
    assert "FAILS to load: it reads num_layers" in by["mlx-lm"].detail
    dora, _ = mlx_folder(tmp_path / "dora", {"rank": 4, "scale": 2.0}, fine_tune_type="dora", num_layers=2)
    by = {x.convention: x for x in C.as_loaded(C.open(dora, None).adapters[0])}
    assert "DoRA's m is not applied by the releases that read use_dora" in by["mlx-lm-2024-06"].detail
