"""PEFT LoRA on raw expert parameters (target_parameters, ParamWrapper): read into the canonical stacked-experts form
(A (E, r, in), B (E, out, r)) and written back, checked against real peft 0.21.2 on a tiny MoE block built here
(transformers 5's expert layout: gate_up_proj (E, 2I, H), gate rows first, down_proj (E, H, I))."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_migrate import api
from lora_migrate.detect import open_source
from lora_migrate.errors import LoraMigrateError

peft = pytest.importorskip("peft")

E, H, I, R = 4, 16, 8, 2


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.1)

    def forward(self, x):  # every token through every expert, summed (routing does not matter for the math)
        gate, up = torch.einsum("nh,eoh->neo", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("nei,ehi->nh", nn.functional.silu(gate) * up, self.down_proj)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H, H, bias=False)
        self.mlp = nn.Module()
        self.mlp.experts = Experts()

    def forward(self, x):
        return self.mlp.experts(self.q_proj(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.layers:
            x = x + b(x)
        return x


def base():
    torch.manual_seed(0)
    return Tiny().eval()


X = torch.randn(5, H, generator=torch.Generator().manual_seed(7))


def written_by_peft(folder, params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), **cfg):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(base(), LoraConfig(r=R, lora_alpha=cfg.pop("lora_alpha", 6), target_modules=["q_proj"],
                                           target_parameters=list(params), **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out = pm(X)
    pm.save_pretrained(str(folder))
    return out


def run_peft(folder):
    from peft import PeftModel
    with torch.no_grad():
        return PeftModel.from_pretrained(base(), str(folder)).eval()(X)


def test_read_names_each_wrapper_by_its_parameter(tmp_path):
    written_by_peft(tmp_path / "a")
    keys = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(keys["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    s = open_source(tmp_path / "a")
    try:
        a = s.adapters[0]
        ex = {e.module: e for e in a.modules if e.kind == "experts"}
        assert sorted(ex) == [f"layers.{n}.mlp.experts.{p}" for n in (0, 1) for p in ("down_proj", "gate_up_proj")]
        d = a.load(ex["layers.0.mlp.experts.gate_up_proj"])
        assert tuple(d.A.shape) == (E, R, H) and tuple(d.B.shape) == (E, 2 * I, R) and d.scale == 3.0
        # the wrapper PEFT built on the same model says the same: get_delta_weight per expert
        from peft import PeftModel
        pm = PeftModel.from_pretrained(base(), str(tmp_path / "a"))
        for name, mod in pm.named_modules():
            if type(mod).__name__ == "ParamWrapper":
                owner = name.replace("base_model.model.", "").replace(".base_layer", "")
                d = a.load(ex[f"{owner}.{mod.parameter_name}"])
                got = d.scale * torch.einsum("eor,eri->eoi", d.B.double(), d.A.double())
                ref = mod.get_delta_weight("default").double()
                assert torch.allclose(got, ref, rtol=0, atol=64 * 2**-24 * ref.abs().max().item()), name
    finally:
        s.close()


@pytest.mark.parametrize("to", ["peft", "peft-0.16"])
def test_peft_to_peft_same_outputs(tmp_path, to):
    ref = written_by_peft(tmp_path / "a", use_rslora=True)
    api.convert(tmp_path / "a", tmp_path / "b", to=to)
    got = run_peft(tmp_path / "b")
    assert torch.allclose(got, ref, rtol=0, atol=256 * 2**-24 * ref.abs().max().item())


def test_rescaled_experts_still_load_in_peft(tmp_path):
    """An alpha pattern on one expert parameter: read per <module>.<parameter> as PEFT does, and kept."""
    ref = written_by_peft(tmp_path / "a", lora_alpha=5, alpha_pattern={"layers.1.mlp.experts.down_proj": 9})
    s = open_source(tmp_path / "a")  # PEFT matches a parameter's patterns on <module>.<parameter> (its warning
    try:                            # that the key "did not match any targeted module" is wrong: scaling is 4.5)
        scales = {e.module: e.scale for e in s.adapters[0].modules}
    finally:
        s.close()
    assert scales["layers.1.mlp.experts.down_proj"] == 4.5 and scales["layers.0.mlp.experts.down_proj"] == 2.5
    api.convert(tmp_path / "a", tmp_path / "b", to="peft-0.16")
    assert torch.allclose(run_peft(tmp_path / "b"), ref, rtol=0, atol=256 * 2**-24 * ref.abs().max().item())


@pytest.mark.parametrize("to", ["peft-0.15", "lorax", "vllm", "adapter-transformers-3.1"])
def test_refused_where_the_target_has_no_experts(tmp_path, to):
    written_by_peft(tmp_path / "a")
    with pytest.raises(LoraMigrateError, match="target_parameters|stacked-experts|experts"):
        api.convert(tmp_path / "a", tmp_path / "b", to=to)
    assert not (tmp_path / "b").exists()


def test_one_parameter_per_module(tmp_path):
    ref = written_by_peft(tmp_path / "a", params=("down_proj",))
    api.convert(tmp_path / "a", tmp_path / "b", to="peft")
    assert torch.allclose(run_peft(tmp_path / "b"), ref, rtol=0, atol=256 * 2**-24 * ref.abs().max().item())


def test_merge_and_fix_merged_refuse_experts(tmp_path):
    """Merging stacked experts into a dense checkpoint is not implemented: refused by name, nothing written."""
    from safetensors.torch import save_file

    from lora_migrate.fixmerged import fix_merged
    from lora_migrate.merge import merge_adapter
    written_by_peft(tmp_path / "a")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base().state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(LoraMigrateError, match="stacked-experts"):
        merge_adapter(tmp_path / "a", tmp_path / "base", tmp_path / "m")
    with pytest.raises(LoraMigrateError, match="stacked-experts"):
        fix_merged(tmp_path / "base", tmp_path / "f", adapter=tmp_path / "a", merged_with="peft", scale_used=2.0)
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()
