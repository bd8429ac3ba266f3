"""More layouts the real adapters 1.3.0 writes: flex-head AdapterModel classes, prefixed module paths,
save_all_adapters folders, BART and DeBERTa-v1 (fused in_proj). Each is converted to adapters-1.0 and back
and must reproduce the library's own logits through load_adapter + set_active_adapters."""

from __future__ import annotations

import json

import pytest
import torch

adapters = pytest.importorskip("adapters")
import transformers as tf  # noqa: E402

from lora_migrate import api  # noqa: E402

from .tolerance import assert_logits_close
from .models import randomize_loras  # noqa: E402


IDS = torch.tensor([[5, 17, 33, 2, 90, 1], [7, 7, 64, 120, 3, 1]])


def _fwd(model, **kw):
    with torch.no_grad():
        out = model(input_ids=IDS, **kw)
    return out.logits.float()


def _roundtrip(tmp_path, make, add, fwd):
    """make() → fresh model; add(model) adds + randomizes adapter 'm1' and saves it with save_adapter.

    Returns (reference, [logits of the adapters-1.0 output, of the adapters-1.1 output]); the reference is what
    the library itself gives loading the *source* folder into a fresh model (for a BERT flex head that differs
    from the in-memory model by 1.8e-3 — adapters' own save/load — so the in-memory logits are not the bar).
    """
    torch.manual_seed(0)
    model = make()
    add(model)
    model.set_active_adapters("m1")
    model.eval()
    model.save_adapter(str(tmp_path / "src"), "m1")
    api.convert(tmp_path / "src", tmp_path / "ad10", to="adapters-1.0")
    api.convert(tmp_path / "ad10", tmp_path / "ad11", to="adapters-1.1")
    results = []
    for out in (tmp_path / "src", tmp_path / "ad10", tmp_path / "ad11"):
        torch.manual_seed(0)
        fresh = make()
        name = fresh.load_adapter(str(out))
        fresh.set_active_adapters(name)
        fresh.eval()
        results.append(fwd(fresh))
    torch.manual_seed(0)
    base = fwd(make().eval())
    assert (results[0] - base).abs().max().item() > 1e-2, "the adapter must matter, or nothing is tested"
    return results[0], results[1:]


def test_bert_adapter_model_with_its_own_head(tmp_path):
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def make():
        return adapters.BertAdapterModel(cfg)

    def add(m):
        m.add_adapter("m1", config=adapters.LoRAConfig(r=4, alpha=12, intermediate_lora=True, output_lora=True))
        m.add_classification_head("m1", num_labels=3)
        randomize_loras(m, "m1", 3)

    ref, got = _roundtrip(tmp_path, make, add, _fwd)
    assert (tmp_path / "ad10" / "pytorch_model_head.bin").is_file()  # a trained head is carried, not dropped
    for g in got:
        assert_logits_close(g, ref)


def test_t5_adapter_model_prefixed_paths(tmp_path):
    cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                      num_decoder_layers=2, dropout_rate=0.0, decoder_start_token_id=0)

    def make():
        return adapters.T5AdapterModel(cfg)

    def add(m):
        m.add_adapter("m1", config=adapters.LoRAConfig(r=8, alpha=16))
        m.add_seq2seq_lm_head("m1")
        randomize_loras(m, "m1", 4)

    def fwd(m):
        return _fwd(m, decoder_input_ids=IDS[:, :4])

    ref, got = _roundtrip(tmp_path, make, add, fwd)
    keys = torch.load(tmp_path / "ad10" / "pytorch_adapter.bin", weights_only=True)
    assert all(k.startswith("transformer.") for k in keys)
    for g in got:
        assert_logits_close(g, ref)


def test_bart(tmp_path):
    cfg = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64)

    def make():
        m = tf.BartForConditionalGeneration(cfg)
        adapters.init(m)
        return m

    def add(m):
        m.add_adapter("m1", config=adapters.LoRAConfig(r=8, alpha=4, attn_matrices=["q", "k", "v"],
                                                       intermediate_lora=True, output_lora=True))
        randomize_loras(m, "m1", 5)

    ref, got = _roundtrip(tmp_path, make, add, lambda m: _fwd(m, decoder_input_ids=IDS[:, :4]))
    for g in got:
        assert_logits_close(g, ref)


def test_deberta_v1_fused_in_proj(tmp_path):
    cfg = tf.DebertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           max_position_embeddings=64, type_vocab_size=0)

    def make():
        m = tf.DebertaForMaskedLM(cfg)
        adapters.init(m)
        return m

    def add(m):
        m.add_adapter("m1", config=adapters.LoRAConfig(r=4, alpha=16, attn_matrices=["q", "v"]))
        randomize_loras(m, "m1", 6)

    ref, got = _roundtrip(tmp_path, make, add, _fwd)
    info = api.inspect(tmp_path / "src")
    assert info.adapters[0].layer_kinds == {"fused_qkv": 2}
    for g in got:
        assert_logits_close(g, ref)


def test_save_all_adapters_folder(tmp_path):
    cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg)
    adapters.init(model)
    refs = {}
    for i, (name, c) in enumerate({"m1": adapters.LoRAConfig(r=4, alpha=8),
                                   "m2": adapters.LoRAConfig(r=2, alpha=32, output_lora=True)}.items()):
        model.add_adapter(name, config=c)
        randomize_loras(model, name, 10 + i)
    model.eval()
    for name in ("m1", "m2"):
        model.set_active_adapters(name)
        refs[name] = _fwd(model)
    model.save_all_adapters(str(tmp_path / "all"))
    assert "config_id" in json.loads((tmp_path / "all" / "m1" / "adapter_config.json").read_text())
    r = api.convert(tmp_path / "all", tmp_path / "out", to="adapters-1.0")
    assert r.layout == "adapter-folders"
    for name in ("m1", "m2"):
        torch.manual_seed(0)
        fresh = tf.GPT2LMHeadModel(cfg)
        adapters.init(fresh)
        fresh.load_adapter(str(tmp_path / "out" / name))
        fresh.set_active_adapters(name)
        fresh.eval()
        assert_logits_close(_fwd(fresh), refs[name])
