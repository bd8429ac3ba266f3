"""adapters 0.1.0–1.0.1: the unmerged LoRALinear path applies 1.0, ignoring alpha; fused QKV still alpha/r.

Source: adapterhub.md §2. Commit 42fff1e0f (#598, first in v0.1.0) dropped ``* self.scaling`` from
``LoRA.forward``; ``LoRALinear.forward`` composes with ``scaling=1.0``. ``LoRAMergedLinear`` (GPT-2 ``c_attn``,
DeBERTa ``in_proj``) calls ``lora.com(..., scaling=gate)`` and so keeps alpha/r. (IA)³ ignores alpha (×1).
Fixed in 1.1.0 (PR #770). 0.x wrote bare ``"0.2.2"`` versions; 1.0.x writes ``"adapters.1.0.1"``.
safetensors (adapter.safetensors) is read from 0.2.1 on; we write pytorch_adapter.bin, which every version reads.

Written outputs fold the scale into B and set alpha = r: then 1.0.1's unmerged path (×1), its merge path and
LoRAMergedLinear (×alpha/r = 1), and ≥ 1.1 — whose load-time shim rewrites alpha := r for `adapters.<1.1.0`
configs (loading.py, PR #770) — all read the same ΔW.
"""

from .adapterhub import (DEFAULTS, FAMILY, FIELDS_10, HEAD_FILES, LORAS_KEYS, STRING_IDS, LoRAConfig10)
from .base import Convention, Scaling, VersionPattern

ADAPTERS_1_0 = Convention(
    name="adapters-1.0",
    family=FAMILY,
    library="adapters",
    versions=">=0.1.0,<1.1",
    aliases=("adapters-0", "adapters-0.1", "adapters-0.2", "adapters@0.1.0", "adapters@0.1.1", "adapters@0.1.2",
             "adapters@0.2.0", "adapters@0.2.1", "adapters@0.2.2", "adapters@1.0.0", "adapters@1.0.1",
             "adapters-1.0.0", "adapters-1.0.1"),
    summary="adapters 0.1.0–1.0.1 save_adapter(): adapter_config.json + pytorch_adapter.bin (adapter.safetensors from 0.2.1)",
    keys=LORAS_KEYS,
    scaling={"linear": Scaling.ONE, "fused_qkv": Scaling.ALPHA_OVER_R, "ia3": Scaling.ONE},
    scaling_notes="1.0 on unmerged LoRALinear (alpha ignored, #760), alpha/r on fused QKV (LoRAMergedLinear)",
    version_patterns=(VersionPattern(specifier=">=0.1.0,<1.0"),
                      VersionPattern(prefix="adapters.", specifier=">=1.0.0,<1.1.0.dev0")),
    version_to_write="adapters.1.0.1",
    transformers_versions=">=4.35,<4.46",  # adapters 0.1.0 pins 4.35.2 … 1.0.1 pins ~=4.45.2
    weights_read=("pytorch_adapter.bin", "adapter.safetensors"),  # default load_adapter() reads the .bin
    weights_write="pytorch_adapter.bin",
    weights_write_safetensors="adapter.safetensors",  # read by 0.2.1–1.0.1 only with use_safetensors=True
    head_files=HEAD_FILES,
    alpha_equals_r_on_write=True,
    config_model=LoRAConfig10,
    config_write_fields=FIELDS_10,
    config_defaults=DEFAULTS,
    string_config_ids=STRING_IDS,
    features=frozenset({"lora", "ia3", "fused_qkv"}),
)

CONVENTIONS = (ADAPTERS_1_0,)
