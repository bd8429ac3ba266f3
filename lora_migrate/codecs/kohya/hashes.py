"""``sshs_model_hash`` and ``sshs_legacy_hash`` as sd-scripts computes them (``library/train_util.py`` at 48d368fa,
``precalculate_safetensors_hashes``), streamed: never the whole state dict in memory.

sd-scripts serializes ``safetensors.torch.save(tensors, {ss_* metadata only})`` and hashes that buffer:

- model hash (``addnet_hash_safetensors``): sha256 of everything after the header, i.e. the tensors' bytes in
  safetensors' layout order (dtype by descending rank, then name) — independent of the metadata;
- legacy hash (``addnet_hash_legacy``): sha256 of the buffer's bytes [0x100000, 0x110000), first 8 hex digits;
  which bytes those are depends on the length of that ss_*-only header (for files under 1 MiB: sha256 of nothing).
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from ...io import SafetensorsWriter, safetensors_order
from ...schemas import kohya as S


def ss_header(metadata: dict[str, str], tensors: list[tuple[str, torch.dtype, tuple]]) -> bytes:
    """The header bytes (length prefix included) of safetensors.torch.save(tensors, ss_* metadata)."""
    w = SafetensorsWriter("/dev/null", {k: v for k, v in sorted(metadata.items()) if k.startswith("ss_")})
    by = {n: (dt, sh) for n, dt, sh in tensors}
    for n in safetensors_order((n, dt) for n, dt, _ in tensors):
        w.add(n, by[n][0], by[n][1])
    return w.header_bytes()  # the writer's own serializer: the layout safetensors writes


class HashSink:
    """Fed the tensors' bytes in safetensors order; gives both hashes. With ``background``, hashing runs on one
    thread beside the caller (sha256 releases the GIL): each piece is held (a numpy view keeps its tensor's storage
    from being reused) until hashed, at most ``PENDING`` pieces at a time."""

    PENDING = 4

    def __init__(self, header: bytes, background: bool = False):
        start, size = S.LEGACY_HASH_WINDOW
        self.model = hashlib.sha256()
        self.legacy = hashlib.sha256()
        self._lo = start - len(header)  # the window in data coordinates
        self._hi = self._lo + size
        self._at = 0
        if start < len(header):
            self.legacy.update(header[start:start + size])
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sshs") if background else None
        self._pending: deque = deque()

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        lo, hi = max(self._lo, self._at), min(self._hi, self._at + len(mv))
        window = mv[lo - self._at:hi - self._at] if lo < hi else None
        self._at += len(mv)
        if self._pool is None:
            self._hash(mv, window)
            return
        self._pending.append(self._pool.submit(self._hash, mv, window))
        while len(self._pending) > self.PENDING:
            self._pending.popleft().result()

    def _hash(self, mv, window) -> None:
        self.model.update(mv)
        if window is not None:
            self.legacy.update(window)

    def hexdigests(self) -> tuple[str, str]:
        while self._pending:
            self._pending.popleft().result()
        if self._pool is not None:
            self._pool.shutdown()
        return self.model.hexdigest(), self.legacy.hexdigest()[:8]


def raw(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def sdscripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """Both hashes of an in-memory state dict (tests; the writer streams through :class:`HashSink`)."""
    sink = HashSink(ss_header(metadata, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]))
    for k in safetensors_order((k, t.dtype) for k, t in tensors.items()):
        sink.update(raw(tensors[k]))
    return sink.hexdigests()


def patch_header(path, placeholders: dict[str, str], values: dict[str, str]) -> None:
    """Replace each placeholder value in the written header with its value of the same length."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
        for key, ph in placeholders.items():
            old = f'"{key}":"{ph}"'.encode()
            new = f'"{key}":"{values[key]}"'.encode()
            assert len(old) == len(new) and head.count(old) == 1, key
            head = head.replace(old, new)
        f.seek(8)
        f.write(head)
