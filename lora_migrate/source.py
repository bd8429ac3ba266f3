"""A source checkpoint as readers hand it over: adapters whose modules are planned from names and shapes alone,
and whose tensors are loaded one module at a time (:meth:`SourceAdapter.load`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .adapter import AdapterInfo, FusedQKV, ModuleDelta, ScaleProvenance, config_rank, delta_kind
from .errors import LoraMigrateError
from .io import TensorFile, TensorMeta, open_tensors
from .schemas import Convention, LayerKind


class TensorStore:
    """Tensor keys → the open file that holds them (one file, or the shards of a sharded checkpoint)."""

    def __init__(self) -> None:
        self.files: list[TensorFile] = []
        self._where: dict[str, TensorFile] = {}

    def add(self, path: Path) -> TensorFile:
        tf = open_tensors(path)
        self.files.append(tf)
        for k in tf.keys():
            if k in self._where:
                raise LoraMigrateError(f"{path}: tensor {k!r} is also in {self._where[k].path}")
            self._where[k] = tf
        return tf

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> TensorMeta:
        return self._where[key].meta(key)

    def get(self, key: str):
        return self._where[key].get(key)

    def stream(self, key: str):
        """``key``'s bytes in pieces, without building the tensor (:meth:`TensorFile.stream`)."""
        return self._where[key].stream(key)

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class ModuleEntry:
    """One adapted module, planned without loading tensors."""

    module: str
    kind: LayerKind
    keys: dict[str, str]  # "a" / "b" / "gate_weight" / "gate_bias" → tensor key
    metas: dict[str, TensorMeta]
    scale: float
    provenance: ScaleProvenance
    fused: FusedQKV | None = None
    alpha: float | None = None  # the alpha this module's scale came from (PEFT alpha_pattern), if any
    embed_scale: float | None = 1.0  # embedding LoRA: the base layer's output factor (None: no config to tell)
    storage_error: float | None = None  # block-quantized factors (ModuleDelta.storage_error)

    @property
    def rank(self) -> int:
        a = self.metas["a"].shape if "a" in self.metas else None
        return config_rank(self.kind, self.fused, None if a is None else a[1 if self.kind == "experts" else 0])


@dataclass
class HeadFiles:
    """Head files saved beside an adapter and what to do with them."""

    files: list[Path]
    keys: list[str]
    static_copy: bool  # only copies the base model's own head (e.g. lm_head.weight), no adapter weights
    reason: str


@dataclass
class SourceAdapter:
    info: AdapterInfo
    convention: Convention
    store: TensorStore
    modules: list[ModuleEntry]
    files: list[Path]
    gated: bool = False
    head: HeadFiles | None = None
    notes: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # non-LoRA tensor keys carried through as they are
    features: set[str] = field(default_factory=set)  # e.g. "rslora", "dora", "lora_bias", "modules_to_save"
    init: str | None = None  # the init's name when the library names one ("pissa", "olora", "gaussian", …)
    init_mutates: bool = False  # the init rewrote the base weights: the adapter holds only on the residual model
    init_rebuild: str | None = None  # the rule that recomputes (A₀, B₀) from the original weights, if one can
    init_why_not: str | None = None  # why it cannot be recomputed, for a mutating init without a rule
    peft: object | None = None  # native: the validated config of the codec that read it (only it looks inside)
    base_config: dict | None = None  # the base model's config.json, where it was found (PEFT sources)

    def stored_as_is(self, e: ModuleEntry) -> bool:
        """Whether ``load(e)`` returns the stored tensors as they are. A reader that rewrites them (a transpose, a
        row permutation, a row block of a fused tensor) says False for those modules; the write check then digests
        what ``load`` returns instead of the file's bytes."""
        return True

    def load(self, e: ModuleEntry) -> ModuleDelta:
        def get(p):
            return self.store.get(e.keys[p]) if p in e.keys else None

        return ModuleDelta(module=e.module, A=get("a"), B=get("b"), scale=e.scale, provenance=e.provenance,
                           kind=delta_kind(e.kind), fused=e.fused, bias=get("bias"), magnitude=get("magnitude"),
                           storage_error=e.storage_error)

    def deltas(self):
        for e in self.modules:
            yield self.load(e)

    @property
    def has_experts(self) -> bool:
        return any(e.kind == "experts" for e in self.modules)

    @property
    def conv_dims(self) -> set[int]:
        """Spatial dimensions of the adapted conv layers (1, 2, 3: nn.Conv1d, Conv2d, Conv3d)."""
        return {len(e.metas["a"].shape) - 2 for e in self.modules if e.kind == "conv"}

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for e in self.modules for m in e.metas.values())


@dataclass
class Source:
    """Everything read from SRC: one adapter, or several (a full model, or a folder of adapter folders)."""

    path: Path
    convention: Convention
    layout: str  # "adapter" | "full-model" | "adapter-folders"
    adapters: list[SourceAdapter]
    reasons: list[str]
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for a in self.adapters:
            a.store.close()


def json_number(x: float) -> int | float:
    """An integral float as an int (alpha 16.0 is written 16, as the libraries write it), else the float."""
    return int(x) if float(x).is_integer() else float(x)


def base_model_config(name: str | Path | None) -> dict | None:
    """The base model's config.json: a local folder, or the Hugging Face cache (never a download). None when
    neither has it."""
    if not name:
        return None
    path = Path(name) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(str(name), "config.json")
        except Exception:  # not a repo id: nothing cached under that name
            hit = None
        if not isinstance(hit, str):
            return None
        path = Path(hit)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line error naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraMigrateError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoraMigrateError(f"{path}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraMigrateError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(obj, dict):
        raise LoraMigrateError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def validation_message(where: str, err: ValidationError) -> str:
    """One line from a pydantic error: the first problem, its location, and how many more there are."""
    errs = err.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field for this convention"
    elif first["type"] == "value_error":  # our own validators: their sentence, without pydantic's "Value error, "
        msg = msg.removeprefix("Value error, ")
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"
