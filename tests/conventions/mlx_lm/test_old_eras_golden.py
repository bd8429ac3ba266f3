"""mlx-lm's older eras on adapters their own releases wrote (golden/mlx/mlxlm0131: mlx-lm 0.13.1, era
mlx-lm-2024-03; golden/mlx/mlxlm0206: 0.20.6, era mlx-lm-2024-06), each with its PEFT equivalent proven by logits in
that release (results/FINDINGS_MLX.md). meta.json records the scale the release's own LoRALinear applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_migrate import api
from lora_migrate.codecs.mlx_lm import MlxLmCodec
from lora_migrate.errors import DetectionError
from lora_migrate.schemas import get_convention

GOLD = Path(__file__).resolve().parents[3] / "golden" / "mlx"
# case → the era lora-migrate must read it as; None: the config cannot tell (alpha ≠ rank, no dated field)
CASES = {"mlxlm0131/llama_cli_lp": None, "mlxlm0131/llama_dora": None,
         "mlxlm0206/llama_cli_lp": "mlx-lm-2024-06", "mlxlm0206/llama_dora": "mlx-lm-2024-06",
         "mlxlm0206/llama_all_minus1": "mlx-lm-2024-06"}
WRITER_ERA = {"mlxlm0131": "mlx-lm-2024-03", "mlxlm0206": "mlx-lm-2024-06"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_detection_and_the_releases_own_scale(case):
    """0.13.1 writes ``"use_dora": false`` like 0.14.2–0.18 do, so with the CLI's alpha 16 ≠ rank 8 the era is not
    told by the config; read as its writer's era, the scale is the one the release applied (0.13.1: 10·16/8)."""
    folder = GOLD / case / "adapter"
    meta = json.loads((GOLD / case / "meta.json").read_text())
    if CASES[case] is None:
        with pytest.raises(DetectionError, match="pass --from"):
            api.inspect(folder)
    else:
        assert api.inspect(folder).convention == CASES[case]
    src = MlxLmCodec().open(folder, get_convention(WRITER_ERA[case.split("/")[0]]))
    scales = {m.scale for a in src.adapters for m in a.modules}
    assert scales == set(meta["release_lora_scale"]) == {meta["effective_scale"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_its_peft_equivalent(case):
    """The PEFT equivalent gives the release's logits (≤ 6.9e-6); read as the writer's era the two agree."""
    report = api.verify(GOLD / case / "adapter", GOLD / case / "peft_equivalent",
                        from_=WRITER_ERA[case.split("/")[0]])
    assert report.ok
