"""The kohya codec: kohya-ss/sd-scripts LoRA files (what A1111, Forge and ComfyUI load), for SD1/SD2, SDXL and
Flux. Data in :mod:`lora_migrate.schemas.kohya`; reading in ``read.py``, names in ``names.py``, planning and
writing in ``write.py``, sd-scripts' hashes in ``hashes.py``; docs/families/kohya.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import LoraMigrateError, VerificationFailed
from ...schemas import kohya as S
from ..base import Claim, Codec, PlanOptions
from . import read as R
from .write import plan_kohya, write_kohya


class KohyaCodec(Codec):
    id = S.FAMILY
    display = "a kohya"
    output = "file"
    file_suffix = ".safetensors"

    def claim(self, path: Path) -> Claim | None:
        path = _lone_file(path)
        if path is None:
            return None
        try:
            from ...io import open_tensors

            with open_tensors(path) as tf:
                keys = tf.keys()
        except (LoraMigrateError, OSError):
            return None
        ours = [k for k in keys if R.split_key(k) is not None]
        if not ours or len(ours) != len(keys):
            return None
        lycoris = any(k.endswith(s) for k in keys for s, _, _ in S.LYCORIS)
        if not lycoris and not any(k.endswith(S.SUFFIXES["a"]) for k in keys):
            return None
        return Claim(why=f"kohya key space: {len(keys)} tensors named lora_unet_…/lora_te…_ "
                         f"(.lora_down/.lora_up/.alpha{', LyCORIS keys' if lycoris else ''})", strength=2)

    def open(self, path: Path, from_=None):
        return R.open_source(_lone_file(Path(path)) or Path(path), from_ or self.conventions[0])

    def prepare(self, a, opts: PlanOptions) -> None:
        if opts.model_type:
            if opts.model_type not in S.FAMILIES:
                raise LoraMigrateError(f"--model-type {opts.model_type}: kohya files are one of "
                                       f"{', '.join(S.FAMILIES)}")
            a.info.model_type = opts.model_type

    def as_loaded(self, a) -> list:
        """What diffusers' kohya loader (0.42.1, measured: ecosystem.md §15) computes from this file as it is."""
        from ...findings import LoadCheck

        codes = {code: msg for _, code, msg in findings_of(a)}
        wrong = [codes[c] for c in ("layers-diffusers-skips", "linear1-not-flux-dev", "sai-names-sd1",
                                    "alpha-diffusers-ignores") if c in codes]
        return [LoadCheck(convention="diffusers (kohya loader)", library="diffusers", versions="0.42.1",
                          same=not wrong, detail="; ".join(wrong) or "reads every module at alpha/r, as sd-scripts")]

    def findings(self, a) -> list:
        from ...findings import Finding

        return [Finding(level=lvl, code=code, message=msg, adapter=a.info.name) for lvl, code, msg in
                findings_of(a)]

    def config_findings(self, path: Path) -> list:
        """LyCORIS keys in a kohya-space file (reading it refuses them, so they are reported from the header)."""
        from ...findings import Finding
        from ...io import open_tensors

        if self.claim(path) is None:
            return []
        with open_tensors(_lone_file(path)) as tf:
            keys = tf.keys()
        hits = {(feature, why) for k in keys for suffix, feature, why in S.LYCORIS if k.endswith(suffix)}
        return [Finding(level="error", code="lycoris", message=f"{feature} (LyCORIS) in the kohya key space: {why}; "
                        "no conversion into a LoRA format is exact") for feature, why in sorted(hits)]

    def place_in_component(self, a, target, component: str) -> None:
        from ..diffusers.format import place_in_component  # kohya's canonical names are diffusers' (names.py)

        place_in_component(a, component)

    def check_options(self, target, opts: PlanOptions) -> None:
        if opts.safetensors or opts.keep_head or opts.outtype:
            raise LoraMigrateError("kohya writes one .safetensors file: --safetensors, --keep-head and --outtype "
                                   "do not apply")

    def plan(self, src, target, opts, steps, output):
        return plan_kohya(src, target, opts, steps, output)

    def expands_fused(self, target) -> bool:
        return True

    def tensor_names(self, ex):
        return [p for _, _, p, _, _ in ex.tensors]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        return write_kohya(ex, dest, deltas)

    def read_back(self, dest: Path, target, name: str, opts: PlanOptions):
        if self.claim(Path(dest)) is None:
            raise VerificationFailed(f"{dest}: the written file is not read as kohya")
        return R.read_kohya(Path(dest), target, name)


def _lone_file(path: Path) -> Path | None:
    """The .safetensors file itself, or the only one in a folder (``check`` passes a file's folder), else None."""
    if path.is_dir():
        files = list(path.glob("*.safetensors"))
        path = files[0] if len(files) == 1 else path
    return path if path.is_file() and path.suffix == ".safetensors" else None


def findings_of(a) -> list[tuple[str, str, str]]:
    """(level, code, message) for a kohya adapter (see docs/families/kohya.md for the codes)."""
    out = []
    if a.missing_alpha:
        out.append(("warning", "missing-alpha",
                    f"{len(a.missing_alpha)} of {len({a.kohya_names[e.module] for e in a.modules})} modules have no "
                    f".alpha (or alpha 0), e.g. {a.missing_alpha[0]}: read as alpha = r (scale 1), as sd-scripts, "
                    "ComfyUI and diffusers do; if the file lost its .alpha tensors, its strength is wrong"))
    fam = a.info.model_type
    if fam is None:
        out.append(("warning", "family-unknown", f"{a.info.config.get('family_why')}: pass --model-type"))
    spec = S.FAMILIES.get(fam or "", {})
    for prefix, comp in spec.get("te", {}).items():
        want = spec["te_width"].get(comp)
        for e in a.modules:
            name = a.kohya_names[e.module]
            if name.startswith(prefix + "_") and name.endswith("q_proj"):
                got = e.metas["a"].shape[1]
                if want and got != want and got in spec["te_width"].values():
                    out.append(("error", "te-shape-contradicts-family",
                                f"{prefix}_ modules have width {got}, {fam}'s {comp} has {want}: the text "
                                "encoders' prefixes look swapped"))
                break
    if a.naming.get("unet") == "sai" and fam in ("sd1", "sd2"):
        out.append(("warning", "sai-names-sd1", "SD1 U-Net layers under SAI (sgm) names: diffusers' "
                                                "StableDiffusionPipeline refuses them (NoMatchingPeftModuleError); "
                                                "converting to kohya writes diffusers names"))
    if a.naming.get("unet") in ("sai", "diffusers"):
        unet = [e for e in a.modules if e.module.startswith("unet.") and e.alpha is not None]
        common = Counter(e.alpha for e in unet).most_common(1)[0][0] if unet else None
        odd = [e.module for e in unet if e.alpha != common and e.module.endswith(S.DIFFUSERS_ALPHA_LOST)]
        if odd:
            out.append(("warning", "alpha-diffusers-ignores",
                        f"{len(odd)} U-Net attention modules (e.g. {odd[0]}) have an alpha other than the most common "
                        f"({common:g}): diffusers' kohya loader applies {common:g} to them (its alpha_pattern keys "
                        "keep the processor.to_q_lora form and match nothing); sd-scripts and ComfyUI read them right"))
    if fam == "flux":
        skips = sorted({a.kohya_names[e.module] for e in a.modules
                        if a.kohya_names[e.module].startswith(S.UNET_PREFIX) and
                        _bfl(a.kohya_names[e.module]).startswith(S.DIFFUSERS_SKIPS_FLUX)})
        if skips:
            out.append(("warning", "layers-diffusers-skips",
                        f"{len(skips)} global Flux layers ({', '.join(skips[:3])}…) are skipped without a word by "
                        "diffusers' kohya loader; convert to diffusers format to keep them"))
        for e in a.modules:
            name = a.kohya_names[e.module]
            if name.endswith("_linear1") and e.module.endswith(".attn.to_q") and e.metas["a"].shape[1] != 3072:
                out.append(("warning", "linear1-not-flux-dev",
                            f"{name}: width {e.metas['a'].shape[1]}; diffusers' kohya loader splits linear1 at "
                            "Flux-dev's sizes only (AssertionError); convert to diffusers format instead"))
                break
    return out


def _bfl(name: str) -> str:
    from .names import dotted

    return dotted(name[len(S.UNET_PREFIX) + 1:], "flux_bfl") or ""


KOHYA = CODEC = KohyaCodec()
