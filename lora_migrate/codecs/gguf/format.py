"""GGUF adapter files through the ``gguf`` package (ggml's own reader and writer): names from gguf's tensor-name
tables, the llama.cpp layout (schemas/gguf.py), the q/k row permutation, and the output types.

All file I/O is ``gguf.GGUFReader`` (memory-mapped, lazy) and ``gguf.GGUFWriter`` used in its streaming order:
every tensor's info first (:meth:`GGUFWriter.add_tensor_info`), then header, metadata and tensor infos, then each
tensor's data as it comes (:meth:`GGUFWriter.write_tensor_data`), so that at most one module is in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ...adapter import ModuleDelta
from ...errors import LoraMigrateError, UnsupportedFeature
from ...check.report import UNIT_ROUNDOFF
from ...io import TensorMeta
from ...schemas.gguf import ARCHS, MODEL_TYPE_OF_ARCH, OUTTYPES, Q8_0_BLOCK, Q8_0_ERROR, REFUSALS, GgufArch

EMBED = "token_embd.weight"


def gguf_lib():
    import gguf

    return gguf


# ------------------------------------------------------------------------------------------------ names


def arch_of(model_type: str | None, adapter: str) -> GgufArch:
    if not model_type:
        raise UnsupportedFeature(f"{adapter}: {REFUSALS['unknown_type']}")
    a = ARCHS.get(model_type)
    if a is None:
        raise UnsupportedFeature(f"{adapter}: model_type {model_type!r} is not an architecture this converter writes "
                                 f"llama.cpp adapters for (supported: {', '.join(sorted(ARCHS))}): the mapping of its "
                                 "modules onto its base GGUF's tensors (renames, splits, permutations) is unverified")
    return a


def tensor_map(arch: str, n_blocks: int):
    """gguf's own name table for ``arch`` (``gguf.get_tensor_name_map``)."""
    g = gguf_lib()
    enum = {v: k for k, v in g.MODEL_ARCH_NAMES.items()}[arch]
    return g.get_tensor_name_map(enum, n_blocks)


def gguf_name(tmap, module: str) -> str | None:
    """The base GGUF tensor of a transformers module (``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q.weight``)."""
    return tmap.get_name(module + ".weight", try_suffixes=(".weight",))


def module_name(tmap, base: str, arch: GgufArch) -> str | None:
    """The transformers module of a base GGUF tensor name: of the names gguf's table maps onto it, the first in the
    architecture's transformers layout (``model.layers.N.…`` for blocks)."""
    stem = base.removesuffix(".weight")
    cands = [hf for hf, (_, g) in tmap.mapping.items() if g == stem and hf != stem]
    if stem.startswith("blk."):
        prefix = arch.block_prefix.format(bid=stem.split(".")[1])
        cands = [c for c in cands if c.startswith(prefix) and "." not in c[len(prefix):].replace(".", "", 1)
                 and not c.endswith("_no_perm")]
    else:
        cands = [c for c in cands if c in ("model.embed_tokens", "lm_head")]
    return cands[0] if cands else None


def n_blocks_of(modules: Iterable[str], cfg: dict | None) -> int:
    n = (cfg or {}).get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return n
    bids = [int(p) for m in modules for i, p in enumerate(m.split(".")[:-1]) if p.isdigit()]
    return max(bids, default=-1) + 1


def heads_of(cfg: dict | None) -> tuple[int, int] | None:
    """(num_attention_heads, num_key_value_heads) from a config.json, or None."""
    if not cfg:
        return None
    n = cfg.get("num_attention_heads")
    if not isinstance(n, int) or n <= 0:
        return None
    kv = cfg.get("num_key_value_heads") or n
    return n, int(kv)


def qk_heads(base: str, heads: tuple[int, int]) -> int | None:
    """The head count the q/k rows of ``base`` are permuted with (n_head for attn_q, n_kv_head for attn_k)."""
    if base.endswith("attn_q.weight"):
        return heads[0]
    if base.endswith("attn_k.weight"):
        return heads[1]
    return None


def permute_rows(b, n_head: int):
    """``LlamaModel.permute`` (convert_hf_to_gguf) on the rows of B (out, r): per head, the two rotary halves
    interleaved. numpy or torch; :func:`unpermute_rows` is its inverse."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def unpermute_rows(b, n_head: int):
    return b.reshape(n_head, b.shape[0] // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


# ------------------------------------------------------------------------------------------------ output types


def quantizable(stored_shape: tuple[int, ...]) -> bool:
    """q8_0 blocks run along ne[0], the last numpy axis."""
    return stored_shape[-1] % Q8_0_BLOCK == 0


def ggml_type(outtype: str, stored_shape: tuple[int, ...]) -> str:
    """The GGML type a tensor is written in: the outtype's, or F16 where q8_0 cannot block it (ne[0] % 32)."""
    t = OUTTYPES[outtype][0]
    return "F16" if t == "Q8_0" and not quantizable(stored_shape) else t


def q8_0_roundtrip(x: np.ndarray) -> np.ndarray:
    """The values a q8_0 tensor holds for x (rows along ne[0]): dequantize(quantize(x)), float32. Quantizing these
    values again gives the same blocks (d = 127·d₁₆/127 = d₁₆ exactly, q·d₁₆·fl(1/d₁₆) rounds back to q), so the
    file written from them holds exactly what the check compared."""
    g = gguf_lib()
    qt = g.GGMLQuantizationType.Q8_0
    return g.quants.dequantize(g.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qt), qt)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "Q8_0": torch.float32}


def storage_error(typ: str, source: torch.dtype | None = None) -> float | None:
    """ModuleDelta.storage_error of a factor stored as ``typ`` from ``source`` values: Q8_0's block bound, a cast
    to a coarser float its unit roundoff (‖x̂ − x‖_F ≤ u‖x‖_F), None when nothing was rounded (or not known)."""
    if typ == "Q8_0":
        return Q8_0_ERROR
    dt = _DTYPES[typ]
    if dt == torch.float32 or (source is not None and source == dt):
        return None
    return UNIT_ROUNDOFF[dt]


def store_factor(t: torch.Tensor, outtype: str, transposed: bool) -> tuple[torch.Tensor, float | None]:
    """A canonical factor as the output type holds it (cast, or q8_0 values), in canonical orientation;
    ``transposed``: the file stores tᵀ (the embedding's lora_a). Returns (tensor, its storage error)."""
    stored_shape = tuple(t.shape[::-1]) if transposed else tuple(t.shape)
    typ = ggml_type(outtype, stored_shape)
    err = storage_error(typ, t.dtype)
    if typ != "Q8_0":
        return t.to(_DTYPES[typ]), err
    if t.device.type == "meta":
        return t.to(torch.float32), err
    x = t.detach().to(torch.float32).numpy()
    y = q8_0_roundtrip(x.T if transposed else x)
    return torch.from_numpy(np.ascontiguousarray(y.T if transposed else y)), err


def store_delta(d: ModuleDelta, outtype: str) -> ModuleDelta:
    """A delta's factors as ``outtype`` stores them (the last step of the pipeline, so the check sees them)."""
    A, ea = store_factor(d.A, outtype, transposed=d.kind == "embedding")
    B, eb = store_factor(d.B, outtype, transposed=False)
    errs = [e for e in (ea, eb) if e]
    return d.replace(A=A, B=B, storage_error=max(errs) if errs else None)


def _stored_array(t: torch.Tensor, typ: str) -> np.ndarray:
    """The bytes gguf writes for a stored factor (already in its GGUF orientation)."""
    t = t.detach().contiguous()
    if typ == "BF16":
        return t.view(torch.int16).numpy().view(np.uint16)
    if typ == "Q8_0":
        g = gguf_lib()
        return g.quants.quantize(t.to(torch.float32).numpy(), g.GGMLQuantizationType.Q8_0)
    return t.numpy()


def _nbytes(shape: tuple[int, ...], typ: str) -> int:
    n = int(np.prod(shape))
    if typ == "Q8_0":
        return n // Q8_0_BLOCK * 34
    return n * {"F32": 4, "F16": 2, "BF16": 2}[typ]


# ------------------------------------------------------------------------------------------------ writing


def write_gguf(path: Path, arch: str, alpha: float, name: str, layout: list[tuple[str, str, tuple, str]],
               deltas: Iterator[ModuleDelta], names: dict[str, str], heads: dict[str, int]) -> int:
    """Write the adapter streamed. ``layout``: (tensor name, module, stored shape, GGML type) in write order (per
    module lora_a then lora_b); ``names``: module → base tensor; ``heads``: module → n for the q/k row permutation.
    Returns the number of tensors written."""
    g = gguf_lib()
    w = g.GGUFWriter(str(path), arch)
    try:
        w.add_type(g.GGUFType.ADAPTER)
        w.add_string(g.Keys.Adapter.TYPE, "lora")
        w.add_float32(g.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(name)
        for tname, _, shape, typ in layout:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), _nbytes(shape, typ),
                              raw_dtype=getattr(g.GGMLQuantizationType, typ))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        it = iter(layout)
        n = 0
        for d in deltas:
            base = names[d.module]
            A = d.A.T if d.kind == "embedding" else d.A
            B = permute_rows(d.B, heads[d.module]) if d.module in heads else d.B
            for suffix, t in ((".lora_a", A), (".lora_b", B)):
                tname, _, shape, typ = next(it)
                if tname != base + suffix or tuple(t.shape) != shape:
                    raise LoraMigrateError(f"{path}: internal error: planned {tname} {shape}, got {base + suffix} "
                                           f"{tuple(t.shape)}")
                w.write_tensor_data(_stored_array(t, typ))
                n += 1
        if next(it, None) is not None:
            raise LoraMigrateError(f"{path}: internal error: fewer modules than planned")
    finally:
        w.close()
    return n


# ------------------------------------------------------------------------------------------------ reading


class GgufTensors:
    """A GGUF adapter's tensors as canonical factors (the :class:`~lora_migrate.source.TensorStore` interface):
    keys are the GGUF tensor names; :meth:`get` returns lora_a as A (r, in) (the embedding's transposed back),
    lora_b as B (out, r) with the q/k rows un-permuted (``unpermute``: key → n_head, set once the base model's
    heads are known), F16/BF16 as such and Q8_0 dequantized to float32."""

    def __init__(self, path: Path):
        g = gguf_lib()
        self.path = path
        try:
            self.reader = g.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError/struct.error/… on a damaged file
            raise LoraMigrateError(f"{path}: not a readable GGUF file: {e}") from None
        self.files = [path]
        self._t = {t.name: t for t in self.reader.tensors}
        self.unpermute: dict[str, int] = {}
        self.pending: dict[str, str] = {}  # key → why it cannot be read yet (q/k rows, heads unknown)

    def field(self, key: str):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def keys(self) -> list[str]:
        return list(self._t)

    def type_name(self, key: str) -> str:
        return self._t[key].tensor_type.name

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._t[key].shape))  # ne reversed: numpy order

    def meta(self, key: str) -> TensorMeta:
        shape = self.stored_shape(key)
        if key == EMBED + ".lora_a":
            shape = shape[::-1]
        dt = _DTYPES.get(self.type_name(key))
        if dt is None:
            raise UnsupportedFeature(f"{self.path}: tensor {key} is {self.type_name(key)}; lora-migrate reads "
                                     "F32, F16, BF16 and Q8_0 adapters")
        return TensorMeta(key=key, shape=shape, dtype=dt, nbytes=int(np.prod(shape)) * dt.itemsize)

    def get(self, key: str) -> torch.Tensor:
        if key in self.pending:
            raise UnsupportedFeature(f"{self.path}: {self.pending[key]}")
        g = gguf_lib()
        t = self._t[key]
        typ = t.tensor_type.name
        shape = self.stored_shape(key)
        if typ == "Q8_0":
            x = torch.from_numpy(g.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).copy())
        elif typ == "BF16":
            raw = np.asarray(t.data).reshape(-1).view(np.int16).reshape(shape)
            x = torch.from_numpy(raw.copy()).view(torch.bfloat16)
        else:
            self.meta(key)  # refuses other types
            x = torch.from_numpy(np.asarray(t.data).reshape(shape).copy())
        if key == EMBED + ".lora_a":
            x = x.T
        if key in self.unpermute:
            x = unpermute_rows(x, self.unpermute[key])
        return x.contiguous()

    def stream(self, key: str):
        yield self.get(key).reshape(-1).view(torch.uint8).numpy()

    def close(self) -> None:
        self._t = {}
        self.reader = None


def read_arch(store: GgufTensors) -> tuple[str, str]:
    """(general.architecture, model_type) of an adapter file, refusing what llama.cpp would not load as one."""
    path = store.path
    if store.field("general.type") != "adapter":
        raise LoraMigrateError(f"{path}: general.type is {store.field('general.type')!r}, not 'adapter' "
                               "(llama.cpp: \"expect general.type to be 'adapter'\")")
    if store.field("adapter.type") != "lora":
        raise UnsupportedFeature(f"{path}: adapter.type is {store.field('adapter.type')!r}; lora-migrate reads "
                                 "llama.cpp LoRA adapters (adapter.type = lora)")
    arch = store.field("general.architecture")
    mt = MODEL_TYPE_OF_ARCH.get(arch)
    if mt is None:
        raise UnsupportedFeature(f"{path}: general.architecture {arch!r}: lora-migrate reads llama.cpp adapters for "
                                 f"{', '.join(sorted(MODEL_TYPE_OF_ARCH))}")
    return arch, mt
