"""Issue 12's four fidelity fixes, each proved with the real libraries (peft 0.21.2 in the test venv): adapters made
by peft on tiny models of the architectures involved, converted, and loaded back with ``PeftModel.from_pretrained``.

1. embedding LoRA on a scaled embedding (Gemma3, BART scale_embedding) between PEFT eras (#2825, 0.18.0);
2. rsLoRA into the serving profiles as an exact alpha rewrite (B untouched) instead of a fold;
3. ``modules_to_save`` entries matched by suffix, as PEFT matches them (``"norm"`` matches ``input_layernorm``);
4. LoRA on raw parameters (``target_parameters``, MoE experts) taken as it is by ``peft``, refused by name elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_migrate import api
from lora_migrate.errors import UnsupportedFeature

from .models import INPUT_IDS
from .peft_models import randomize

pytest.importorskip("peft")

# tiny configs of the architectures these fixes are about (transformers 4.57.6)
DEC = dict(vocab_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64)
CONFIGS = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(DEC, hidden_size=64, intermediate_size=64, head_dim=16, sliding_window=16)),
    "gemma3_32": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                  dict(DEC, hidden_size=32, intermediate_size=64, head_dim=8, sliding_window=16)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  scale_embedding=True, dropout=0.0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DEC, hidden_size=32, intermediate_size=64, head_dim=8)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(DEC, hidden_size=32, intermediate_size=64, residual_dropout=0.0, embedding_dropout=0.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(DEC, hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    # the transformers-4 model whose experts are 3-D nn.Parameters (mlp.experts.gate_up_proj / down_proj), the
    # layout transformers 5 gives Mixtral too
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(DEC, hidden_size=32, intermediate_size=32, head_dim=8, num_local_experts=4,
                     num_experts_per_tok=2, layer_types=["full_attention"])),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=4, num_decoder_layers=4,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1)),
}


def build(arch: str, seed: int = 0):
    import transformers as tf

    cfg_cls, model_cls, kw = CONFIGS[arch]
    torch.manual_seed(seed)
    return getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw)).eval()


def base_folder(arch: str, path):
    """The base model's config.json in a folder, as a base model's name or path points at it."""
    build(arch).config.save_pretrained(path)
    return path


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = torch.tensor(INPUT_IDS)
    kw = {"decoder_input_ids": ids[:, :4]} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **kw).logits.float()


def make(out, arch: str, seed: int = 1, **lora_kw) -> torch.Tensor:
    """A randomized adapter saved by peft 0.21.2; returns its logits."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(arch), LoraConfig(**lora_kw))
    randomize(model, seed)
    model.eval()
    model.save_pretrained(out)
    return logits(model)


def load(folder, arch: str) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(build(arch), folder).eval())


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------- 4. target_parameters


def test_target_parameters_go_to_peft_as_they_are_and_are_refused_by_name_elsewhere(tmp_path):
    """gpt_oss experts as 3-D parameters: peft writes one ParamWrapper per parameter, nested (``experts.lora_A``,
    ``experts.base_layer.lora_A``), with rank r·experts. The reader took that rank for a config mismatch and every
    target refused with "has rank 32 but the config gives r=8"."""
    src = tmp_path / "src"
    ref = make(src, "gpt_oss", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert any(".experts.base_layer.lora_A" in k for k in load_file(src / "adapter_model.safetensors"))
    r = api.convert(src, tmp_path / "peft", to="peft")
    assert r.ok
    a, b = load_file(src / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and not cfg["rank_pattern"] and cfg["r"] == 8
    assert maxdiff(load(tmp_path / "peft", "gpt_oss"), ref) == 0.0
    for target in ("peft-0.15", "peft-0.14", "peft-0.13", "vllm", "lorax", "adapters-1.1"):
        with pytest.raises(UnsupportedFeature, match="target_parameters|stacked-experts"):
            api.convert(src, tmp_path / target, to=target)
    by = {c.convention: c for c in api.inspect(src).adapters[0].as_loaded}
    assert not by["peft-0.15"].same and "target_parameters" in by["peft-0.15"].detail
    assert by["peft-0.16"].same and "needs PEFT ≥ 0.17" in by["peft-0.16"].detail  # 0.16.0 has no such field


def test_target_parameters_on_mixtral_expert_weights(tmp_path):
    """Mixtral in transformers 4 keeps experts as nn.Linear: target_parameters on their 2-D weights gives plain
    rank-r factors, which PEFT before 0.17 still does not load (it drops the field, so nothing wraps them)."""
    src = tmp_path / "src"
    ref = make(src, "mixtral", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
               target_parameters=["w1.weight", "w2.weight"])
    assert api.convert(src, tmp_path / "peft", to="peft").ok
    assert maxdiff(load(tmp_path / "peft", "mixtral"), ref) == 0.0
    with pytest.raises(UnsupportedFeature, match="target_parameters"):
        api.convert(src, tmp_path / "p15", to="peft-0.15")


# ---------------------------------------------------------------------------------- 3. modules_to_save suffixes


@pytest.mark.parametrize("arch", ["gemma", "starcoder2"])
def test_modules_to_save_suffix_names_match_as_peft_matches_them(arch, tmp_path):
    """PEFT wraps every module whose name ends with a modules_to_save entry, a plain string suffix in every era
    (``key.endswith(name)``): "norm" takes model.norm and each layer's input_layernorm / post_attention_layernorm.
    The reader matched at a dot boundary only and refused the layer norms as keys no schema claims."""
    src = tmp_path / "src"
    ref = make(src, arch, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["norm"])
    saved = load_file(src / "adapter_model.safetensors")
    assert any("input_layernorm" in k for k in saved)  # peft saved the suffix matches
    for target in ("peft", "peft-0.15", "peft-0.13"):
        r = api.convert(src, tmp_path / target, to=target)
        assert r.ok
        out = load_file(tmp_path / target / "adapter_model.safetensors")
        assert out.keys() == saved.keys() and all(torch.equal(out[k], saved[k]) for k in saved)
        assert maxdiff(load(tmp_path / target, arch), ref) == 0.0
    for target in ("vllm", "lorax", "adapters-1.1"):
        with pytest.raises(UnsupportedFeature, match="modules_to_save"):
            api.convert(src, tmp_path / target, to=target)


# ---------------------------------------------------------------------------------- 2. rsLoRA into the servers

T5_ALL = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def _b_tensors(folder):
    return {k: t for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k}


@pytest.mark.parametrize("target", ["vllm", "lorax"])
def test_rslora_into_servers_rewrites_alpha_and_keeps_b(target, tmp_path):
    """One r and one alpha for every module: the servers' alpha/r gives α/√r exactly with lora_alpha = α·√r and
    B untouched. Folding s = α/√r into B instead rounded every element of B (3.8e-5 on the logits of a 72-module
    T5)."""
    src = tmp_path / "src"
    ref = make(src, "t5", target_modules=T5_ALL, r=8, lora_alpha=16, use_rslora=True)
    r = api.convert(src, tmp_path / target, to=target)
    assert r.ok and r.adapters[0].plan.rescaled == 0 and r.adapters[0].plan.modules == 72
    cfg = json.loads((tmp_path / target / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 * 8 ** 0.5 and not cfg.get("use_rslora")
    b_src, b_out = _b_tensors(src), _b_tensors(tmp_path / target)
    assert b_src.keys() == b_out.keys() and all(torch.equal(b_src[k], b_out[k]) for k in b_src)
    assert maxdiff(load(tmp_path / target, "t5"), ref) == 0.0  # PEFT reads the file as the servers do (alpha/r)


def test_rslora_into_lorax_emulated_server_reproduces_peft(tmp_path):
    from .lorax_emulation import lorax_logits
    from .peft_models import make_peft

    src = tmp_path / "src"
    ref, _ = make_peft(src, "llama", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"], r=8, lora_alpha=16, use_rslora=True)
    assert api.convert(src, tmp_path / "o", to="lorax").adapters[0].plan.rescaled == 0
    got, dropped = lorax_logits(tmp_path / "o")
    # the emulation adds ΔW into W: one float32 rounding per weight, carried through two layers
    assert not dropped and maxdiff(got, ref) <= 64 * 2.0**-24 * ref.abs().max().item()


def test_servers_fold_only_the_modules_one_alpha_cannot_express(tmp_path):
    """alpha_pattern gives v a scale of its own: the global alpha serves the most common scale (B untouched there)
    and only v's B is rescaled, the step saying by how much and within which rounding."""
    src = tmp_path / "src"
    ref = make(src, "t5", target_modules=["q", "v"], r=8, lora_alpha=16, use_rslora=True,
               alpha_pattern={"v": 4})
    r = api.convert(src, tmp_path / "o", to="vllm")
    plan = r.adapters[0].plan
    assert r.ok and plan.rescaled == 12 and plan.modules == 24
    assert any(s.rule == "rescale" and "rounded" in s.what for s in plan.steps)
    b_src, b_out = _b_tensors(src), _b_tensors(tmp_path / "o")
    assert all(torch.equal(b_src[k], b_out[k]) for k in b_src if ".q." in k)
    got = load(tmp_path / "o", "t5")
    assert maxdiff(got, ref) <= 16 * 2.0**-24 * ref.abs().max().item()


# ---------------------------------------------------------------------------------- 1. scaled embeddings


def _embedding_source(tmp_path, arch):
    src = tmp_path / "src"
    ref = make(src, arch, target_modules=["embed_tokens", "q_proj", "v_proj"], r=4, lora_alpha=8)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_folder(arch, tmp_path / "base"))
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src, ref


def _emb_b(folder):
    return {k: t for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_embedding_B" in k}


@pytest.mark.parametrize("arch,factor", [("gemma3", 8.0), ("bart", 32 ** 0.5)])
def test_scaled_embedding_lora_is_rescaled_between_peft_eras(arch, factor, tmp_path, monkeypatch):
    src, ref = _embedding_source(tmp_path, arch)
    r = api.convert(src, tmp_path / "p15", to="peft-0.15")
    assert r.ok and any(s.rule == "embed_scale" for s in r.adapters[0].plan.steps)
    b_src, b_out = _emb_b(src), _emb_b(tmp_path / "p15")
    for k in b_src:
        want = (b_src[k].double() * factor).float()
        assert torch.equal(b_out[k], want)  # one rounding of f·B (none for a power of two)
    by = {c.convention: c for c in api.inspect(src).adapters[0].as_loaded}
    assert not by["peft-0.15"].same and "embed_tokens" in by["peft-0.15"].detail and by["peft-0.16"].same is False
    # back into peft: B/f, the source's bytes where f is a power of two
    assert api.convert(tmp_path / "p15", tmp_path / "back", to="peft").ok
    if factor == 8.0:
        assert all(torch.equal(_emb_b(tmp_path / "back")[k], b_src[k]) for k in b_src)
    # peft 0.21.2 as PEFT < 0.18 computes: the one difference in the forward pass is that the LoRA embedding output
    # is not multiplied by embed_scale (#2825 added _get_embed_scale); the real peft 0.15.2 is run by
    # golden/harness.py (family peft, cases pf21/gemma3_embed, pf21/bart_scaled_embed, pf152/gemma3_embed), its
    # results committed in golden/results/peft.json
    from peft.tuners.tuners_utils import BaseTunerLayer

    monkeypatch.setattr(BaseTunerLayer, "_get_embed_scale", lambda self: None)
    got = load(tmp_path / "p15", arch)
    bound = 0.0 if factor == 8.0 else 16 * 2.0**-24 * ref.abs().max().item()
    assert maxdiff(got, ref) <= bound
    api.convert(src, tmp_path / "copy", to="peft")  # the file as it is: what 0.15 computes without the fix
    assert maxdiff(load(tmp_path / "copy", arch), ref) > 1e-2


def test_scaled_embedding_factor_unknown_is_refused_unless_base_model_given(tmp_path):
    src, ref = _embedding_source(tmp_path, "gemma3")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFeature, match="embed_scale.*--base-model"):
        api.convert(src, tmp_path / "p15", to="peft-0.15")
    assert api.convert(src, tmp_path / "same", to="peft").ok  # same era: nothing to know
    build("gemma3").save_pretrained(tmp_path / "full")
    r = api.convert(src, tmp_path / "p15", to="peft-0.15", base_model=tmp_path / "full")
    assert r.ok and any(s.rule == "embed_scale" for s in r.adapters[0].plan.steps)
    # the model type alone gives it where no config flag decides (Gemma3: √ of the embedding width)
    r = api.convert(src, tmp_path / "p15t", to="peft-0.15", model_type="gemma3_text")
    assert all(torch.equal(_emb_b(tmp_path / "p15t")[k], t) for k, t in _emb_b(tmp_path / "p15").items())
    with pytest.raises(UnsupportedFeature, match="embed_scale"):  # BART's depends on scale_embedding
        api.convert(src, tmp_path / "p15b", to="peft-0.15", model_type="bart")
    by = {c.convention: c for c in api.inspect(src).adapters[0].as_loaded}
    assert "unknown without the base model's config.json" in by["peft-0.15"].detail


def test_plain_embeddings_and_gemma_hidden_state_scaling_copy_unchanged(tmp_path):
    """Gemma (v1) multiplies the hidden states by √d after the embedding module, so every era scales the LoRA
    output alike: nothing to rescale."""
    src, ref = _embedding_source(tmp_path, "gemma")
    r = api.convert(src, tmp_path / "p15", to="peft-0.15")
    assert r.ok and not any(s.rule == "embed_scale" for s in r.adapters[0].plan.steps)
    assert all(torch.equal(_emb_b(tmp_path / "p15")[k], t) for k, t in _emb_b(src).items())


def test_embedding_paths_no_scaled_embedding_has_need_no_base_config(tmp_path):
    """No config at hand: GPT-2's ``wte`` is no scaled embedding of any model type, so eras agree and the factors
    are copied; ``model.embed_tokens`` could be Gemma3's, so that is refused (tested above)."""
    from .peft_models import make_peft

    make_peft(tmp_path / "src", "gpt2", target_modules=["wte", "c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True)
    assert api.convert(tmp_path / "src", tmp_path / "p13", to="peft-0.13").ok
    assert all(torch.equal(_emb_b(tmp_path / "p13")[k], t) for k, t in _emb_b(tmp_path / "src").items())
