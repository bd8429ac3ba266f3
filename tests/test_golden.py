"""Acceptance on golden/: checkpoints written by the real adapter-transformers 3.1.0, adapters 1.0.1 and 1.3.0
(golden/harness.py, family adapterhub), converted, loaded by the real adapters 1.3.0 through load_adapter +
set_active_adapters, and compared with the logits the producing library gave (fp32, within tests/tolerance.py's
model).

The adapters 1.0.1 and adapter-transformers 3.1.0 sides cannot share this environment; the harness's ``accept``
runs them in their own and commits the result in golden/results/adapterhub.json, which is checked here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_migrate import api
from lora_migrate.errors import UnsupportedFeature

from .models import inputs_for, load_and_run, load_base
from .tolerance import assert_logits_close, base_noise

adapters = pytest.importorskip("adapters")

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# Classifies measurements committed by golden/harness.py (made in one environment) as "same" or "different"; the
# "different" ones are all ≥ 0.3 off (golden/results/adapterhub.json checks), the "same" ones ≤ 1.7e-7.
SAME = 1e-5
CASES = sorted(p.parent for p in GOLDEN.glob("*/*/meta.json") if not p.parent.name.startswith("_"))


def case_id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def test_golden_is_there():
    assert len(CASES) >= 10, f"golden/ holds {len(CASES)} cases; run golden/harness.py generate --family adapterhub"


def _source(case: Path) -> Path:
    return case / ("full" if (case / "full").is_dir() else "adapter")


def _refs(case: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(case / "logits.safetensors"))
    if "logits" in t:
        return {None: t["logits"]}
    return {k.removeprefix("logits_"): v for k, v in t.items() if k.startswith("logits_") and k != "logits_merged"}


def _run(case: Path, adapter_dir: Path) -> torch.Tensor:
    meta = json.loads((case / "meta.json").read_text())
    base = load_base((case / meta["base"]).resolve())
    return load_and_run(meta["arch"], adapter_dir, base=base)


def _noise(case: Path) -> float:
    meta = json.loads((case / "meta.json").read_text())
    base = load_base((case / meta["base"]).resolve())
    return base_noise(base, inputs_for(base, case / "input.json"),
                      load_file(str(case / "logits.safetensors"))["base_logits"])


CONVERTIBLE = [c for c in CASES if "gated" not in c.name]


@pytest.mark.parametrize("target", ["adapters-1.0", "adapters-1.1"])
@pytest.mark.parametrize("case", CONVERTIBLE, ids=case_id)
def test_golden_converts_and_reproduces_logits(case, target, tmp_path):
    out = tmp_path / "out"
    r = api.convert(_source(case), out, to=target)
    meta = json.loads((case / "meta.json").read_text())
    expected_source = {"adapter-transformers": "adapter-transformers-3.1"}.get(
        meta["library"], "adapters-1.0" if meta["library_version"].startswith(("0.", "1.0")) else "adapters-1.1")
    assert r.source_convention == expected_source
    refs = _refs(case)
    noise = _noise(case)
    for name, ref in refs.items():
        folder = out if name is None else out / name
        assert (folder / "adapter_config.json").is_file()
        assert_logits_close(_run(case, folder), ref, noise=noise, what=f"{case_id(case)} {name} → {target}")


def test_golden_gated_is_refused(tmp_path):
    case = GOLDEN / "at31" / "t5_gated"
    with pytest.raises(UnsupportedFeature, match="gate"):
        api.convert(_source(case), tmp_path / "out", to="adapters-1.0")
    assert not (tmp_path / "out").exists()


def test_acceptance_in_old_libraries_is_committed_and_green():
    """adapters 1.0.1 and adapter-transformers 3.1.0 loaded our outputs in their own environments."""
    records = json.loads((GOLDEN / "results" / "adapterhub.json").read_text())["acceptance"]["records"]
    seen = {(r["case"], r["target"], r["env"]) for r in records}
    assert ("at31/t5_qv", "adapters-1.0", "ad101") in seen
    assert ("at31/t5_multi", "adapters-1.0", "ad101") in seen
    bad = [r for r in records if r["status"] != "ok"]
    assert not bad, bad


ENV_CONVENTION = {"at31": "adapter-transformers-3.1", "ad101": "adapters-1.0", "ad13": "adapters-1.1"}


def test_inspect_predicts_what_each_library_measured():
    """`inspect` says which library versions would read a file wrong; the harness loaded every golden
    adapter in every environment. Prediction and measurement must agree on every pair."""
    cross = json.loads((GOLDEN / "results" / "adapterhub.json").read_text())["checks"]["crossload"]
    compared = 0
    for env, results in cross.items():
        for case_name, res in results.items():
            if "max_abs_diff" not in res or res["max_abs_diff"] is None:
                continue  # the library could not load it at all (e.g. safetensors in 3.1)
            case = GOLDEN / case_name
            info = api.inspect(_source(case)).adapters[0]
            if info.gated:
                continue
            if info.convention == ENV_CONVENTION[env]:
                predicted_same = True
            else:
                predicted_same = next(lc.same for lc in info.as_loaded if lc.convention == ENV_CONVENTION[env])
            measured_same = res["max_abs_diff"] <= SAME
            assert predicted_same == measured_same, (env, case_name, res["max_abs_diff"])
            compared += 1
    assert compared >= 15
