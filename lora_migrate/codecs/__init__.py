"""The registry of codecs: one line per convention family (see :mod:`lora_migrate.codecs.base` and
docs/adding-a-convention.md). Detection asks them in this order; on equal claims the first wins."""

from __future__ import annotations

from ..errors import LoraMigrateError
from ..schemas import Convention
from .adapterhub import ADAPTERHUB
from .base import Claim, Codec, PlanOptions
from .diffusers import DIFFUSERS
from .gguf import GGUF_CODEC
from .kohya import KOHYA
from .mlx_lm import MLX_LM
from .peft import PEFT
from .torchtune import TORCHTUNE

CODECS: tuple[Codec, ...] = (
    PEFT,
    ADAPTERHUB,
    DIFFUSERS,
    GGUF_CODEC,
    MLX_LM,
    TORCHTUNE,
    KOHYA,
)


def codec_for(conv: Convention) -> Codec:
    """The codec that reads and writes ``conv``."""
    for c in CODECS:
        if c.id == conv.family:
            return c
    raise LoraMigrateError(f"no codec reads or writes {conv.name} (family {conv.family!r})")


__all__ = ["CODECS", "Claim", "Codec", "PlanOptions", "codec_for"]
