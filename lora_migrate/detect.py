"""Opening SRC: which codec's files it holds, which convention wrote them, and why we think so."""

from __future__ import annotations

from pathlib import Path

from .codecs import CODECS, codec_for
from .errors import DetectionError, LoraMigrateError
from .io import open_tensors
from .schemas import get_convention
from .source import Source


def open_source(path: str | Path, from_: str | None = None) -> Source:
    """Read SRC (a file or folder of any registered convention) lazily: every codec is asked whether it claims
    the path (names, a config, a header; nothing is loaded), the strongest claim wins, and that codec reads it."""
    path = Path(path)
    if not path.exists():
        raise LoraMigrateError(f"{path}: no such file or folder")
    conv = get_convention(from_) if from_ else None
    claims = []
    for c in CODECS:
        try:
            claim = c.claim(path)
        except (OSError, ValueError):  # unreadable files: that codec does not claim them
            claim = None
        if claim is not None:
            claims.append((claim.strength, -len(claims), c, claim))
    if not claims:
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt"):
            open_tensors(path).close()  # a damaged file says so (bad input) before "nothing reads it"
        what = "file" if path.is_file() else "folder"
        raise DetectionError(f"{path}: no adapter found: no convention reads this {what} (see `lora-migrate "
                             "conventions` for the layouts each reads)")
    _, _, codec, claim = max(claims, key=lambda x: x[:2])
    if conv is not None and conv.family != codec.id:
        raise DetectionError(f"{path}: --from {from_} names {codec_for(conv).display} convention, but this is "
                             f"{codec.display} adapter ({claim.why})")
    return codec.open(path, conv)
