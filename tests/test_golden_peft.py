"""The PEFT goldens (golden/peft/, written by golden/harness.py's family peft with the real peft 0.21.2, 0.15.2 and
0.13.2 in their own venvs) are self-consistent when read back with this environment's peft 0.21.2, and the
acceptance run of the converter against them (golden/results/peft.json) has no failed row.

Independent of lora_migrate: only transformers, peft and the committed files (and, for the conv cases, the tiny conv
model defined in golden/families/peft/tiny_conv.py). A missing golden file fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from .models import inputs_for, load_base, logits
from .tolerance import assert_logits_close, base_noise

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PEFT_GOLDEN = GOLDEN / "peft"
EXPECTED = [
    "pf21/llama_plain", "pf21/llama_rslora", "pf21/llama_patterns", "pf21/llama_rslora_patterns",
    "pf21/llama_lora_bias", "pf21/llama_embed", "pf21/llama_dora", "pf21/llama_modules_to_save", "pf21/llama_multi",
    "pf21/gpt2_c_attn", "pf21/llama_pissa", "pf21/llama_olora", "pf21/conv", "pf21/conv2d_dora",
    "pf21/gemma3_embed", "pf21/bart_scaled_embed",
    "pf152/llama_plain", "pf152/llama_lora_bias_merged", "pf152/gemma3_embed",
    "pf013/llama_plain", "pf013/llama_patterns",
]
INIT_CASES = ["pf21/llama_pissa", "pf21/llama_olora"]


def _checks() -> dict:
    return json.loads((GOLDEN / "results" / "peft.json").read_text())["checks"]


def _case(case: str) -> tuple[Path, dict, dict]:
    cdir = PEFT_GOLDEN / case
    for f in ("meta.json", "input.json", "logits.safetensors", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert (cdir / f).is_file(), f"missing {cdir / f}: run python3 golden/harness.py generate --family peft"
    return cdir, json.loads((cdir / "meta.json").read_text()), load_file(str(cdir / "logits.safetensors"))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _run(model, cdir: Path) -> torch.Tensor:
    return logits(model, inputs_for(model, cdir / "input.json"))


def test_every_golden_case_is_there():
    for case in EXPECTED:
        _case(case)
    assert sorted(p.parent.relative_to(PEFT_GOLDEN).as_posix() for p in PEFT_GOLDEN.glob("*/*/meta.json")) == \
        sorted(EXPECTED)


@pytest.mark.parametrize("case", EXPECTED)
def test_peft_reproduces_the_committed_logits(case):
    """PeftModel.from_pretrained(rebuilt base, adapter/) (+ load_adapter for adapter/<name>) gives the committed
    logits. Adapters written by an older peft must behave here as generate measured it in the pf21 env (the
    0.13 combined rank/alpha pattern lookup really does differ in 0.21)."""
    cdir, meta, refs = _case(case)
    names = meta["adapters"]
    base = load_base((cdir / meta["base"]).resolve())
    noise = base_noise(base, inputs_for(base, cdir / "input.json"), refs["base_logits"])
    pm = PeftModel.from_pretrained(base, str(cdir / "adapter"), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(cdir / "adapter" / n), adapter_name=n)
    pm.eval()
    recorded = _checks()["crossload"]["pf21"]
    for name in names:
        pm.set_adapter(name)
        d = _maxdiff(_run(pm, cdir), refs["logits" if len(names) == 1 else f"logits_{name}"])
        rec = recorded[f"{case}:{name}"]
        ref = refs["logits" if len(names) == 1 else f"logits_{name}"]
        if case.startswith("pf21/") or rec["ok"]:
            assert_logits_close(_run(pm, cdir), ref, noise=noise, what=f"{case}:{name}")
        else:  # a real difference between eras, as generate measured it (≥ 0.09: far above any rounding)
            assert d == pytest.approx(rec["max_abs_diff"], rel=1e-3), (case, name, d, rec)
    if case.startswith("pf21/") and "logits_merged" in refs:
        merged = pm.merge_and_unload()
        assert_logits_close(_run(merged, cdir), refs["logits_merged"], noise=noise, what=f"{case} merged")


@pytest.mark.parametrize("case", INIT_CASES)
def test_pissa_olora_residual_and_converted_forms_agree(case, tmp_path):
    """The trained adapter on residual_base (init_lora_weights set to true, so peft does not re-run the init) and
    peft's own rank-2r conversion on the ORIGINAL base both give the committed logits."""
    cdir, meta, refs = _case(case)
    for f in ("pissa_init/adapter_config.json", "converted_by_peft/adapter_config.json",
              "residual_base/model.safetensors"):
        assert (cdir / f).is_file(), f"missing {cdir / f}"
    base = load_base((cdir / meta["base"]).resolve())
    noise = base_noise(base, inputs_for(base, cdir / "input.json"), refs["base_logits"])
    conv = PeftModel.from_pretrained(base, str(cdir / "converted_by_peft"))
    assert_logits_close(_run(conv.eval(), cdir), refs["logits"], noise=noise, what=case)
    adir = tmp_path / "adapter"
    shutil.copytree(cdir / "adapter", adir)
    cfg = json.loads((adir / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] in ("pissa", "olora")
    cfg["init_lora_weights"] = True
    (adir / "adapter_config.json").write_text(json.dumps(cfg))
    res = PeftModel.from_pretrained(load_base((cdir / "residual_base").resolve()), str(adir))
    assert_logits_close(_run(res.eval(), cdir), refs["logits"], noise=noise, what=f"{case} residual")


def test_peft_0_15_merged_bias_bug_is_in_the_merged_files():
    """merged/ and merged_sharded/ (peft 0.15.2 merge_and_unload) load with transformers, give the committed
    (wrong) logits_merged, and differ from the unmerged logits by the measured amount."""
    cdir, meta, refs = _case("pf152/llama_lora_bias_merged")
    assert (cdir / "merged_sharded" / "model.safetensors.index.json").is_file()
    bias = _checks()["cases"]["pf152/llama_lora_bias_merged"]["merged_bias"]
    assert bias["max_abs_vs_b_plus_l"] == 0.0 and bias["max_abs_vs_b_plus_s_l"] > 0.1
    for folder in ("merged", "merged_sharded"):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(cdir / folder)).eval()
        lg = _run(model, cdir)
        assert_logits_close(lg, refs["logits_merged"], what=f"{folder} (merged by peft 0.15.2)")
        assert _maxdiff(lg, refs["logits"]) > 0.01


def test_acceptance_peft_is_committed_and_has_no_failed_row():
    acc = json.loads((GOLDEN / "results" / "peft.json").read_text())["acceptance"]
    assert acc["records"], "golden/results/peft.json has no acceptance rows: run golden/harness.py accept"
    assert {r["status"] for r in acc["records"]} <= {"ok", "pending", "failed"}
    failed = [(r["case"], r["source"], r["target"], r["message"]) for r in acc["records"] if r["status"] == "failed"]
    assert not failed, failed
