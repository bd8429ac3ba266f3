"""What a codec is: the one reader and writer of a convention family, over the canonical form.

A convention family (PEFT and its eras and servers, AdapterHub and its versions, kohya, GGUF, …) is two things:

- **data**, its schema module under ``lora_migrate/schemas/``: one :class:`~lora_migrate.schemas.Convention` per
  version range (names, versions, key templates, scaling rule per layer kind, features, refusals, quirks);
- **code**, one :class:`Codec` under ``lora_migrate/codecs/``: it claims paths, reads them into the canonical form
  (:class:`~lora_migrate.source.SourceAdapter`: per-module :class:`~lora_migrate.adapter.ModuleDelta` entries with
  the scale kept apart, plus the typed adapter-level :class:`~lora_migrate.adapter.AdapterInfo`), plans how a
  canonical adapter becomes one of its conventions, writes it, and reads its own output back for the check.

The registry (:mod:`lora_migrate.codecs`) lists the codecs; detection, the planner, the API, ``inspect`` and
``check`` iterate it and never name a family. A codec reads only the canonical form of an adapter another codec
read: the ``native`` config of :class:`~lora_migrate.adapter.AdapterInfo` is for the codec that read it (e.g. PEFT
→ PEFT keeps fields only PEFT knows).

The pipeline around a codec, for ``convert SRC OUT --to T``::

    claim(SRC) → open(SRC) → [generic refusals, initial adapter] → codec(T).plan(src, T, opts, steps)
      → Execution: per module the target scale (rescale rule), pad/fuse steps, the output header from meta tensors
      → codec(T).write(ex, dest, checked deltas)   (dest: a folder, or a file for ``output == "file"`` codecs)
      → codec(T).read_back(dest, T, …) → the numeric check compares every module with the source's

See docs/adding-a-convention.md for a walk-through.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from ..errors import DetectionError, LoraMigrateError
from ..schemas import CONVENTIONS, Convention

if TYPE_CHECKING:  # type names only: no import edge at run time
    from ..adapter import ModuleDelta
    from ..execution import Execution, Step
    from ..findings import Finding, LoadCheck
    from ..source import Source, SourceAdapter


@dataclass(frozen=True)
class Claim:
    """A codec's answer to "is this path yours?": which conventions it could be and why (shown by ``inspect``)."""

    why: str
    strength: int = 1  # when two codecs claim a path the stronger wins (a config that names the library: 2)


@dataclass
class PlanOptions:
    """What the user told ``convert`` beyond SRC and the target (each codec uses the ones it needs, and refuses
    one that makes no sense for it through :meth:`Codec.check_options`)."""

    safetensors: bool = False  # AdapterHub: write adapter.safetensors
    keep_head: bool = False  # AdapterHub: copy a head that only repeats the base model's
    model_type: str | None = None  # the base model's type where keys cannot tell (llama, sd1, sdxl, flux, …)
    num_layers: int | None = None  # the base model's layer count (servers that drop partial layer types)
    base_model: str | None = None  # a base model folder or hub id (its config.json: heads, sizes, embed scale)
    base_config: dict | None = None  # that config.json, where it was found
    outtype: str | None = None  # dtype of the written factors, for codecs that choose it (GGUF: f32/f16/bf16/q8_0)
    drop: tuple[str, ...] = ()  # layers the user explicitly lets the target drop (named in the report)
    doubled: bool = False  # PiSSA-style source re-expressed at rank 2r
    # the pipeline component (unet, transformer, text_encoder, text_encoder_2) of an adapter saved without one
    # (PEFT on a bare UNet): the target codec puts the source's modules into it (:meth:`Codec.place_in_component`)
    component: str | None = None
    extra: dict = field(default_factory=dict)  # codec-specific options (documented by the codec)


def pick(path: Path, cands: list[Convention], reasons: list[str], from_: Convention | None
         ) -> tuple[Convention, list[str]]:
    """The convention of ``path`` among the detected candidates ``cands`` (the first reason says what the files
    are), or the one ``--from`` names (of the same codec: :func:`lora_migrate.detect.open_source` checks)."""
    if from_ is not None:
        if from_ not in cands:
            reasons = [*reasons, f"--from {from_.name} overrides the detected {' / '.join(c.name for c in cands)}"]
        else:
            reasons = [*reasons, f"--from {from_.name} agrees"]
        return from_, reasons
    if len(cands) == 1:
        return cands[0], reasons
    raise DetectionError(f"{path}: cannot tell the convention: it could be {', '.join(c.name for c in cands)} "
                         f"({'; '.join(reasons[1:])}); pass --from")


class Codec:
    """The reader and writer of one convention family; subclasses set ``id`` and implement the methods.

    ``id`` equals the ``family`` of the codec's conventions in the schemas. ``output`` says what OUT is: a folder
    (PEFT, AdapterHub, diffusers, mlx-lm, torchtune) or one file (kohya ``.safetensors``, GGUF ``.gguf``).
    """

    id: ClassVar[str]
    display: ClassVar[str]  # in messages: "a PEFT", "an AdapterHub"
    output: ClassVar[Literal["folder", "file"]] = "folder"
    file_suffix: ClassVar[str | None] = None  # for file outputs: the suffix OUT must have

    def output_path(self, folder: Path, name: str) -> Path:
        """Where an output named ``name`` goes inside ``folder``: a subfolder, or ``<name><file_suffix>``."""
        return folder / (name + (self.file_suffix or "") if self.output == "file" else name)

    @property
    def conventions(self) -> tuple[Convention, ...]:
        return tuple(c for c in CONVENTIONS if c.family == self.id)

    # -------------------------------------------------------------------------------------------- reading

    def claim(self, path: Path) -> Claim | None:
        """Cheap: whether ``path`` (a file or a folder) holds this family's adapter(s), from names, a config file
        or a safetensors header; never loads tensors. None: not ours."""
        raise NotImplementedError

    def open(self, path: Path, from_: Convention | None) -> "Source":
        """Read ``path`` lazily into the canonical form; ``from_`` (one of this codec's conventions) overrides
        the detected version. Refusals are :class:`~lora_migrate.errors.LoraMigrateError` with one line."""
        raise NotImplementedError

    def prepare(self, a: "SourceAdapter", opts: PlanOptions) -> None:
        """Complete a source adapter this codec read with what the user supplied (e.g. the base model's config:
        embedding scales, head counts). Default: nothing."""

    def uses_base_config(self, a: "SourceAdapter", target: Convention) -> bool:
        """Whether this codec (as ``a``'s reader or as the target's writer) reads ``--base-model``'s config.json
        for ``a`` (e.g. head counts for a q/k row permutation); then ``--base-model`` is not a mistake for an
        adapter whose init left the base weights alone. Default: no."""
        return False

    def as_loaded(self, a: "SourceAdapter") -> list["LoadCheck"]:
        """For each other convention that would load this file as it is (same files, no conversion): what it
        computes, derived by reading the file as that convention reads it. Default: none."""
        return []

    def findings(self, a: "SourceAdapter") -> list["Finding"]:
        """``check`` findings on an adapter this codec read (codes as in docs/commands.md)."""
        return []

    def config_findings(self, path: Path) -> list["Finding"]:
        """``check`` findings on this codec's raw files under ``path`` (a file or folder), before anything is
        read, so that they are reported even when reading fails. Default: none."""
        return []

    def expect_findings(self, source: "Source", want: Convention) -> list["Finding"] | None:
        """``check --expect want`` where ``want`` reads this codec's files as they are (e.g. a server of PEFT
        files): the findings where it computes another ΔW. None: ``want`` is not such a reader (then a
        convention other than the detected one is a mismatch)."""
        return None

    def extras_to_check(self, src: "SourceAdapter", out: "SourceAdapter") -> list[str]:
        """The source's non-LoRA tensor keys that ``out`` (written by this codec) must hold bit for bit."""
        return list(src.extras)

    # -------------------------------------------------------------------------------------------- writing

    def place_in_component(self, a: "SourceAdapter", target: Convention, component: str) -> None:
        """``--component``: ``a`` (read by any codec) is an adapter of one pipeline component saved without its
        prefix; rename its canonical modules into ``component`` as ``target`` names them, so that the numeric check
        compares the output's modules with the source's, or refuse (a source that names its components already,
        an unknown component). Default: refused, ``target`` has no components."""
        raise LoraMigrateError(f"--component means nothing for {target.name}: it names the pipeline component of "
                               "an adapter saved without one, for targets that load LoRA into a pipeline's "
                               "components")

    def check_options(self, target: Convention, opts: PlanOptions) -> None:
        """Refuse (LoraMigrateError) options that mean nothing for ``target``. Default: accept all."""

    def plan(self, src: "SourceAdapter", target: Convention, opts: PlanOptions, steps: list["Step"],
             output: str) -> "Execution":
        """How ``src`` (read by any codec) becomes ``target`` (one of this codec's): per module the target's
        effective scale and provenance (:class:`~lora_migrate.execution.ModuleOut`), rank padding and fusing,
        the target's config built from the canonical form, the files, and refusals — before anything is read.
        ``steps`` already holds the generic steps; append this codec's (each rule named, its math in
        :mod:`lora_migrate.rules`)."""
        raise NotImplementedError

    def expands_fused(self, target: Convention) -> bool:
        """True when ``target`` cannot hold a compact fused-QKV product (it gets the plain rank-n·r pair)."""
        return "fused_qkv" not in target.scaling

    def tensor_names(self, ex: "Execution") -> Iterable[str]:
        """The tensor names the output will hold (for ``--dry-run``). Default: none listed."""
        return ()

    def write(self, ex: "Execution", dest: Path, deltas: Iterator["ModuleDelta"]) -> list[str]:
        """Write the planned output to ``dest`` (a folder inside the temporary output, or for ``output ==
        "file"`` the file path) from ``deltas``, the checked output modules in plan order, streamed: hold at most
        a few modules at once. Returns notes for the report."""
        raise NotImplementedError

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions) -> "SourceAdapter":
        """Read what :meth:`write` wrote as ``target`` reads it, for the check; raise
        :class:`~lora_migrate.errors.VerificationFailed` if ``target`` would read it as another convention."""
        raise NotImplementedError
