"""adapters ≥ 1.1.0: alpha/r on every LoRA layer again; (IA)³ ×alpha; a load-time shim for older configs.

Source: adapterhub.md §2, PR #770 (commit f0ca96200, first in v1.1.0): ``hidden_states * self.scaling`` restored
in ``LoRA.forward`` and ``IA3.forward`` (``IA3.scaling = lora_alpha``). ``loading.py`` ``_fix_backward_compat``
sets alpha := r when the config's version is ``adapters.<1.1.0`` and r ≠ alpha (checked against 1.3.0 as
installed). ``dtype`` config field from 1.1.0 (#767). Post-fix main builds wrote ``adapters.1.1.0.dev0``.
"""

from .adapterhub import (DEFAULTS, FAMILY, FIELDS_11, HEAD_FILES, LORAS_KEYS, STRING_IDS, LoRAConfig11)
from .base import Convention, LoadShim, Scaling, VersionPattern

ADAPTERS_1_1 = Convention(
    name="adapters-1.1",
    family=FAMILY,
    library="adapters",
    versions=">=1.1.0",
    aliases=("adapters", "adapters-1.2", "adapters-1.3", "adapters@1.1.0", "adapters@1.1.1", "adapters@1.2.0",
             "adapters@1.3.0", "adapters-1.1.0", "adapters-1.1.1", "adapters-1.2.0", "adapters-1.3.0"),
    summary="adapters ≥ 1.1.0 save_adapter(): adapter_config.json + adapter.safetensors or pytorch_adapter.bin",
    keys=LORAS_KEYS,
    scaling={"linear": Scaling.ALPHA_OVER_R, "fused_qkv": Scaling.ALPHA_OVER_R, "ia3": Scaling.ALPHA},
    scaling_notes="alpha/r on every LoRA layer (#770); (IA)³ ×alpha; alpha := r on load for adapters.<1.1.0 configs",
    version_patterns=(VersionPattern(prefix="adapters.", specifier=">=1.1.0.dev0"),),
    version_to_write="adapters.1.1.0",
    transformers_versions=">=4.47",  # adapters 1.1.0 pins ~=4.47.1 … 1.3.0 ~=4.57.6
    weights_read=("pytorch_adapter.bin", "adapter.safetensors"),  # default load_adapter() reads the .bin
    weights_write="pytorch_adapter.bin",  # load_adapter(use_safetensors=False) by default reads only the .bin
    weights_write_safetensors="adapter.safetensors",
    head_files=HEAD_FILES,
    # Also patches adapters.1.1.0.dev0 (post-fix), misses bare 0.x versions (adapterhub.md §2, gaps 1 and 4).
    load_shim=LoadShim(version_prefix="adapters.", below="1.1.0", source="loading.py _fix_backward_compat (#770)"),
    config_model=LoRAConfig11,
    config_write_fields=FIELDS_11,
    config_defaults=DEFAULTS,
    string_config_ids=STRING_IDS,
    features=frozenset({"lora", "ia3", "fused_qkv"}),
)

CONVENTIONS = (ADAPTERS_1_1,)
