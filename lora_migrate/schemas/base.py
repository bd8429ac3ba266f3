"""The declarative form of a library convention: key layout, scaling rule, files and version strings.

A :class:`Convention` is data: frozen, strict pydantic, so a typo fails when the schema module is imported, not in
the middle of a conversion. Code that reads or writes a checkpoint asks its convention what to do.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from functools import cached_property
from typing import Literal

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, field_validator

# transformers model types whose attention/MLP layers are ``Conv1D`` (weight stored (in, out), PEFT's
# fan_in_fan_out); the LoRA factors are still A (r, in), B (out, r)
CONV1D_MODEL_TYPES = ("gpt2",)

LayerKind = Literal["linear", "fused_qkv", "ia3", "embedding", "conv", "experts"]


class Scaling(str, Enum):
    """How a library turns (alpha, r) into the effective scale s of ΔW = s·B·A."""

    ALPHA_OVER_R = "alpha/r"
    ALPHA_OVER_SQRT_R = "alpha/sqrt(r)"
    ALPHA = "alpha"
    ONE = "1.0"

    def scale(self, alpha: float, r: int) -> float:
        if self is Scaling.ALPHA_OVER_R:
            return alpha / r
        if self is Scaling.ALPHA_OVER_SQRT_R:
            return alpha / math.sqrt(r)
        if self is Scaling.ALPHA:
            return float(alpha)
        return 1.0

    def alpha_for(self, scale: float, r: int) -> float | None:
        """The alpha that makes this rule give ``scale`` at rank r; None when alpha has no effect."""
        if self is Scaling.ALPHA_OVER_R:
            return scale * r
        if self is Scaling.ALPHA_OVER_SQRT_R:
            return scale * math.sqrt(r)
        if self is Scaling.ALPHA:
            return scale
        return None


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VersionPattern(Frozen):
    """A config ``version`` string ``<prefix><PEP 440 version>`` whose version lies in ``specifier``."""

    prefix: str = ""
    specifier: str

    def matches(self, version: str) -> bool:
        if not version.startswith(self.prefix):
            return False
        try:
            v = Version(version[len(self.prefix) :])
        except InvalidVersion:
            return False
        return SpecifierSet(self.specifier).contains(v, prereleases=True)


class KeyTemplates(Frozen):
    """Tensor key templates with a ``{module}`` placeholder, and ``{adapter}`` where keys name the adapter.

    ``emb_a``/``emb_b`` are an embedding layer's factors (PEFT stores them as bare parameters), ``magnitude`` is
    DoRA's vector, ``bias`` a LoRA bias on B.
    """

    a: str
    b: str
    bias: str | None = None
    emb_a: str | None = None
    emb_b: str | None = None
    magnitude: str | None = None
    gate_weight: str | None = None
    gate_bias: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(k, getattr(self, k)) for k in ("a", "b", "bias", "emb_a", "emb_b", "magnitude", "gate_weight",
                                                "gate_bias") if getattr(self, k)]

    @cached_property
    def patterns(self) -> list[tuple[str, re.Pattern]]:
        """(param, regex) per template; a key matches at most one of them."""
        out = []
        for param, tmpl in self.items():
            body = re.escape(tmpl)
            body = body.replace(re.escape("{module}"), r"(?P<module>.+)")
            body = body.replace(re.escape("{adapter}"), r"(?P<adapter>[^.]+)")
            out.append((param, re.compile(f"^{body}$")))
        return out

    def claim(self, key: str) -> tuple[str, str | None, str] | None:
        """``(module, adapter, param)`` if a template claims ``key``, else None."""
        for param, rx in self.patterns:
            m = rx.match(key)
            if m:
                return m.group("module"), m.groupdict().get("adapter"), param
        return None

    def key(self, param: str, module: str, adapter: str | None = None) -> str:
        return getattr(self, param).format(module=module, adapter=adapter)


class LoadShim(Frozen):
    """A load-time rewrite of the config: alpha := r when the file's version is ``<prefix>`` below ``below``
    and r ≠ alpha (and the adapter is LoRA at the config's top level)."""

    version_prefix: str
    below: str
    source: str

    def applies(self, version: str | None, alpha: float, r: int) -> bool:
        if not version or not version.startswith(self.version_prefix) or alpha == r:
            return False
        try:
            return Version(version[len(self.version_prefix):]) < Version(self.below)
        except InvalidVersion:
            return False


class Serving(Frozen):
    """A server that loads PEFT files its own way (peft.md §7 LoRAX, §8 vLLM): one r and one alpha per adapter,
    and what it does with what it cannot hold. The planner and the checks read these fields; no code asks which
    server it is."""

    server: str  # its name in messages
    honours_rslora: bool  # False: alpha/r whatever use_rslora says
    rslora_note: str = ""  # who ignores use_rslora, when only some releases do
    pads_rank: bool = False  # its kernel pads the stacked rank (LoRAX: ≤ 8 → 8, else the next multiple of 16)
    drops_partial_layer_types: bool = False  # a layer type missing from any layer is dropped in every layer
    skips_frozen_base_copies: bool = False  # ``…embed_tokens|lm_head.base_layer.weight``: read from the base model
    refuses: dict[str, str] = {}  # feature → the server's own error message
    drops: dict[str, str] = {}  # feature → what the server silently does instead (so refused, not served wrong)


class Convention(Frozen):
    """One library's checkpoint convention over a range of its versions.

    ``scaling`` maps each layer kind the convention can hold to its effective-scale rule. A kind missing from the
    map cannot be expressed by this convention and is refused when converting into it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True,
                              ignored_types=(cached_property,))

    name: str  # canonical name, e.g. "adapters-1.0"
    family: str  # the id of the codec that reads and writes it (lora_migrate/codecs)
    library: str  # the PyPI name
    versions: str  # PEP 440 specifier of the library versions this schema describes
    aliases: tuple[str, ...] = ()
    summary: str
    keys: KeyTemplates
    scaling: dict[LayerKind, Scaling]
    scaling_notes: str  # one line for `conventions`, with where it comes from
    version_patterns: tuple[VersionPattern, ...] = ()  # config "version" strings this convention wrote
    version_to_write: str = ""
    transformers_versions: str | None = None  # full-model checkpoints: config.json transformers_version range
    config_file: str = "adapter_config.json"
    weights_read: tuple[str, ...] = ()  # weight file names, in the order the library tries them
    weights_write: str = ""  # what the library's default save_adapter() writes and default load_adapter() reads
    weights_write_safetensors: str | None = None  # opt-in (--safetensors): the library reads it only when asked
    head_files: tuple[str, ...] = ()
    alpha_equals_r_on_write: bool = False
    load_shim: LoadShim | None = None  # what this library does to other versions' configs when it loads them
    config_model: type | None = None  # strict pydantic model of the adapter's own config block
    config_write_fields: tuple[str, ...] = ()  # the config fields this library version writes (all, as asdict does)
    config_defaults: dict[str, object] = {}  # defaults for fields a source lacks
    string_config_ids: dict[str, dict[str, object]] = {}  # "lora", "ia3" → library default config
    features: frozenset[str] = frozenset()

    serving: Serving | None = None  # PEFT files as a server reads them (one global scale, …)
    # features outside ``features`` are not refused up front: its codec checks the config field by field when it
    # writes one (PEFT eras: a field this era lacks is refused only when it is not at its default)
    fields_checked_on_write: bool = False
    # its merge adds lora_B.bias unscaled (b + l instead of b + s·l: PEFT 0.14–0.15.2, #2486), which fix-merged undoes
    merges_bias_unscaled: bool = False
    # PEFT family: how rank_pattern / alpha_pattern keys match module names (peft.md §1.3)
    pattern_matching: Literal["combined", "split", "regex"] | None = None
    # PEFT family: True when this era's config loader raises TypeError on fields it does not know (peft.md §4.5)
    strict_config_fields: bool = False
    # PEFT family: whether embedding LoRA's output is multiplied by the base layer's ``embed_scale`` (Gemma3, BART
    # with scale_embedding: √d) as the base output is; None where no one has established it
    lora_embedding_scaled: bool | None = None

    @field_validator("keys")
    @classmethod
    def _templates_have_placeholders(cls, v: KeyTemplates, info) -> KeyTemplates:
        named = [tmpl for _, tmpl in v.items() if "{adapter}" in tmpl]
        for param, tmpl in v.items():
            if "{module}" not in tmpl or (named and "{adapter}" not in tmpl):
                need = "{module} and {adapter}" if named else "{module}"
                raise ValueError(f"key template {param}={tmpl!r} needs {need}")
        return v

    def scale(self, kind: LayerKind, alpha: float, r: int) -> float:
        return self.scaling[kind].scale(alpha, r)

    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def version_bounds(self) -> tuple[Version | None, Version | None]:
        """(first release, first release after the range) of ``versions``; None where it is open."""
        specs = list(SpecifierSet(self.versions))
        lows = [Version(s.version) for s in specs if s.operator in (">=", "==", "~=")]
        highs = [Version(s.version) for s in specs if s.operator == "<"]
        return (max(lows) if lows else None), (min(highs) if highs else None)

    def releases_with(self, since: str) -> Literal["all", "some", "none"]:
        """How many releases of this convention's range have a thing first released in ``since``: all (the range
        starts at or after it), some (it comes before the range's upper bound), or none."""
        v = Version(since)
        specs = list(SpecifierSet(self.versions))
        if any(s.operator in ("<", "<=") and not s.contains(v, prereleases=True) for s in specs):
            return "none"
        lows = [Version(s.version) for s in specs if s.operator in (">=", ">", "==", "~=")]
        return "all" if lows and max(lows) >= v else "some"


def plain_folder_name(name: str) -> bool:
    """An adapter name that can be one folder inside the output: not empty, '.' or '..', and without a path
    separator or NUL (it would be written outside that folder, or cannot be a name at all)."""
    return name not in ("", ".", "..") and not any(ch in name for ch in "/\\\0")
