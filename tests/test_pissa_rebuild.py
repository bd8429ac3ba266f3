"""--base-model: a PiSSA / OLoRA adapter saved without its initial adapter becomes rank-2r LoRA on the ORIGINAL
base, with (A₀, B₀) rebuilt from the original weights. Acceptance with the real peft 0.21.2 (and adapters
1.3.0): tiny Llama / GPT-2 built from configs with fixed seeds, the original weights saved with
``save_pretrained`` as the base model, adapters "trained" by a seeded perturbation, logits compared in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_migrate.cli import main
from lora_migrate.errors import LoraMigrateError
from lora_migrate.initial import base_weight_keys
from lora_migrate.io._common import few_threads as one_thread

from .tolerance import SVD_ULPS, assert_logits_close, assert_rebuilt_deltas_close, base_noise
from .models import build, inputs_for, logits, load_base
from .peft_models import adapters_logits, peft_logits

pytest.importorskip("peft")


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AH_LLAMA = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # where AdapterHub's Llama LoRA attaches
AH_GPT2 = ["c_attn", "mlp.c_proj", "c_fc"]
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "peft" / "pf21"

CASES = {
    "llama_pissa": dict(arch="llama", lora=dict(init_lora_weights="pissa", target_modules=LLAMA_ALL, r=4,
                                                lora_alpha=8)),
    "llama_olora": dict(arch="llama", lora=dict(init_lora_weights="olora", target_modules=LLAMA_ALL, r=4,
                                                lora_alpha=8)),
    "llama_pissa_rslora": dict(arch="llama", lora=dict(init_lora_weights="pissa", target_modules=AH_LLAMA, r=4,
                                                       lora_alpha=8, use_rslora=True)),
    "llama_pissa_patterns": dict(arch="llama", lora=dict(init_lora_weights="pissa", target_modules=AH_LLAMA, r=4,
                                                         lora_alpha=8, rank_pattern={"q_proj": 8},
                                                         alpha_pattern={"v_proj": 32})),
    "llama_olora_patterns": dict(arch="llama", lora=dict(init_lora_weights="olora", target_modules=LLAMA_ALL, r=2,
                                                         lora_alpha=6, rank_pattern={"layers.1.mlp.up_proj": 6},
                                                         alpha_pattern={"o_proj": 2})),
    "gpt2_pissa": dict(arch="gpt2", lora=dict(init_lora_weights="pissa", target_modules=AH_GPT2 + ["attn.c_proj"],
                                              r=4, lora_alpha=8, fan_in_fan_out=True)),
    # PEFT's olora_init ignores fan_in_fan_out: only the square attn.c_proj works at all (c_attn crashes)
    "gpt2_olora": dict(arch="gpt2", lora=dict(init_lora_weights="olora", target_modules=["attn.c_proj"], r=4,
                                              lora_alpha=8, fan_in_fan_out=True)),
}
_made: dict = {}


def _perturb(model, seed: int) -> None:
    """'Training': add seeded noise to every LoRA factor (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def make_case(root: Path, arch: str, lora: dict, seed: int = 7, peft_conversion: bool = True) -> dict:
    """base/ (original weights), init/ (PEFT's initial adapter), trained/ (saved without the initial adapter),
    peft_conv/ (PEFT's own rank-2r conversion); returns the reference logits (trained adapter on the residual)."""
    from peft import LoraConfig, get_peft_model

    base = build(arch, 0)
    inputs = inputs_for(base)
    base.save_pretrained(root / "base")
    with one_thread():  # as lora-migrate runs: LAPACK's SVD/QR differ in the last bits with the thread count
        model = get_peft_model(base, LoraConfig(**lora))
    init = lora["init_lora_weights"]
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(root / "init")
    model.peft_config["default"].init_lora_weights = init
    _perturb(model, seed)
    model.eval()
    ref = logits(model, inputs)
    model.save_pretrained(root / "trained")
    if peft_conversion and not (lora.get("use_rslora") and (lora.get("rank_pattern") or lora.get("alpha_pattern"))):
        model.save_pretrained(root / "peft_conv", path_initial_model_for_weight_conversion=str(root / "init"))
    return dict(root=root, ref=ref, arch=arch)


def _case(name: str, tmp_path_factory) -> dict:
    if name not in _made:
        c = CASES[name]
        _made[name] = make_case(tmp_path_factory.mktemp(name), c["arch"], c["lora"])
    return _made[name]


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _init_products(folder: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {k: sd[k.replace("lora_A", "lora_B")].double() @ sd[k].double() for k in sd if "lora_A" in k}


def _rebuilt_products(out: Path, trained: Path) -> dict[str, torch.Tensor]:
    """B₀A₀ as the converted output holds it: A' = [A; A₀], B' = [B, −B₀] (before any rescale: --to peft keeps s)."""
    sd, tr = load_file(str(out / "adapter_model.safetensors")), load_file(str(trained / "adapter_model.safetensors"))
    res = {}
    for k in tr:
        if "lora_A" in k:
            r = tr[k].shape[0]
            kb = k.replace("lora_A", "lora_B")
            res[k] = -sd[kb][:, r:].double() @ sd[k][r:].double()
    return res


@pytest.mark.parametrize("name", sorted(CASES))
def test_base_model_rebuild_reproduces_the_trained_adapter_on_the_original_base(name, tmp_path, tmp_path_factory):
    c = _case(name, tmp_path_factory)
    root, out = c["root"], tmp_path / "out"
    code, stdout, stderr = run("convert", root / "trained", out, "--to", "peft", "--base-model", root / "base")
    assert code == 0, stderr
    assert "OK" in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    src_cfg = json.loads((root / "trained" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 2 * src_cfg["r"]
    assert_logits_close(peft_logits(out, c["arch"]), c["ref"])
    # the saved initial adapter gives the same bytes (for GPT-2 OLoRA through olora_stored_init)
    code, _, stderr = run("convert", root / "trained", tmp_path / "saved", "--to", "peft", "--initial-adapter",
                          root / "init")
    assert code == 0, stderr
    assert (tmp_path / "saved" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()
    # our B₀A₀ against the product of PEFT's own saved initial adapter
    ours, theirs = _rebuilt_products(out, root / "trained"), _init_products(root / "init")
    assert ours.keys() == theirs.keys()
    # PEFT's olora_init subtracts (Q_r·R_r) in the stored (in, out) layout; a QR of the transposed matrix takes
    # other kernels (MKL_ENABLE_INSTRUCTIONS=AVX2: 4e-19 apart), so products are compared to their rounding
    flip = (lambda t: t.T) if name == "gpt2_olora" else (lambda t: t)
    for k in ours:
        assert (ours[k] - flip(theirs[k])).norm() <= SVD_ULPS * 2.0**-24 * theirs[k].norm(), k
    if (root / "peft_conv").exists():
        peft_got = peft_logits(root / "peft_conv", c["arch"])
        if name == "gpt2_olora":  # PEFT's own conversion subtracts the untransposed Q_r·R_r: it is off
            assert (peft_got - c["ref"]).abs().max().item() > 1e-2
        else:
            assert_logits_close(peft_got, c["ref"])
            mine = load_file(str(out / "adapter_model.safetensors"))
            peft = load_file(str(root / "peft_conv" / "adapter_model.safetensors"))
            assert mine.keys() == peft.keys() and all(torch.equal(mine[k], peft[k]) for k in mine)


@pytest.mark.parametrize("name,target", [("llama_pissa_rslora", "adapters-1.3"),
                                         ("llama_pissa_patterns", "adapters@1.3.0"), ("gpt2_pissa", "adapters-1.3")])
def test_base_model_rebuild_into_adapterhub_reproduces_the_logits(name, target, tmp_path, tmp_path_factory):
    c = _case(name, tmp_path_factory)
    root = c["root"]
    if name == "gpt2_pissa":  # AdapterHub's GPT-2 LoRA cannot wrap attn.c_proj: a case without it
        root = tmp_path / "src"
        c = make_case(root, "gpt2", dict(CASES[name]["lora"], target_modules=AH_GPT2), peft_conversion=False)
    code, _, stderr = run("convert", root / "trained", tmp_path / "ah", "--to", target, "--base-model", root / "base")
    assert code == 0, stderr
    assert_logits_close(adapters_logits(tmp_path / "ah", c["arch"]), c["ref"])


@pytest.mark.parametrize("target", ["lorax", "vllm", "peft-0.13"])
def test_base_model_rebuild_into_serving_and_old_peft_reproduces_the_logits(target, tmp_path, tmp_path_factory):
    c = _case("llama_pissa_patterns", tmp_path_factory)
    root = c["root"]
    code, _, stderr = run("convert", root / "trained", tmp_path / "o", "--to", target, "--base-model", root / "base")
    assert code == 0, stderr
    assert_logits_close(peft_logits(tmp_path / "o", "llama"), c["ref"])


def test_base_model_in_every_layout_gives_the_same_bytes(tmp_path, tmp_path_factory):
    """model.safetensors, sharded safetensors, pytorch_model.bin, the bare LlamaModel's keys (no 'model.'
    prefix), a single weight file: the same output, byte for byte."""
    c = _case("llama_pissa", tmp_path_factory)
    root = c["root"]
    base = build("llama", 0)
    base.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    base.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    base.model.save_pretrained(tmp_path / "bare")
    assert "layers.0.self_attn.q_proj.weight" in load_file(str(tmp_path / "bare" / "model.safetensors"))
    outs = {}
    for b in (root / "base", tmp_path / "sharded", tmp_path / "bin", tmp_path / "bare",
              root / "base" / "model.safetensors"):
        out = tmp_path / f"out_{len(outs)}"
        code, _, stderr = run("convert", root / "trained", out, "--to", "peft", "--base-model", b)
        assert code == 0, (b, stderr)
        outs[b] = (out / "adapter_model.safetensors").read_bytes()
    assert len(set(outs.values())) == 1


def test_base_model_from_the_hub_cache_offline(tmp_path, tmp_path_factory, monkeypatch):
    from huggingface_hub import constants

    from .hubfake import fill_cache

    c = _case("llama_pissa", tmp_path_factory)
    root = c["root"]
    fill_cache(tmp_path / "hub", "org/tiny-llama", {p.name: p.read_bytes() for p in (root / "base").iterdir()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, stderr = run("convert", root / "trained", tmp_path / "o", "--to", "peft", "--base-model",
                          "hf://org/tiny-llama")
    assert code == 0, stderr
    assert_logits_close(peft_logits(tmp_path / "o", "llama"), c["ref"])
    _refused(["convert", root / "trained", tmp_path / "x", "--to", "peft", "--base-model", "hf://org/not-cached"],
             tmp_path / "x", "not in the local Hugging Face cache")


def test_inspect_says_how_to_convert_a_residual_adapter(tmp_path_factory):
    c = _case("llama_olora", tmp_path_factory)
    code, stdout, _ = run("inspect", c["root"] / "trained")
    assert code == 0 and "init_lora_weights='olora' changed the base weights" in stdout
    assert "--base-model BASE" in stdout


def test_base_weight_keys_handle_a_prefix_either_way():
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    bare = ["layers.0.self_attn.q_proj.weight", "layers.1.mlp.up_proj.weight", "norm.weight"]
    keys, how = base_weight_keys(mods, bare)
    assert keys[mods[1]] == "layers.1.mlp.up_proj.weight" and how == "prefix 'model.' removed"
    keys, how = base_weight_keys([m.removeprefix("model.") for m in mods], [f"model.{k}" for k in bare])
    assert keys["layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert how == "prefix 'model.' added"
    keys, how = base_weight_keys(mods, [f"{m}.weight" for m in mods] + bare)  # both present: as named
    assert keys[mods[0]] == "model.layers.0.self_attn.q_proj.weight" and how is None
    with pytest.raises(LoraMigrateError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        base_weight_keys(mods, ["model.layers.0.self_attn.q_proj.weight"])


def test_bf16_base_rebuilds_the_factors_peft_stored(tmp_path):
    """PEFT computes in float32, moves the factors to the base layer's bfloat16 and keeps the adapter in float32
    (autocast_adapter_dtype): the rebuilt A₀, B₀ are PEFT's saved ones bit for bit."""
    from peft import LoraConfig, get_peft_model

    base = build("llama", 0).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    with one_thread():
        model = get_peft_model(base, LoraConfig(init_lora_weights="pissa", target_modules=["q_proj", "down_proj"],
                                                r=4, lora_alpha=8))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    _perturb(model, 3)
    model.save_pretrained(tmp_path / "trained")
    code, _, stderr = run("convert", tmp_path / "trained", tmp_path / "out", "--to", "peft",
                          "--base-model", tmp_path / "base")
    assert code == 0, stderr
    out, init = load_file(str(tmp_path / "out" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "init" / "adapter_model.safetensors"))
    for k, A0 in init.items():
        if "lora_A" in k:
            r = A0.shape[0]
            assert out[k].dtype == torch.float32 and torch.equal(out[k][r:], A0)
            kb = k.replace("lora_A", "lora_B")
            assert torch.equal(-out[kb][:, r:], init[kb])


def test_verify_takes_the_base_model_too(tmp_path, tmp_path_factory):
    c = _case("llama_olora", tmp_path_factory)
    root = c["root"]
    assert run("convert", root / "trained", tmp_path / "o", "--to", "peft", "--base-model", root / "base")[0] == 0
    code, stdout, _ = run("verify", root / "trained", tmp_path / "o", "--base-model", root / "base")
    assert code == 0 and "OK" in stdout
    assert run("verify", root / "trained", tmp_path / "o", "--initial-adapter", root / "init")[0] == 0
    assert run("verify", root / "trained", tmp_path / "o")[0] == 1  # rank r vs 2r: not the same ΔW


# ------------------------------------------------------------------------------------------------ refusals


def _refused(args, out: Path, match: str) -> None:
    code, stdout, stderr = run(*args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_pissa_niter_needs_the_saved_initial_adapter(tmp_path):
    c = make_case(tmp_path / "src", "llama", dict(init_lora_weights="pissa_niter_4", target_modules=["q_proj"], r=4,
                                                  lora_alpha=8), peft_conversion=False)
    trained, out = c["root"] / "trained", tmp_path / "out"
    _refused(["convert", trained, out, "--to", "peft"], out, "--initial-adapter")
    _refused(["convert", trained, out, "--to", "peft", "--base-model", c["root"] / "base"], out,
             "init_lora_weights='pissa_niter_4' cannot be rebuilt from the base weights (its SVD is the randomized "
             "torch.svd_lowrank); it needs the saved initial adapter (--initial-adapter)")
    stdout = run("inspect", trained)[1]
    assert "'pissa_niter_4' changed the base weights" in stdout and "--base-model" not in stdout
    code, _, stderr = run("convert", trained, out, "--to", "peft", "--initial-adapter", c["root"] / "init")
    assert code == 0, stderr
    assert_logits_close(peft_logits(out, "llama"), c["ref"])


def test_missing_or_misshapen_base_weights_are_refused(tmp_path, tmp_path_factory):
    c = _case("llama_pissa", tmp_path_factory)
    root, out = c["root"], tmp_path / "out"
    sd = load_file(str(root / "base" / "model.safetensors"))
    (tmp_path / "missing").mkdir()
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              tmp_path / "missing" / "model.safetensors")
    _refused(["convert", root / "trained", out, "--to", "peft", "--base-model", tmp_path / "missing"], out,
             "the base model has no tensor 'model.layers.1.mlp.up_proj.weight' for adapter module "
             "'model.layers.1.mlp.up_proj'")
    (tmp_path / "shape").mkdir()
    bad = dict(sd)
    bad["model.layers.0.mlp.down_proj.weight"] = bad["model.layers.0.mlp.down_proj.weight"].T.contiguous()
    save_file(bad, tmp_path / "shape" / "model.safetensors")
    _refused(["convert", root / "trained", out, "--to", "peft", "--base-model", tmp_path / "shape"], out,
             "the base model's 'model.layers.0.mlp.down_proj.weight' has shape [64, 32], but adapter module "
             "'model.layers.0.mlp.down_proj'")
    _refused(["convert", root / "trained", out, "--to", "peft", "--base-model", tmp_path / "nowhere"], out,
             "no such file or folder")
    (tmp_path / "empty").mkdir()
    _refused(["convert", root / "trained", out, "--to", "peft", "--base-model", tmp_path / "empty"], out,
             "no model weights")


def test_base_model_with_initial_adapter_or_with_a_plain_adapter_is_refused(tmp_path, tmp_path_factory):
    from .peft_models import make_peft

    c = _case("llama_pissa", tmp_path_factory)
    root, out = c["root"], tmp_path / "out"
    _refused(["convert", root / "trained", out, "--to", "peft", "--base-model", root / "base",
              "--initial-adapter", root / "init"], out, "pass one")
    make_peft(tmp_path / "plain", "llama", target_modules=["q_proj"], r=4, lora_alpha=8)
    _refused(["convert", tmp_path / "plain", out, "--to", "peft", "--base-model", root / "base"], out,
             "init_lora_weights=True did not; leave it out")


# ------------------------------------------------------------------------------------------------ goldens


@pytest.mark.parametrize("case", ["llama_pissa", "llama_olora"])
def test_golden_pissa_olora_with_the_base_model(case, tmp_path):
    """golden/peft/pf21/<case>: adapter/ with --base-model _base/llama reproduces the committed logits (the trained
    adapter on residual_base), and computes the same ΔW as peft's own converted_by_peft/, module by module, by the
    project's factored check. The factors come out of an SVD (PiSSA) or a QR (OLoRA), whose last bits depend on the
    CPU's LAPACK kernels, so they are compared by what they compute, not by bytes: byte identity with PEFT is
    claimed for one machine, and tested live where PEFT and lora-migrate run on the same one
    (test_base_model_rebuild_reproduces_the_trained_adapter_on_the_original_base)."""
    cdir = GOLDEN / case
    meta = json.loads((cdir / "meta.json").read_text())
    base_dir = (cdir / meta["base"]).resolve()
    assert (base_dir / "model.safetensors").is_file() and (cdir / "logits.safetensors").is_file()
    out = tmp_path / "out"
    code, _, stderr = run("convert", cdir / "adapter", out, "--to", "peft", "--base-model", base_dir)
    assert code == 0, stderr
    from peft import PeftModel

    base = load_base(base_dir)
    stored = load_file(str(cdir / "logits.safetensors"))
    noise = base_noise(base, inputs_for(base, cdir / "input.json"), stored["base_logits"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    got = logits(model, inputs_for(model, cdir / "input.json"))
    assert_logits_close(got, stored["logits"], noise=noise, what=case)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert_rebuilt_deltas_close(load_file(str(out / "adapter_model.safetensors")),
                                load_file(str(cdir / "converted_by_peft" / "adapter_model.safetensors")),
                                load_file(str(base_dir / "model.safetensors")), cfg["lora_alpha"] / cfg["r"], what=case)


@pytest.mark.parametrize("case", ["llama_pissa", "llama_olora"])
def test_golden_pissa_olora_bytes_on_the_machine_that_wrote_them(case, tmp_path):
    """Byte identity with peft's converted_by_peft/ is claimed only on the machine that wrote the golden (its CPU
    and the kernels torch picked there, recorded in meta.json's ``machine``); elsewhere this test says so and
    skips."""
    from .tolerance import this_machine

    cdir = GOLDEN / case
    meta = json.loads((cdir / "meta.json").read_text())
    if meta.get("machine") != this_machine():
        pytest.skip(f"byte identity with PEFT is claimed only on the machine that wrote the golden "
                    f"({meta.get('machine') or 'not recorded in meta.json'}); this is {this_machine()}")
    out = tmp_path / "out"
    code, _, stderr = run("convert", cdir / "adapter", out, "--to", "peft", "--base-model",
                          (cdir / meta["base"]).resolve())
    assert code == 0, stderr
    mine, peft = load_file(str(out / "adapter_model.safetensors")), \
        load_file(str(cdir / "converted_by_peft" / "adapter_model.safetensors"))
    assert mine.keys() == peft.keys() and all(torch.equal(mine[k], peft[k]) for k in mine)
