"""fix-merged with the real PEFT: a tiny Llama with biased q/v projections, a lora_bias adapter merged the way
PEFT 0.14.0–0.15.2 did (W += s·BA, b += l; peft.md §2), and an rsLoRA adapter merged at alpha/r."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lora_migrate
from lora_migrate.cli import main

from .models import build, inputs_for, logits as run_logits
from .peft_models import randomize

MODEL_KW = {"attention_bias": True}
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "peft" / "pf152" / "llama_lora_bias_merged"


def _merge(tmp: Path, name: str, *, bug_bias: bool, scale_used: float | None = None, **lora_kw):
    """Save a randomized PEFT adapter; merge it by hand as a buggy merger did and save_pretrained the result
    (single file and sharded). Returns (adapter dir, merged dir, sharded dir, unmerged PEFT logits)."""
    from peft import LoraConfig, get_peft_model

    base = build("llama", 0, **MODEL_KW)
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(**lora_kw))
    randomize(model, 1)
    model.eval()
    ref = run_logits(model, inputs)
    adapter = tmp / f"{name}_adapter"
    model.save_pretrained(adapter)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    plain = model.unload()  # drop the LoRA wrappers without merging; merge by hand below
    with torch.no_grad():
        for n, m in layers.items():
            s = m.scaling["default"] if scale_used is None else scale_used
            base_layer = m.get_base_layer()
            base_layer.weight += s * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            lb = m.lora_B["default"].bias
            if lb is not None:
                base_layer.bias += lb if bug_bias else s * lb  # peft 0.14.0–0.15.2: b += l (unscaled)
    merged, sharded = tmp / f"{name}_merged", tmp / f"{name}_sharded"
    plain.save_pretrained(merged)
    plain.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    return adapter, merged, sharded, ref


def _logits(folder: Path) -> torch.Tensor:
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(folder).eval()
    return run_logits(model, inputs_for(model))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bias_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bias")
    return _merge(tmp, "bias", bug_bias=True, r=8, lora_alpha=32, lora_bias=True,
                  target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_unscaled_bias_merge_repaired(bias_case, tmp_path, layout):
    adapter, merged, sharded, ref = bias_case
    src = merged if layout == "single" else sharded
    before = _files(src)
    broken = _logits(src)
    assert (broken - ref).abs().max() > 1e-2  # the buggy merge really is wrong, so the test can fail
    out = tmp_path / "fixed"
    r = lora_migrate.fix_merged(src, out, adapter=adapter, merged_with="peft@0.15.2")
    assert r.ok and r.untouched_identical
    assert {t.key for t in r.repaired} == {f"model.layers.{i}.self_attn.{p}.bias" for i in range(2)
                                           for p in ("q_proj", "v_proj")}
    assert all(t.what == "bias" and t.scale_used == 1 and t.scale_true == 4 for t in r.repaired)
    assert r.max_rel_to_weight <= 4 * 2.0**-24
    assert _files(src) == before  # input untouched
    fixed = _logits(out)
    assert (fixed - ref).abs().max() <= 1e-5
    # same names and layout: the index (if any), config and every tensor name carried over
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (src / name).exists():
            assert (out / name).read_bytes() == (src / name).read_bytes()
    for p in src.glob("*.safetensors"):
        a, b = load_file(p), load_file(out / p.name)
        assert list(a) == list(b)
        for k in a:
            if not k.endswith(("q_proj.bias", "v_proj.bias")):
                assert torch.equal(a[k], b[k])
            else:
                assert not torch.equal(a[k], b[k])


def test_cli_fix_merged_json(bias_case, tmp_path):
    adapter, merged, _, ref = bias_case
    out = tmp_path / "fixed"
    res = CliRunner().invoke(main, ["fix-merged", str(merged), str(out), "--adapter", str(adapter),
                                    "--merged-with", "peft-0.14", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data["repaired"]) == 4 and data["untouched_identical"]
    assert (_logits(out) - ref).abs().max() <= 1e-5
    res = CliRunner().invoke(main, ["fix-merged", str(merged), str(out), "--adapter", str(adapter),
                                    "--merged-with", "peft-0.14"])
    assert res.exit_code == 2 and "already exists" in res.output


def test_rslora_merged_at_alpha_over_r(tmp_path):
    kw = dict(r=8, lora_alpha=32, use_rslora=True, lora_bias=True, target_modules=["q_proj", "v_proj"])
    adapter, merged, sharded, ref = _merge(tmp_path, "rs", bug_bias=False, scale_used=4.0, **kw)
    assert (_logits(merged) - ref).abs().max() > 1e-2
    # the scale given explicitly
    out = tmp_path / "fixed_explicit"
    r = lora_migrate.fix_merged(sharded, out, adapter=adapter, merged_with="peft", scale_used=4.0)
    assert r.ok and len(r.repaired) == 8  # weight and bias of 4 modules
    assert all(math.isclose(t.scale_true, 32 / math.sqrt(8)) for t in r.repaired)
    assert (_logits(out) - ref).abs().max() <= 1e-5
    # the scale derived from the convention that merged it: LoRAX applies alpha/r whatever use_rslora says
    out2 = tmp_path / "fixed_lorax"
    r2 = lora_migrate.fix_merged(merged, out2, adapter=adapter, merged_with="lorax")
    assert r2.ok and {t.scale_used for t in r2.repaired} == {4.0}
    assert (_logits(out2) - ref).abs().max() <= 1e-5


def _cli(*args):
    return CliRunner().invoke(main, ["fix-merged", *map(str, args)])


def test_errors_exit_2(bias_case, tmp_path):
    adapter, merged, _, _ = bias_case
    # nothing to repair: PEFT ≥ 0.16 merges the bias correctly
    res = _cli(merged, tmp_path / "o1", "--adapter", adapter, "--merged-with", "peft-0.16")
    assert res.exit_code == 2 and "nothing to repair" in res.output and "Traceback" not in res.output
    res = _cli(merged, tmp_path / "o1", "--adapter", adapter, "--merged-with", "peft", "--scale-used", "4")
    assert res.exit_code == 2 and "nothing to repair" in res.output
    # missing key, wrong shape
    sd = load_file(merged / "model.safetensors")
    for what, change in (("missing", lambda d: d.pop("model.layers.1.self_attn.v_proj.bias")),
                         ("shape", lambda d: d.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(5)))):
        bad = tmp_path / f"bad_{what}"
        shutil.copytree(merged, bad)
        d = dict(sd)
        change(d)
        save_file(d, bad / "model.safetensors", metadata={"format": "pt"})
        res = _cli(bad, tmp_path / f"o_{what}", "--adapter", adapter, "--merged-with", "peft-0.15")
        assert res.exit_code == 2, res.output
        assert ("has no tensor 'model.layers.1.self_attn.v_proj.bias'" if what == "missing"
                else "has shape [5]") in res.output
        assert not (tmp_path / f"o_{what}").exists()
    # output inside the input, unknown convention, adapter with no bias for a bias-only bug
    res = _cli(merged, merged / "sub", "--adapter", adapter, "--merged-with", "peft-0.15")
    assert res.exit_code == 2 and "inside the input" in res.output
    res = _cli(merged, tmp_path / "o2", "--adapter", adapter, "--merged-with", "peft-9.9")
    assert res.exit_code == 2 and "unknown convention" in res.output
    res = _cli(tmp_path / "nowhere", tmp_path / "o3", "--adapter", adapter, "--merged-with", "peft-0.15")
    assert res.exit_code == 2 and "not a folder" in res.output


@pytest.mark.parametrize("layout", ["merged", "merged_sharded"])
def test_golden_peft_0152_merge(tmp_path, layout):
    """A lora_bias adapter merged by the real peft 0.15.2 + transformers 4.51.3 (golden/harness.py, family peft)."""
    case = GOLDEN
    assert (case / layout).is_dir(), f"golden case missing: {case / layout}"
    out = tmp_path / "fixed"
    r = lora_migrate.fix_merged(case / layout, out, adapter=case / "adapter", merged_with="peft@0.15.2")
    assert r.ok and r.repaired and all(t.what == "bias" for t in r.repaired)
    import transformers as tf

    want = load_file(case / "logits.safetensors")  # logits: unmerged PEFT 0.15.2; logits_merged: its merge
    inputs = {k: torch.tensor(v) for k, v in json.loads((case / "input.json").read_text()).items()}
    broken = run_logits(tf.AutoModelForCausalLM.from_pretrained(case / layout).eval(), inputs)
    fixed = run_logits(tf.AutoModelForCausalLM.from_pretrained(out).eval(), inputs)
    assert (broken - want["logits_merged"]).abs().max() <= 1e-5  # we load what peft 0.15.2 merged
    assert (broken - want["logits"]).abs().max() > 1e-2  # which is wrong
    assert (fixed - want["logits"]).abs().max() <= 1e-5  # and repaired


def test_golden_peft_0152_merge_is_the_simulated_bug(tmp_path):
    """The real peft 0.15.2 merge_and_unload did exactly W += s·BA, b += l (what the tests above simulate)."""
    case = GOLDEN
    base = load_file(case.parent / "_base" / "llama_bias" / "model.safetensors")
    merged = load_file(case / "merged" / "model.safetensors")
    ad = load_file(case / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((case / "adapter" / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    assert s != 1 and cfg["lora_bias"]
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in ad if k.endswith("lora_A.weight")}
    assert modules
    for m in modules:
        A, B = ad[f"base_model.model.{m}.lora_A.weight"], ad[f"base_model.model.{m}.lora_B.weight"]
        lb = ad[f"base_model.model.{m}.lora_B.bias"]
        assert torch.allclose(merged[f"{m}.weight"], base[f"{m}.weight"] + s * (B @ A), atol=1e-6)
        assert torch.allclose(merged[f"{m}.bias"], base[f"{m}.bias"] + lb, atol=1e-6)  # unscaled: the bug
        assert not torch.allclose(merged[f"{m}.bias"], base[f"{m}.bias"] + s * lb, atol=1e-3)
    for k in merged:
        if not any(k.startswith(m + ".") for m in modules):
            assert torch.equal(merged[k], base[k]), k


def test_gpt2_conv1d_wrong_scale(tmp_path):
    """GPT-2 Conv1D weights are stored (in, out): the correction is (B·A)ᵀ (fan_in_fan_out)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = build("gpt2", 0)
    inputs = inputs_for(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, use_rslora=True, fan_in_fan_out=True,
                                            target_modules=["c_attn", "c_fc"]))
    randomize(model, 1)
    model.eval()
    ref = run_logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    for m in model.modules():
        if hasattr(m, "scaling") and "default" in m.scaling:
            m.scaling["default"] = 16 / 4  # a merger that ignored use_rslora: alpha/r
    plain = model.merge_and_unload()
    plain.save_pretrained(tmp_path / "merged")
    broken = run_logits(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval(), inputs)
    assert (broken - ref).abs().max() > 1e-2
    r = lora_migrate.fix_merged(tmp_path / "merged", tmp_path / "fixed", adapter=tmp_path / "adapter",
                                merged_with="vllm")
    assert r.ok and len(r.repaired) == 4 and all(t.scale_used == 4 and t.scale_true == 8 for t in r.repaired)
    fixed = run_logits(tf.GPT2LMHeadModel.from_pretrained(tmp_path / "fixed").eval(), inputs)
    assert (fixed - ref).abs().max() <= 1e-5
