"""Measurement, not a harness stage: does mlx-lm's LoRASwitchLinear compute what PEFT's ``target_parameters``
(ParamWrapper on a 3-D expert parameter) computes, and under which names? Run in the mlx env:

    /work/venvs/mlxlm0322/bin/python golden/families/mlx/moe_probe.py

Tiny Qwen2-MoE and Mixtral (transformers 5 layout: ``mlp.experts.gate_up_proj`` (E, 2I, H), gate rows first;
``mlp.experts.down_proj`` (E, H, I)) built from configs with fixed seeds; the same weights loaded into mlx-lm's
model (``…switch_mlp.{gate,up,down}_proj.weight`` (E, out, in)). Both directions, the factors mapped by hand:

- PEFT → mlx: A (E·r, in) is expert-major, A_e = A.reshape(E, r, in)[e]; B (out, r·E) is rank-major,
  B_e = B.reshape(out, r, E)[:, :, e]; ΔW_e = (α/r)·B_e@A_e. mlx: lora_a = A_e stacked (E, r, in), lora_b = B_e
  stacked (E, out, r), scale = α/r; gate_up_proj splits by rows (gate = first I rows of B_e, up = the rest, A shared).
- mlx → PEFT: gate and up have their own A, so gate_up_proj is rank 2r (A = [A_g; A_u], B block-diagonal) and
  down_proj is zero-padded to 2r (one r per PEFT config); lora_alpha = scale·2r.

Prints one JSON line per architecture and direction: max |logit diff| against the other library, and the LoRA's
effect (max |logit diff| against the base) for scale.
"""

import json
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import mixtral, qwen2_moe  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

IDS = [[3, 17, 5, 42, 9, 11, 60, 2]]
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0)
ARCHS = {
    # hf config, hf model, mlx module, the mlx parent of switch_mlp (HF 5: mlp)
    "qwen2_moe": (Qwen2MoeConfig(**COMMON, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=4,
                                 num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
                  Qwen2MoeForCausalLM, qwen2_moe, "mlp", "moe_intermediate_size"),
    "mixtral": (MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
                MixtralForCausalLM, mixtral, "block_sparse_moe", "intermediate_size"),
}


def save_mlx(d, ad, rank, scale, parent, n):
    os.makedirs(d, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in ad.items()}, f"{d}/adapters.safetensors")
    keys = [f"{parent}.switch_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    with open(f"{d}/adapter_config.json", "w") as f:
        json.dump({"fine_tune_type": "lora", "num_layers": n,
                   "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}}, f)


def run(arch):
    cfg, cls, mod, parent, isize = ARCHS[arch]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    I, E, H = getattr(cfg, isize), getattr(cfg, "num_experts", None) or cfg.num_local_experts, cfg.hidden_size
    W = {}
    for k, v in sd.items():
        k2 = k.replace(".mlp.", f".{parent}.")
        if k.endswith("experts.gate_up_proj"):
            p = k2[:-len("experts.gate_up_proj")] + "switch_mlp."
            W[p + "gate_proj.weight"], W[p + "up_proj.weight"] = v[:, :I], v[:, I:]
        elif k.endswith("experts.down_proj"):
            W[k2[:-len("experts.down_proj")] + "switch_mlp.down_proj.weight"] = v
        else:
            W[k2] = v
    args = mod.ModelArgs.from_dict(dict(cfg.to_dict(), model_type=arch, rope_theta=10000.0))

    def mlx_model():
        m = mod.Model(args)
        m.load_weights([(k, mx.array(v)) for k, v in W.items()], strict=True)
        return m

    with torch.no_grad():
        base = hf(torch.tensor(IDS)).logits.numpy()
    base_mx = np.array(mlx_model()(mx.array(IDS)))
    out = [{"arch": arch, "what": "base hf vs mlx", "max_diff": float(np.abs(base - base_mx).max())}]

    # PEFT target_parameters -> mlx-lm
    r, alpha = 2, 6.0
    pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=TARGETS)).eval()
    g = torch.Generator().manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    ad, nest, dw_err = {}, {}, 0.0
    for n, m in pm.named_modules():
        if type(m).__name__ != "ParamWrapper":
            continue
        A, B = m.lora_A["default"].weight.detach().numpy(), m.lora_B["default"].weight.detach().numpy()
        Ae, Be = A.reshape(E, r, A.shape[-1]), B.reshape(B.shape[0], r, E).transpose(2, 0, 1)
        dw_err = max(dw_err, float(np.abs(m.get_delta_weight("default").detach().numpy()
                                          - m.scaling["default"] * (Be @ Ae)).max()))
        mname = n.replace("base_model.model.", "")
        nest[mname.split(".mlp.")[-1]] = m.parameter_name
        pre = mname.replace(".base_layer", "").replace(".mlp.experts", f".{parent}.switch_mlp.")
        if m.parameter_name == "gate_up_proj":
            ad.update({pre + "gate_proj.lora_a": Ae, pre + "gate_proj.lora_b": Be[:, :I],
                       pre + "up_proj.lora_a": Ae, pre + "up_proj.lora_b": Be[:, I:]})
        else:
            ad.update({pre + "down_proj.lora_a": Ae, pre + "down_proj.lora_b": Be})
    d = tempfile.mkdtemp()
    save_mlx(d, ad, r, alpha / r, parent, cfg.num_hidden_layers)
    mm = load_adapters(mlx_model(), d)
    got = np.array(mm(mx.array(IDS)))
    out.append({"arch": arch, "what": "PEFT target_parameters -> mlx-lm LoRASwitchLinear", "nesting": nest,
                "per_expert_dW_vs_get_delta_weight": dw_err, "max_diff": float(np.abs(got - ref).max()),
                "effect": float(np.abs(ref - base).max())})

    # mlx-lm LoRASwitchLinear -> PEFT target_parameters
    m2, s = mlx_model(), 1.7
    m2.freeze()
    linear_to_lora_layers(m2, cfg.num_hidden_layers, {"rank": r, "scale": s, "dropout": 0.0,
                                                      "keys": [f"{parent}.switch_mlp.{p}" for p in
                                                               ("gate_proj", "up_proj", "down_proj")]})
    mx.random.seed(3)
    m2.load_weights([(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(m2.trainable_parameters())],
                    strict=False)
    ref2 = np.array(m2(mx.array(IDS)))
    mad = {k: np.array(v) for k, v in tree_flatten(m2.trainable_parameters())}
    R, peft_sd = 2 * r, {}

    def peft_ab(Ae, Be):  # (E, R, in), (E, out, R) -> lora_A (E·R, in) expert-major, lora_B (out, R·E) rank-major
        return Ae.reshape(-1, Ae.shape[-1]), Be.transpose(1, 2, 0).reshape(Be.shape[1], -1)

    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}.{parent}.switch_mlp."
        ag, bg, au, bu = (mad[p + x] for x in ("gate_proj.lora_a", "gate_proj.lora_b", "up_proj.lora_a", "up_proj.lora_b"))
        Ae = np.concatenate([ag, au], axis=1)
        Be = np.zeros((E, 2 * I, R), np.float32)
        Be[:, :I, :r], Be[:, I:, r:] = bg, bu
        Ad, Bd = np.zeros((E, R, I), np.float32), np.zeros((E, H, R), np.float32)
        Ad[:, :r], Bd[:, :, :r] = mad[p + "down_proj.lora_a"], mad[p + "down_proj.lora_b"]
        pre = f"base_model.model.model.layers.{L}.mlp.experts."
        peft_sd[pre + "base_layer.lora_A.weight"], peft_sd[pre + "base_layer.lora_B.weight"] = peft_ab(Ae, Be)
        peft_sd[pre + "lora_A.weight"], peft_sd[pre + "lora_B.weight"] = peft_ab(Ad, Bd)
    pd = tempfile.mkdtemp()
    save_file({k: np.ascontiguousarray(v) for k, v in peft_sd.items()}, f"{pd}/adapter_model.safetensors")
    LoraConfig(r=R, lora_alpha=s * R, target_modules=[], target_parameters=TARGETS).save_pretrained(pd)
    hf2 = cls(cfg).eval()
    hf2.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    with torch.no_grad():
        got2 = PeftModel.from_pretrained(hf2, pd).eval()(torch.tensor(IDS)).logits.numpy()
    out.append({"arch": arch, "what": "mlx-lm LoRASwitchLinear -> PEFT target_parameters (rank 2r block-diagonal)",
                "max_diff": float(np.abs(got2 - ref2).max()), "effect": float(np.abs(ref2 - base_mx).max())})
    return out


if __name__ == "__main__":
    for a in ARCHS:
        for row in run(a):
            print(json.dumps(row))
