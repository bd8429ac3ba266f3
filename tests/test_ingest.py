"""Reading AdapterHub checkpoints: detection with reasons, strict keys and shapes, refusals that say why."""

from __future__ import annotations

import json

import pytest
import torch

from lora_migrate import api
from lora_migrate.errors import DetectionError, LoraMigrateError

from .builders import BASE_CONFIG, MODULES, make_adapter, tensors


@pytest.mark.parametrize("version,expected", [("3.1.0", "adapter-transformers-3.1"), ("0.2.2", "adapters-1.0"),
                                              ("adapters.1.0.1", "adapters-1.0"), ("adapters.1.2.0", "adapters-1.1")])
def test_detects_convention_with_reasons(tmp_path, version, expected):
    extra = {"leave_out": []} if expected != "adapter-transformers-3.1" else {}
    make_adapter(tmp_path / "a", version=version, config=extra)
    r = api.inspect(tmp_path / "a")
    assert r.convention == expected
    assert any(version in why for why in r.reasons)
    a = r.adapters[0]
    assert (a.r, a.alpha, a.modules) == (4, 8, 2)
    scale = {"adapter-transformers-3.1": 2.0, "adapters-1.0": 1.0, "adapters-1.1": 2.0}[expected]
    assert all(m.scale == scale for m in a.module_list)


def test_safetensors_rules_out_adapter_transformers(tmp_path):
    make_adapter(tmp_path / "a", version=None, file="adapter.safetensors")
    with pytest.raises(DetectionError, match="adapters-1.0, adapters-1.1"):
        api.inspect(tmp_path / "a")
    assert api.inspect(tmp_path / "a", from_="adapters-1.0").convention == "adapters-1.0"


def test_unknown_keys_are_refused(tmp_path):
    sd = tensors()
    sd["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(12, 16)
    make_adapter(tmp_path / "a", sd=sd)
    with pytest.raises(LoraMigrateError, match="keys no AdapterHub LoRA template claims"):
        api.inspect(tmp_path / "a")


def test_other_adapter_methods_are_named(tmp_path):
    sd = tensors()
    sd["encoder.block.0.layer.0.adapters.m1.adapter_down.0.weight"] = torch.zeros(4, 16)
    make_adapter(tmp_path / "a", sd=sd)
    with pytest.raises(LoraMigrateError, match="bottleneck adapter"):
        api.inspect(tmp_path / "a")


def test_a_without_b(tmp_path):
    sd = tensors()
    del sd[f"{MODULES[0]}.loras.m1.lora_B"]
    make_adapter(tmp_path / "a", sd=sd)
    with pytest.raises(LoraMigrateError, match="has no b tensor"):
        api.inspect(tmp_path / "a")


def test_rank_contradicting_the_config(tmp_path):
    make_adapter(tmp_path / "a", config={"r": 8}, sd=tensors(r=4))
    with pytest.raises(LoraMigrateError, match="contradict the config's r=8"):
        api.inspect(tmp_path / "a")


def test_keys_of_another_adapter_name(tmp_path):
    make_adapter(tmp_path / "a", sd={**tensors("m1"), **tensors("m2")})
    with pytest.raises(LoraMigrateError, match=r"adapters \['m2'\] besides 'm1'"):
        api.inspect(tmp_path / "a")


@pytest.mark.parametrize("bad,msg", [({"r": 0}, "greater than 0"), ({"alpha": -1}, "greater than 0"),
                                     ({"use_gating": "maybe"}, "use_gating"), ({"foo": 1}, "unknown field")])
def test_bad_config_values(tmp_path, bad, msg):
    make_adapter(tmp_path / "a", config=bad)
    with pytest.raises(LoraMigrateError, match=msg):
        api.inspect(tmp_path / "a")


def test_invalid_json(tmp_path):
    make_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraMigrateError, match="not valid JSON"):
        api.inspect(tmp_path / "a")


def test_peft_adapter_with_an_empty_weights_file_names_the_file(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LoraMigrateError, match="adapter_model.safetensors: file is empty"):
        api.inspect(tmp_path / "p")


def test_peft_non_lora_adapter_is_refused_by_name(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8}))
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LoraMigrateError, match="'LOHA' adapter, not LoRA"):
        api.inspect(tmp_path / "p")


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    make_adapter(tmp_path / "a")
    torch.save({"x": Evil()}, tmp_path / "a" / "pytorch_adapter.bin")
    with pytest.raises(LoraMigrateError, match="refused"):
        api.inspect(tmp_path / "a")
    assert not marker.exists()


def test_folder_of_adapter_folders(tmp_path):
    make_adapter(tmp_path / "all" / "m1", name="m1")
    make_adapter(tmp_path / "all" / "m2", name="m2", sd=tensors("m2", seed=3))
    r = api.convert(tmp_path / "all", tmp_path / "out", to="adapters-1.1")
    assert r.layout == "adapter-folders" and [a.plan.output for a in r.adapters] == ["m1", "m2"]
    assert all(a.verify.ok for a in r.adapters)


def test_leave_out_into_adapter_transformers(tmp_path):
    make_adapter(tmp_path / "a", version="adapters.1.0.1", config={"leave_out": [1]})
    r = api.convert(tmp_path / "a", tmp_path / "out", to="adapter-transformers-3.1")
    assert any("leave_out=[1] dropped" in n for n in r.adapters[0].notes)
    make_adapter(tmp_path / "b", version="adapters.1.0.1", config={"leave_out": [1], "init_weights": "bert"})
    with pytest.raises(LoraMigrateError, match="not a no-op"):
        api.convert(tmp_path / "b", tmp_path / "out2", to="adapter-transformers-3.1")


def test_bf16_is_kept_and_checked_at_bf16_tolerance(tmp_path):
    make_adapter(tmp_path / "a", sd=tensors(dtype=torch.bfloat16), config={"alpha": 12})  # scale 3: rounds
    r = api.convert(tmp_path / "a", tmp_path / "out", to="adapters-1.0")
    v = r.adapters[0].verify
    assert v.ok and 0 < v.max_rel_fro < v.tolerance
    sd = torch.load(tmp_path / "out" / "pytorch_adapter.bin", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_full_model_version_from_transformers(tmp_path):
    """A full model saved by adapter-transformers 3.1 (transformers 4.21.3): keys side by side, config_map."""
    folder = tmp_path / "full"
    folder.mkdir()
    sd = {**tensors("m1"), **tensors("m2", seed=5), "shared.weight": torch.zeros(10, 16)}
    torch.save(sd, folder / "pytorch_model.bin")
    cfg = {"model_type": "t5", "d_model": 16, "transformers_version": "4.21.3",
           "architectures": ["T5ForConditionalGeneration"],
           "adapters": {"adapters": {"m1": "abc", "m2": "abc"}, "config_map": {"abc": BASE_CONFIG}, "fusions": {}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    r = api.inspect(folder)
    assert r.convention == "adapter-transformers-3.1" and [a.name for a in r.adapters] == ["m1", "m2"]
    out = api.convert(folder, tmp_path / "out", to="adapters-1.0")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m1", "m2"]
    cfg1 = json.loads((tmp_path / "out" / "m1" / "adapter_config.json").read_text())
    assert cfg1["name"] == "m1" and cfg1["hidden_size"] == 16 and cfg1["config"]["alpha"] == 4
    assert all(a.verify.ok for a in out.adapters)
