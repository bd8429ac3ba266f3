"""The gguf codec's file layout, read back with ggml's own gguf package, on the committed llama.cpp goldens
(golden/gguf/llamacpp: PEFT adapters written by peft 0.21.2, and what llama.cpp's convert_lora_to_gguf.py made of
them). The runtime itself is exercised by golden/families/gguf (results/FINDINGS_GGUF.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

import lora_migrate  # noqa: E402
from lora_migrate.check.compare import compare  # noqa: E402
from lora_migrate.codecs.base import PlanOptions  # noqa: E402
from lora_migrate.codecs.gguf import GGUF_CODEC  # noqa: E402
from lora_migrate.codecs.gguf.format import permute_rows, q8_0_roundtrip, unpermute_rows  # noqa: E402
from lora_migrate.detect import open_source  # noqa: E402
from lora_migrate.errors import UnsupportedFeature  # noqa: E402
from lora_migrate.schemas import get_convention  # noqa: E402
from lora_migrate.schemas.gguf import Q8_0_ERROR  # noqa: E402
from lora_migrate.source import base_model_config  # noqa: E402

GOLD = Path(__file__).resolve().parents[3] / "golden" / "gguf" / "llamacpp"
BASE = {a: GOLD / "_base" / a for a in ("llama", "qwen2", "mistral", "qwen3", "mistral_hd32", "qwen3_hd32")}
TARGET = get_convention("gguf")
CLI = Path(__file__).resolve().parents[3] / ".venv" / "bin" / "lora-migrate"
HEADS = {"llama": (4, 2)}  # the tiny Llama's num_attention_heads, num_key_value_heads (golden/families/tiny_decoders)


def convert(case: str, out: Path, arch: str = "llama", outtype: str | None = None, base: bool = True,
            model_type: str | None = None) -> tuple:
    """PEFT golden → .gguf through the API (plan, checked write, read back, confirm); returns (report, plan)."""
    r = lora_migrate.convert(GOLD / case / "adapter", out, to="gguf", outtype=outtype, model_type=model_type,
                             base_model=BASE[arch] if base else None)
    return r.adapters[0].verify, r.adapters[0].plan


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def peft(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLD / case / "adapter" / "adapter_model.safetensors"))


def key(module: str, p: str) -> str:
    return f"base_model.model.{module}.lora_{p}.weight"


def test_llama_layout_names_ne_metadata_and_permutation(tmp_path):
    out = tmp_path / "a.gguf"
    report, plan = convert("llama_all_linear", out)
    assert report.ok and report.n_modules == 14
    r = gguf.GGUFReader(str(out))
    meta = {k: r.fields[k].contents() for k in ("general.type", "general.architecture", "adapter.type",
                                                  "adapter.lora.alpha")}
    assert meta == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                    "adapter.lora.alpha": 8.0}
    t = tensors(out)
    src = peft("llama_all_linear")
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    assert sorted(t) == sorted(f"blk.{i}.{g}.weight.lora_{p}" for i in (0, 1) for g in hf for p in "ab")
    for i in (0, 1):
        for g, m in hf.items():
            A, B = src[key(f"model.layers.{i}.{m}", "A")], src[key(f"model.layers.{i}.{m}", "B")]
            ta, tb = t[f"blk.{i}.{g}.weight.lora_a"], t[f"blk.{i}.{g}.weight.lora_b"]
            assert [int(x) for x in ta.shape] == [A.shape[1], A.shape[0]]  # ne = [in, r]
            assert [int(x) for x in tb.shape] == [B.shape[1], B.shape[0]]  # ne = [r, out]
            assert np.array_equal(np.asarray(ta.data), A.numpy())
            n = {"attn_q": HEADS["llama"][0], "attn_k": HEADS["llama"][1]}.get(g)
            want = permute_rows(B.numpy(), n) if n else B.numpy()
            assert np.array_equal(np.asarray(tb.data), want)
            if n:
                assert not np.array_equal(np.asarray(tb.data), B.numpy())
    # the same bytes as llama.cpp's own convert_lora_to_gguf.py wrote for this plain adapter
    theirs = tensors(GOLD / "llama_all_linear" / "llamacpp-f32.gguf")
    assert sorted(theirs) == sorted(t)
    assert all(np.array_equal(np.asarray(t[k].data), np.asarray(theirs[k].data)) for k in t)


def test_qwen2_q_k_rows_not_permuted(tmp_path):
    out = tmp_path / "q.gguf"
    assert convert("qwen2_plain", out, "qwen2")[0].ok
    t, src = tensors(out), peft("qwen2_plain")
    for g, m in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        assert np.array_equal(np.asarray(t[f"blk.0.{g}.weight.lora_b"].data),
                              src[key(f"model.layers.0.self_attn.{m}", "B")].numpy())
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "qwen2"


@pytest.mark.parametrize("case,base,arch,permuted", [
    ("mistral_plain", "mistral", "llama", True),
    ("mistral_hd32_plain", "mistral_hd32", "llama", True),  # head_dim 32: q_proj 128 rows ≠ hidden 64
    ("qwen3_plain", "qwen3", "qwen3", False),
    ("qwen3_hd32_plain", "qwen3_hd32", "qwen3", False),
])
def test_mistral_and_qwen3_bytes_equal_convert_lora_to_gguf_and_read_back(tmp_path, case, base, arch, permuted):
    """Mistral (model_type mistral → general.architecture llama, q/k rows permuted with the base's heads) and Qwen3
    (qwen3, HF rows): every tensor equals llama.cpp's own converter's on the plain goldens (run in llama.cpp:
    FINDINGS_GGUF.md), and reading that file back with the base's heads gives PEFT's A and B again."""
    out = tmp_path / "a.gguf"
    report, _ = convert(case, out, base)
    assert report.ok and report.n_modules == 14
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == arch
    t, theirs, src = tensors(out), tensors(GOLD / case / "llamacpp-f32.gguf"), peft(case)
    assert sorted(t) == sorted(theirs) and all(np.array_equal(t[k].data, theirs[k].data) for k in t)
    cfg = base_model_config(BASE[base])
    for g, m, n in (("attn_q", "q_proj", cfg["num_attention_heads"]), ("attn_k", "k_proj", cfg["num_key_value_heads"])):
        B = src[key(f"model.layers.1.self_attn.{m}", "B")].numpy()
        assert np.array_equal(t[f"blk.1.{g}.weight.lora_b"].data, permute_rows(B, n) if permuted else B)
    a = GGUF_CODEC.open(GOLD / case / "llamacpp-f32.gguf", None).adapters[0]
    GGUF_CODEC.prepare(a, PlanOptions(base_config=cfg))
    for e in a.modules:
        d = a.load(e)
        assert torch.equal(d.B, src[key(e.module, "B")]) and torch.equal(d.A, src[key(e.module, "A")])
    a.store.close()


def test_archs_marked_measured_agree_with_the_golden_bases():
    """Each ARCHS entry marked measured has a golden base (results/gguf.json) made by convert_hf_to_gguf.py whose
    q/k permutation, converter class and general.architecture are the entry's."""
    import json

    from lora_migrate.schemas.gguf import ARCHS

    bases = json.loads((GOLD.parents[1] / "results" / "gguf.json").read_text())["checks"]["bases"]["llamacpp"]
    for model_type, a in ARCHS.items():
        assert a.measured, model_type
        b = bases[f"llamacpp/_base/{model_type}"]
        assert b["ok"] and b["permutes_qk"] == a.permutes_qk
        assert a.converter_class.startswith(b["converter_code"]["class"])
        fields = gguf.GGUFReader(str(BASE[model_type] / "base-f32.gguf")).fields
        assert fields["general.architecture"].contents() == a.arch


def test_permutation_round_trip_and_read_back_undoes_it(tmp_path):
    b = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    for n in (1, 2, 4, 8):
        assert torch.equal(unpermute_rows(permute_rows(b, n), n), b)
    out = tmp_path / "a.gguf"
    convert("llama_plain", out)
    a = GGUF_CODEC.open(out, None).adapters[0]
    GGUF_CODEC.prepare(a, PlanOptions(base_config=base_model_config(BASE["llama"])))
    src = peft("llama_plain")
    for e in a.modules:
        d = a.load(e)
        assert torch.equal(d.B, src[key(e.module, "B")]) and torch.equal(d.A, src[key(e.module, "A")])
        assert d.scale == 16 / 8
    a.store.close()


def test_embedding_lora_a_is_transposed(tmp_path):
    out = tmp_path / "e.gguf"
    report, plan = convert("llama_embed", out)
    assert report.ok
    t = tensors(out)
    A = peft("llama_embed")["base_model.model.model.embed_tokens.lora_embedding_A"]  # (r, vocab)
    assert [int(x) for x in t["token_embd.weight.lora_a"].shape] == [A.shape[0], A.shape[1]]  # ne = [r, vocab]
    assert np.array_equal(np.asarray(t["token_embd.weight.lora_a"].data), A.numpy().T)
    assert any(s.rule == "skip_base_copies" for s in plan.steps)  # embed_tokens.base_layer.weight left out


def test_rslora_alpha_is_alpha_sqrt_r_in_float32(tmp_path):
    out = tmp_path / "r.gguf"
    report, plan = convert("llama_rslora", out)
    assert report.ok and report.max_rel_fro < 1e-7
    alpha = gguf.GGUFReader(str(out)).fields["adapter.lora.alpha"].contents()
    assert alpha == float(np.float32(16 * math.sqrt(8)))
    # B bytes unchanged: the float32 alpha's relative offset (< 2^-24) rounds back to B in every element
    t, src = tensors(out), peft("llama_rslora")
    assert np.array_equal(np.asarray(t["blk.0.attn_v.weight.lora_b"].data),
                          src[key("model.layers.0.self_attn.v_proj", "B")].numpy())


def test_patterns_one_alpha_and_the_rest_folded(tmp_path):
    out = tmp_path / "p.gguf"
    report, plan = convert("llama_patterns", out)
    assert report.ok
    assert gguf.GGUFReader(str(out)).fields["adapter.lora.alpha"].contents() == 16.0
    assert plan.rescaled == 4  # v_proj (alpha 32) and up_proj (alpha 4) in both layers
    t, src = tensors(out), peft("llama_patterns")
    # v_proj: PEFT 32/8 = 4, runtime 16/8 = 2 → B' = 2·B (exact); k_proj r=4: 16/4 from its own rank
    assert np.array_equal(np.asarray(t["blk.0.attn_v.weight.lora_b"].data),
                          2 * src[key("model.layers.0.self_attn.v_proj", "B")].numpy())
    assert [int(x) for x in t["blk.0.attn_k.weight.lora_b"].shape] == [4, 32]


@pytest.mark.parametrize("outtype,types", [("f16", {"F16"}), ("bf16", {"BF16"}), ("q8_0", {"Q8_0", "F16"})])
def test_outtypes(tmp_path, outtype, types):
    out = tmp_path / f"{outtype}.gguf"
    report, _ = convert("llama_all_linear", out, outtype=outtype)
    assert report.ok, report.summary()
    t = tensors(out)
    assert {x.tensor_type.name for x in t.values()} == types
    if outtype == "q8_0":  # lora_a ne[0] = in = 64 blocks by 32; lora_b ne[0] = r = 4 cannot: F16 as llama.cpp's
        assert all(x.tensor_type.name == ("Q8_0" if n.endswith("lora_a") else "F16") for n, x in t.items())
        assert report.tolerance == pytest.approx(2 * Q8_0_ERROR + Q8_0_ERROR**2)
        assert 1e-3 < report.max_rel_fro < report.tolerance  # really quantized, and within the bound
    else:
        u = {"f16": 2.0**-11, "bf16": 2.0**-8}[outtype]
        assert report.tolerance == 4 * u and report.max_rel_fro < 2 * u


def test_q8_0_values_quantize_back_to_the_same_blocks_and_stay_within_the_bound():
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 30.0):  # blocks with max|x| ≥ 127·2⁻¹⁴: d is a normal fp16 (schemas/gguf.py Q8_0_ERROR)
        x = (torch.randn(16, 256, generator=g) * scale).numpy()
        x[3, :32] = 0.0  # an all-zero block
        x[5, 40] = 100 * scale  # an outlier block
        y = q8_0_roundtrip(x)
        assert np.array_equal(q8_0_roundtrip(y), y)  # what the check compared is what the file holds
        assert np.linalg.norm(y - x) <= Q8_0_ERROR * np.linalg.norm(x)
        for row in range(16):  # per block too
            for b in range(0, 256, 32):
                blk, q = x[row, b:b + 32], y[row, b:b + 32]
                assert np.abs(q - blk).max() <= np.abs(blk).max() * (1 / 254 + 2.0**-11) * (1 + 1e-6)


@pytest.mark.parametrize("case,words", [
    ("llama_dora", "DoRA"),
    ("llama_lora_bias", "lora_B.bias"),
])
def test_refusals_name_the_feature(tmp_path, case, words):
    with pytest.raises(UnsupportedFeature, match=words) as e:
        convert(case, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_without_base_config_type_and_heads_are_refused_but_qwen2_needs_no_heads(tmp_path):
    with pytest.raises(UnsupportedFeature, match="model_type, which is not known"):
        convert("llama_plain", tmp_path / "x.gguf", base=False)
    with pytest.raises(UnsupportedFeature, match="num_attention_heads.*--base-model"):
        convert("llama_plain", tmp_path / "x.gguf", base=False, model_type="llama")
    assert convert("qwen2_plain", tmp_path / "q.gguf", "qwen2", base=False, model_type="qwen2")[0].ok


def test_unsupported_architecture_and_tied_lm_head_are_refused():
    from lora_migrate.codecs.gguf.format import arch_of
    from lora_migrate.codecs.gguf.plan import plan_gguf

    with pytest.raises(UnsupportedFeature, match="gpt2.*not an architecture"):
        arch_of("gpt2", "x")
    src = open_source(GOLD / "llama_plain" / "adapter").adapters[0]
    e = src.modules[0]
    src.modules = [type(e)(**{**e.__dict__, "module": "lm_head"})]
    cfg = {**base_model_config(BASE["llama"]), "tie_word_embeddings": True}
    with pytest.raises(UnsupportedFeature, match="ties lm_head"):
        plan_gguf(src, TARGET, PlanOptions(base_config=cfg), [], "x.gguf")
    with pytest.raises(UnsupportedFeature, match="whether lm_head is tied"):
        plan_gguf(src, TARGET, PlanOptions(model_type="llama"), [], "x.gguf")


def test_convert_lora_to_gguf_rslora_output_fails_the_check_by_the_rslora_factor():
    """llama.cpp's converter writes alpha = α for an rsLoRA adapter; the runtime then applies α/r, PEFT α/√r."""
    theirs = GGUF_CODEC.open(GOLD / "llama_rslora" / "llamacpp-f32.gguf", None).adapters[0]
    GGUF_CODEC.prepare(theirs, PlanOptions(base_config=base_model_config(BASE["llama"])))
    src = open_source(GOLD / "llama_rslora" / "adapter").adapters[0]
    by = {e.module: e for e in theirs.modules}
    for e in src.modules:
        c = compare(src.load(e), theirs.load(by[e.module]))
        assert not c.ok and c.rel_fro == pytest.approx(1 - 1 / math.sqrt(8), rel=1e-6)
        assert "same factors, only the scale differs: source/output = 2.82843 = √r" in c.detail
        assert "rsLoRA" in c.detail
    theirs.store.close()


def test_convert_lora_to_gguf_patterns_output_fails_where_alpha_pattern_was_lost():
    theirs = GGUF_CODEC.open(GOLD / "llama_patterns" / "llamacpp-f32.gguf", None).adapters[0]
    GGUF_CODEC.prepare(theirs, PlanOptions(base_config=base_model_config(BASE["llama"])))
    src = open_source(GOLD / "llama_patterns" / "adapter").adapters[0]
    by = {e.module: e for e in theirs.modules}
    bad = {e.module.split(".")[-1] for e in src.modules if not compare(src.load(e), theirs.load(by[e.module])).ok}
    assert bad == {"v_proj", "up_proj"}  # the alpha_pattern modules; rank_pattern survives (rank per tensor)
    theirs.store.close()


def test_cli_exit_codes_refusal_and_failed_verify(tmp_path):
    """A refusal: exit 2, one line, nothing written; llama.cpp's converter's rsLoRA file against its PEFT source:
    exit 1 naming the cause; our own output: exit 0."""
    import subprocess

    def run(*args):
        p = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True)
        return p.returncode, p.stderr.strip() or p.stdout.strip()

    code, msg = run("convert", GOLD / "llama_dora" / "adapter", tmp_path / "d.gguf", "--to", "gguf",
                    "--base-model", BASE["llama"])
    assert code == 2 and len(msg.splitlines()) == 1 and "DoRA" in msg and not (tmp_path / "d.gguf").exists()
    code, msg = run("convert", GOLD / "llama_plain" / "adapter", tmp_path / "p.safetensors", "--to", "gguf")
    assert code == 2 and "must end in .gguf" in msg
    code, msg = run("verify", GOLD / "llama_rslora" / "adapter", GOLD / "llama_rslora" / "llamacpp-f32.gguf",
                    "--base-model", BASE["llama"])
    assert code == 1 and "= √r: the source scales by alpha/√r (rsLoRA)" in msg
    out = tmp_path / "ours.gguf"
    assert run("convert", GOLD / "llama_rslora" / "adapter", out, "--to", "gguf", "--base-model", BASE["llama"])[0] == 0
    assert run("verify", GOLD / "llama_rslora" / "adapter", out, "--base-model", BASE["llama"])[0] == 0
    code, msg = run("verify", GOLD / "llama_rslora" / "adapter", out)  # q/k heads unknown
    assert code == 2 and "--base-model" in msg and len(msg.splitlines()) == 1


def test_claim_only_gguf_adapters_and_no_other_codec_claims_them(tmp_path):
    from lora_migrate.codecs import CODECS

    ours = GOLD / "llama_plain" / "llamacpp-f32.gguf"
    assert GGUF_CODEC.claim(ours) is not None
    assert all(c.claim(ours) is None for c in CODECS if c is not GGUF_CODEC)
    assert GGUF_CODEC.claim(BASE["llama"] / "base-f32.gguf") is None  # a model GGUF: general.type = model
    assert GGUF_CODEC.claim(GOLD / "llama_plain" / "adapter") is None
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"not a gguf")
    assert GGUF_CODEC.claim(fake) is None
    code = lora_migrate.inspect(ours)
    assert code.convention == "gguf" and code.adapters[0].modules == 4


def test_check_reads_a_llama_gguf_q_k_rows_with_the_base_models_heads(tmp_path):
    """`check` on a Llama GGUF: without the head counts the q/k pairs cannot be read (a warning, not checked);
    with --base-model every module is read, and a NaN planted in attn_q's lora_b is then found (an error)."""
    import gguf

    from lora_migrate.gate import check

    src = GOLD / "llama_plain" / "llamacpp-f32.gguf"
    blind = check(src)
    assert blind.ok and any(f.level == "warning" and "not checked" in f.message for f in blind.findings)
    seen = check(src, base_model=BASE["llama"])
    assert seen.ok and not seen.findings
    reader = gguf.GGUFReader(src)
    raw = bytearray(src.read_bytes())
    t = next(t for t in reader.tensors if t.name.endswith("attn_q.weight.lora_b"))
    raw[int(t.data_offset):int(t.data_offset) + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(raw))
    found = check(bad, base_model=BASE["llama"])
    assert not found.ok and [f.code for f in found.findings if f.level == "error"] == ["nonfinite"]
