"""Conv LoRA with the real peft 0.21.2: a tiny torch model that is not from transformers (nn.Conv2d ×2, nn.Conv3d,
nn.Conv1d, kernels > 1 with stride and padding, a Linear head; golden/families/peft/tiny_conv.py), adapted
by real LoraConfigs, converted with the CLI to every PEFT era, and loaded back with PeftModel.from_pretrained on a
fresh base. Targets that cannot hold conv LoRA, and eras whose PEFT does not wrap a layer type yet, must refuse
with exit code 2 and one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_migrate.cli import main

from .peft_models import make_peft, peft_logits
from .tolerance import assert_logits_close

pytest.importorskip("peft")


ALL = ["conv1", "conv2", "conv3d", "conv1d", "head"]
CONV2D = ["conv1", "conv2", "head"]  # what every PEFT era wraps (nn.Conv2d since 0.6)
CASES = {
    "plain": dict(target_modules=ALL, r=4, lora_alpha=8),
    "conv2d": dict(target_modules=CONV2D, r=4, lora_alpha=8),
    "rslora": dict(target_modules=ALL, r=4, lora_alpha=8, use_rslora=True),
    "rslora_conv2d": dict(target_modules=CONV2D, r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(target_modules=CONV2D, r=4, lora_alpha=8, rank_pattern={"conv2": 8},
                     alpha_pattern={"conv1": 32, "head": 4}),
    "patterns_all": dict(target_modules=ALL, r=4, lora_alpha=8, rank_pattern={"conv3d": 8, "conv1d": 2},
                         alpha_pattern={"conv1": 32, "conv1d": 3}),
    "lora_bias": dict(target_modules=["conv1", "conv2", "conv3d", "head"], r=4, lora_alpha=16, lora_bias=True),
    "dora": dict(target_modules=ALL, r=4, lora_alpha=8, use_dora=True),
    "dora_conv2d": dict(target_modules=CONV2D, r=4, lora_alpha=8, use_dora=True),
}
PEFT_ERAS = ["peft", "peft-0.16", "peft-0.15", "peft-0.14", "peft-0.13"]
NO_CONV = ["lorax", "vllm", "adapters-1.1", "adapters-1.0", "adapter-transformers-3.1"]
CONV1D = "LoRA on nn.Conv1d needs PEFT ≥ 0.15"
# (case, target) → a refusal message fragment; every other (case, PEFT era) pair must reproduce the logits
REFUSED = {
    **{(c, t): CONV1D for c in ("plain", "rslora", "patterns_all") for t in ("peft-0.14", "peft-0.13")},
    ("lora_bias", "peft-0.13"): "lora_B.bias needs PEFT ≥ 0.14",
    ("dora", "peft-0.15"): "DoRA on nn.Conv1d needs PEFT ≥ 0.16",
    ("dora", "peft-0.14"): CONV1D, ("dora", "peft-0.13"): CONV1D,
    **{(c, t): f"{t} cannot express conv LoRA" for c in CASES for t in NO_CONV},
}
PAIRS = [(c, t) for c in CASES for t in PEFT_ERAS + NO_CONV]

_made: dict = {}


def _source(case, tmp_path_factory):
    if case not in _made:
        d = tmp_path_factory.mktemp(f"conv_{case}") / "src"
        ref, base = make_peft(d, "conv", **CASES[case])
        assert (ref - base).abs().max() > 1e-2  # the adapter does something
        _made[case] = (d, ref)
    return _made[case]


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.mark.parametrize("case,target", PAIRS, ids=[f"{c}->{t}" for c, t in PAIRS])
def test_conv_lora_reproduced_by_real_peft_or_refused(case, target, tmp_path, tmp_path_factory):
    src, ref = _source(case, tmp_path_factory)
    code, out = _cli("convert", src, tmp_path / "out", "--to", target)
    if (case, target) in REFUSED:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and REFUSED[(case, target)] in lines[0], out
        assert not (tmp_path / "out").exists()
        return
    assert code == 0, out
    got = peft_logits(tmp_path / "out", "conv")
    assert_logits_close(got, ref)


def test_conv_eras_write_what_each_needs(tmp_path, tmp_path_factory):
    """rsLoRA into 0.13 is alpha·√r per module; DoRA on Conv2d into the 0.6–0.13 era is written with a note that
    it needs 0.10; the conv factors keep their kernel dimensions."""
    src, _ = _source("rslora_conv2d", tmp_path_factory)
    code, out = _cli("convert", src, tmp_path / "o13", "--to", "peft-0.13")
    cfg = json.loads((tmp_path / "o13" / "adapter_config.json").read_text())
    assert code == 0 and "use_rslora" not in cfg and cfg["lora_alpha"] == pytest.approx(8 * 2.0)
    src, _ = _source("dora_conv2d", tmp_path_factory)
    code, out = _cli("convert", src, tmp_path / "d13", "--to", "peft-0.13")
    assert code == 0 and "DoRA on nn.Conv2d needs PEFT ≥ 0.10" in out
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "d13" / "adapter_model.safetensors")
    assert tuple(sd["base_model.model.conv1.lora_A.weight"].shape) == (4, 3, 3, 3)
    assert tuple(sd["base_model.model.conv1.lora_B.weight"].shape) == (8, 4, 1, 1)
    assert tuple(sd["base_model.model.conv1.lora_magnitude_vector"].shape) == (1, 8, 1, 1)


def test_check_and_inspect_on_conv(tmp_path_factory):
    """`check` passes a conv adapter (its factors are not matrices) and `inspect` says which eras cannot load it."""
    src, _ = _source("plain", tmp_path_factory)
    code, out = _cli("check", src)
    assert code == 0, out
    code, out = _cli("inspect", src)
    assert code == 0
    lines = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if "loaded as is by" in ln}
    assert "FAILS to load: LoRA on nn.Conv1d needs PEFT ≥ 0.15" in lines["loaded as is by peft >=0.14,<0.15"]
    assert "same ΔW" in lines["loaded as is by peft >=0.15,<0.16"]
    assert "converting is refused too" in lines["loaded as is by lorax >=0.9"]
