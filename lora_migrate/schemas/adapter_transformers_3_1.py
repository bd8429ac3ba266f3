"""adapter-transformers 3.1.0–3.2.1 (the transformers fork): ΔW scaled by alpha/r everywhere.

Source: adapterhub.md §1 (``lora.py`` @ adapters3.1.0, line 46 ``self.scaling = self.lora_alpha / self.r``; 3.2.0 is
byte-identical, 3.2.1 only adds a ctor arg). Files: adapter_config.json + pytorch_adapter.bin, never safetensors.
"""

from .adapterhub import (DEFAULTS, FAMILY, FIELDS_31, HEAD_FILES, LORAS_KEYS, STRING_IDS, LoRAConfig31)
from .base import Convention, Scaling, VersionPattern

ADAPTER_TRANSFORMERS_3_1 = Convention(
    name="adapter-transformers-3.1",
    family=FAMILY,
    library="adapter-transformers",
    versions=">=3.1.0,<3.3",
    aliases=("adapter-transformers-3", "adapter-transformers-3.2", "adapter-transformers@3.1.0",
             "adapter-transformers@3.2.0", "adapter-transformers@3.2.1"),
    summary="adapter-transformers 3.1.0–3.2.1 save_adapter(): adapter_config.json + pytorch_adapter.bin",
    keys=LORAS_KEYS,
    scaling={"linear": Scaling.ALPHA_OVER_R, "fused_qkv": Scaling.ALPHA_OVER_R, "ia3": Scaling.ALPHA_OVER_R},
    scaling_notes="alpha/r on every LoRA layer, merged or not; (IA)³ ×alpha/r (lora.py:46)",
    version_patterns=(VersionPattern(specifier=">=3.1.0,<3.3"),),
    version_to_write="3.1.0",
    transformers_versions=">=4.21,<4.27",  # the fork is transformers 4.21.3 (3.1.0) / 4.26.1 (3.2.x)
    weights_read=("pytorch_adapter.bin",),
    weights_write="pytorch_adapter.bin",
    head_files=HEAD_FILES,
    config_model=LoRAConfig31,
    config_write_fields=FIELDS_31,
    config_defaults=DEFAULTS,
    string_config_ids=STRING_IDS,
    features=frozenset({"lora", "ia3", "fused_qkv"}),
)

CONVENTIONS = (ADAPTER_TRANSFORMERS_3_1,)
