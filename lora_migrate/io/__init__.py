"""Reading and writing tensor files, safely: lazy validated readers, a streaming safetensors writer, a
streaming ``.bin`` writer, and all-or-nothing output directories.

Every failure a user can cause (bad file, existing output, full disk) is a one-line
:class:`lora_migrate.errors.LoraMigrateError` naming the file.
"""

from lora_migrate.io._common import OutOfSpace
from lora_migrate.io.atomic import atomic_file, atomic_output, refuse_overlap
from lora_migrate.io.background import BackgroundWriter
from lora_migrate.io.bin_writer import BinWriter
from lora_migrate.io.safetensors_writer import SafetensorsWriter, safetensors_order
from lora_migrate.io.tensor_file import TensorFile, TensorMeta
from lora_migrate.io.tensors import open_tensors

__all__ = [
    "BackgroundWriter",
    "BinWriter",
    "OutOfSpace",
    "SafetensorsWriter",
    "TensorFile",
    "TensorMeta",
    "atomic_file",
    "atomic_output",
    "open_tensors",
    "refuse_overlap",
    "safetensors_order",
]
