"""Lazy, validated reading of tensor files: ``.safetensors`` and PyTorch ``.bin`` checkpoints.

``open_tensors(path)`` returns a :class:`TensorFile` that lists keys and shapes without loading data and loads
one tensor at a time. Safetensors files are validated by the safetensors library (``safe_open``) before anything
is read at their offsets, so that a malformed file ends in a one-line :class:`LoraMigrateError` naming the file,
never a traceback.
Data is then read tensor by tensor at the header's offsets into fresh memory (no mmap, so resident memory
stays about one tensor during a pass over the file). ``.bin`` files: ``data.pkl`` is read with torch's own
weights-only unpickler (anything other than tensors is refused) and each storage's zip record is read on
demand in the same way; legacy and unusual files fall back to ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import oneline
from lora_migrate.io.bin_reader import _open_bin
from lora_migrate.io.safetensors_reader import _open_safetensors
from lora_migrate.io.tensor_file import TensorFile


def open_tensors(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` or ``.bin`` file for lazy reading; any problem is a one-line LoraMigrateError.

    The format comes from the suffix (``.safetensors``; ``.bin``/``.pt``/``.pth``), else from the content.
    """
    path = Path(path)
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise LoraMigrateError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoraMigrateError(f"{path} is a directory, expected a .safetensors or .bin file") from None
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from None
    if st.st_size == 0:
        raise LoraMigrateError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or (suffix not in (".bin", ".pt", ".pth") and head[8:9] == b"{"):
        return _open_safetensors(path, st.st_size)
    return _open_bin(path, head)
