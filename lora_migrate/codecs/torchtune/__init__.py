"""The torchtune codec: ``adapter_model.pt`` (or ``.safetensors``) in torchtune's own key space (schema:
:mod:`lora_migrate.schemas.torchtune`).

Reading maps ``layers.N.attn.q_proj`` … to the HF module names and, for the model types whose torchtune form keeps
Meta's interleaved q/k rows (Llama), permutes the q/k lora_b rows (and DoRA magnitudes) back to the HF layout; the
model type and head counts come from ``--model-type`` / ``--base-model``, the base model's config.json, or what our
own writer recorded. Writing: one rank, alpha/rank with one alpha, the modules torchtune's builders can put LoRA on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...adapter import AdapterInfo, ScaleProvenance
from ...errors import DetectionError, LoraMigrateError, UnsupportedFeature
from ...execution import Step
from ...findings import Finding
from ...io import BackgroundWriter, BinWriter, open_tensors
from ...rules.shape import rope_rows_deinterleave, rope_rows_interleave
from ...schemas import Convention
from ...schemas import torchtune as S
from ...source import ModuleEntry, Source, TensorStore, json_number, read_json
from ..base import Claim, Codec, PlanOptions
from ..shared import Blocks, StoredSource, execution, layer_count, one_rank_one_scale, refuse_fused

TT_KEY = re.compile(r"^(?P<module>layers\.\d+\.(?:attn|mlp)\.\w+|output)\.(?P<leaf>lora_a\.weight|lora_b\.weight|"
                    r"magnitude)$")
LEAF = {"lora_a.weight": "a", "lora_b.weight": "b", "magnitude": "magnitude"}
LAYOUT_FIELD = "torchtune_qk_layout"  # what our writer records beside torchtune's own config fields
HF_TO_TT = {v: k for k, v in S.LAYER_NAMES.items()}


def to_hf(module: str) -> str | None:
    if module in S.TOP_NAMES:
        return S.TOP_NAMES[module]
    _, n, rel = module.split(".", 2)
    return f"model.layers.{n}.{S.LAYER_NAMES[rel]}" if rel in S.LAYER_NAMES else None


def to_tt(module: str) -> str | None:
    top = {v: k for k, v in S.TOP_NAMES.items()}
    if module in top:
        return top[module]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    return f"layers.{m[1]}.{HF_TO_TT[m[2]]}" if m and m[2] in HF_TO_TT else None


def _weights(folder: Path) -> Path | None:
    """The file holding torchtune's own keys: adapter_model.pt, else an adapter_model.safetensors with them."""
    for name in S.TORCHTUNE.weights_read:
        p = folder / name
        if p.is_file():
            try:
                with open_tensors(p) as f:
                    if any(TT_KEY.match(k) for k in f.keys()):
                        return p
            except LoraMigrateError:
                continue
    return None


def qk_layout(model_type: str | None, cfg: dict | None, where: str) -> tuple[dict | None, str | None]:
    """({"permuted": bool, "num_heads", "num_kv_heads"}, None) or (None, why it cannot be known)."""
    if not model_type:
        return None, "the model type is not known (pass --model-type or --base-model)"
    perm = S.PERMUTES_QK.get(model_type)
    if perm is None:
        return None, (f"whether torchtune's {model_type} keeps q/k rows permuted is not known here (known: "
                      f"{', '.join(sorted(S.PERMUTES_QK))})")
    if not perm:
        return {"model_type": model_type, "permuted": False}, None
    heads = (cfg or {}).get("num_attention_heads")
    if not isinstance(heads, int):
        return None, (f"torchtune's {model_type} permutes q/k rows per head: the head counts are needed (pass "
                      "--base-model)")
    kv = (cfg or {}).get("num_key_value_heads") or heads
    return {"model_type": model_type, "permuted": True, "num_heads": heads, "num_kv_heads": kv, "from": where}, None


class TorchtuneCodec(Codec):
    id = S.FAMILY
    display = "a torchtune"
    output = "folder"

    # ------------------------------------------------------------------------------------------------ reading

    def claim(self, path: Path) -> Claim | None:
        folder = path.parent if path.is_file() else path
        if path.is_file() and path.name not in S.TORCHTUNE.weights_read:
            return None
        w = _weights(folder)
        if w is None or (path.is_file() and w != path):
            return None
        beside = " (beside its PEFT export, which is derived from it)" if w.suffix == ".pt" and \
            (folder / S.WEIGHTS_ST).is_file() else ""
        # 3: the file names torchtune's own module tree, which no other library writes; its adapter_config.json
        # has peft_type (torchtune writes the PEFT export's config), which the PEFT codec claims with 2
        return Claim(why=f"{w.name} with torchtune keys layers.N.attn|mlp.<name>.lora_a.weight{beside}", strength=3)

    def open(self, path: Path, from_: Convention | None) -> Source:
        folder = path.parent if path.is_file() else path
        if from_ is not None and from_.family != self.id:
            raise DetectionError(f"{folder}: --from {from_.name} is not a torchtune convention")
        w = _weights(folder)
        if w is None:
            raise DetectionError(f"{folder}: no adapter_model.pt or .safetensors with torchtune keys")
        a = self._read(folder, w)
        return Source(folder, a.convention, "adapter", [a], [
            f"{w.name} with torchtune keys layers.N.attn|mlp.<name>.lora_a|lora_b.weight",
            f"{S.CONFIG}: r={a.info.r}, lora_alpha={a.info.alpha:g}"])

    def _read(self, folder: Path, weights: Path) -> StoredSource:
        conv = self.conventions[0]
        if not (folder / S.CONFIG).is_file():
            raise LoraMigrateError(f"{folder}: {weights.name} carries no alpha; torchtune writes it in {S.CONFIG} "
                                   "(lora_alpha) beside it, which is missing")
        cfg = read_json(folder / S.CONFIG)
        if not isinstance(cfg.get("lora_alpha"), (int, float)) or not isinstance(cfg.get("r"), int):
            raise LoraMigrateError(f"{folder / S.CONFIG}: r and lora_alpha are needed")
        r, alpha = cfg["r"], float(cfg["lora_alpha"])
        prov = ScaleProvenance(alpha=alpha, r=r, rule="alpha/r", convention=conv.name)
        store = TensorStore()
        try:
            store.add(weights)
            groups: dict[str, dict[str, str]] = {}
            for k in store.keys():
                m = TT_KEY.match(k)
                hf = to_hf(m["module"]) if m else None
                if hf is None:
                    raise UnsupportedFeature(f"{weights}: {k!r} is not a torchtune LoRA parameter this tool maps to "
                                             "the HF model (attn.{q,k,v,output}_proj, mlp.w1/w2/w3, output)")
                groups.setdefault(hf, {})[LEAF[m["leaf"]]] = k
            entries = []
            for hf, keys in sorted(groups.items()):
                if "a" not in keys or "b" not in keys:
                    raise LoraMigrateError(f"{weights}: {hf} lacks lora_a or lora_b")
                metas = {p: store.meta(k) for p, k in keys.items()}
                if metas["a"].shape[0] != r:
                    raise LoraMigrateError(f"{weights}: {keys['a']} has rank {metas['a'].shape[0]}, {S.CONFIG} "
                                           f"says r={r}")
                entries.append(ModuleEntry(module=hf, kind="linear", keys=keys, metas=metas, scale=alpha / r,
                                           provenance=prov))
        except BaseException:
            store.close()
            raise
        info = AdapterInfo(name="default", convention=conv.name, r=r, alpha=alpha, config=cfg,
                           base_model=cfg.get("base_model_name_or_path"))
        feats = {"dora"} if any("magnitude" in e.keys for e in entries) else set()
        a = StoredSource(info=info, convention=conv, store=store, modules=entries, files=[weights], features=feats)
        layout = cfg.get(LAYOUT_FIELD)
        a.codec_state["layout"] = layout if isinstance(layout, dict) else None
        a.codec_state["why"] = "the model type is not known (pass --model-type or --base-model)"
        a.transform = lambda e, p, t: _unpermute(a, e, p, t)
        return a

    def prepare(self, a, opts: PlanOptions) -> None:
        if not isinstance(a, StoredSource) or a.convention.family != self.id:
            return
        cfg = opts.base_config or a.base_config
        mt = opts.model_type or (cfg or {}).get("model_type")
        if mt:
            a.info.model_type = mt
            a.codec_state["layout"], a.codec_state["why"] = qk_layout(mt, cfg, "--base-model" if opts.base_config
                                                                      else "config.json")

    def uses_base_config(self, a, target: Convention) -> bool:
        """The head counts of a q/k row permutation, reading torchtune's files or writing them."""
        mine = a.convention.family == self.id or target.family == self.id
        return mine and any(e.module.endswith((".q_proj", ".k_proj")) for e in a.modules)

    def findings(self, a) -> list[Finding]:
        """What torchtune's own PEFT export beside the adapter computes (it permutes q/k lora_B for every model)."""
        folder = a.files[0].parent
        export = folder / S.WEIGHTS_ST
        if a.files[0].suffix != ".pt" or not export.is_file():
            return []
        q = next((e for e in a.modules if e.module.endswith(".q_proj")), None)
        out = []
        with open_tensors(export) as f:
            key = f"base_model.model.{q.module}.lora_B.weight" if q else None
            if key and key in f:
                same = bool((f.get(key) == a.store.get(q.keys["b"])).all())
                layout = a.codec_state.get("layout")
                if not same and layout and not layout["permuted"]:
                    out.append(Finding(level="error", code="export-scrambled", adapter=a.info.name, message=(
                        f"{S.WEIGHTS_ST} (torchtune's PEFT export) has q/k lora_B rows permuted by tune_to_hf, but "
                        f"torchtune's {layout['model_type']} is not permuted: PEFT loading the export computes "
                        f"scrambled q/k updates (measured for Qwen2: 3.95 logits off); convert {S.WEIGHTS_PT} "
                        "instead")))
                elif not same and not layout:
                    out.append(Finding(level="warning", code="export-permuted", adapter=a.info.name, message=(
                        f"{S.WEIGHTS_ST} (torchtune's PEFT export) permutes q/k lora_B rows: right for Llama, wrong "
                        "for Qwen2/Qwen3 (the files do not name the model type)")))
            if "dora" in a.features and not read_json(folder / S.CONFIG).get("use_dora"):
                out.append(Finding(level="error", code="export-dora", adapter=a.info.name, message=(
                    f"{S.CONFIG} has no use_dora although the adapter is DoRA: PEFT loads torchtune's export as "
                    "plain LoRA (and its q/k magnitudes are not permuted)")))
        return out

    # ------------------------------------------------------------------------------------------------ writing

    def plan(self, src, target: Convention, opts: PlanOptions, steps: list[Step], output: str):
        refuse_fused(src, target)
        name = src.info.name
        tt = {}
        for e in src.modules:
            t = to_tt(e.module)
            if t is None:
                raise UnsupportedFeature(f"{name}: torchtune's LoRA builders have no LoRA on {e.module} (only "
                                         "self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and lm_head)")
            tt[e.module] = t
        blocks = Blocks.of([m for m in tt if m != "lm_head"])
        why = blocks.uneven()
        if why:
            raise UnsupportedFeature(f"{name}: torchtune's builders put LoRA on the same modules of every layer "
                                     f"(lora_attn_modules, apply_lora_to_mlp); {why}")
        rel = next(iter(blocks.per_block.values()), set())
        mlp = sorted(r for r in rel if r.startswith("mlp."))
        if mlp and len(mlp) != 3:
            raise UnsupportedFeature(f"{name}: torchtune's apply_lora_to_mlp adapts gate, up and down projections "
                                     f"together; the source adapts only {', '.join(mlp)}")
        L, where = layer_count(src, opts.base_config)
        idx = list(blocks.per_block)
        notes = []
        if idx and idx != list(range(L if L is not None else idx[-1] + 1)):
            raise UnsupportedFeature(f"{name}: torchtune's builders put LoRA on every layer; the source adapts blocks "
                                     f"{idx}" + (f" of {L} ({where})" if L else " (not 0 … the last)"))
        if idx and L is None:
            notes.append(f"the base model's layer count is not known (pass --base-model): taken as {idx[-1] + 1}")
        layout = None
        if any(m.endswith((".q_proj", ".k_proj")) for m in tt):
            cfg = opts.base_config or src.base_config
            mt = opts.model_type or (cfg or {}).get("model_type") or src.info.model_type
            layout, why = qk_layout(mt, cfg, "--base-model" if opts.base_config else "config.json")
            if layout is None:
                raise UnsupportedFeature(f"{name}: q/k LoRA into torchtune: {why}")
            steps.append(Step(rule="rope_rows_interleave" if layout["permuted"] else "rope_rows", what=(
                f"torchtune's {layout['model_type']} keeps q/k in Meta's interleaved row order: q/k lora_b rows "
                f"(and DoRA magnitudes) permuted per head (q {layout['num_heads']}, k {layout['num_kv_heads']} heads)"
                if layout["permuted"] else f"torchtune's {layout['model_type']} keeps the HF q/k row order: copied")))
        R, s, out = one_rank_one_scale(src, target, steps, "torchtune", lambda s, r: ScaleProvenance(
            alpha=s * r, r=r, rule="alpha/r", convention=target.name), opts.doubled)
        alpha = s * R
        attn = sorted(S.ATTN_OPTION[HF_TO_TT[r]] for r in rel if HF_TO_TT[r] in S.ATTN_OPTION)
        recipe = {"lora_attn_modules": attn, "apply_lora_to_mlp": bool(mlp), "apply_lora_to_output": "lm_head" in tt,
                  "lora_rank": R, "lora_alpha": json_number(alpha)}
        if "dora" in src.features:
            recipe["use_dora"] = True
        steps.append(Step(rule="write", what=f"write {S.WEIGHTS_PT} (torchtune keys layers.N.attn.q_proj.lora_a.weight "
                          f"…) and {S.CONFIG}; build the model with {json.dumps(recipe)}"))
        config = {"r": R, "lora_alpha": json_number(alpha), "peft_type": "LORA",
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in tt}), "recipe": recipe}
        if layout:
            config[LAYOUT_FIELD] = {k: v for k, v in layout.items() if k != "from"}
        return execution(src, target, out, steps, output, [S.CONFIG, S.WEIGHTS_PT], R, alpha, config, notes,
                         {"tt": tt, "layout": layout})

    def tensor_names(self, ex):
        return [S.TT_KEYS.key(p, ex.codec_state["tt"][m]) for m, _, p, _, _ in ex.tensors]

    def write(self, ex, dest: Path, deltas) -> list[str]:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / S.CONFIG).write_text(json.dumps(ex.config, indent=2) + "\n", encoding="utf-8")
        tt, layout = ex.codec_state["tt"], ex.codec_state["layout"]
        with BackgroundWriter(BinWriter(str(dest / S.WEIGHTS_PT))) as w:
            for m, _, p, shape, dtype in ex.tensors:
                w.add(S.TT_KEYS.key(p, tt[m]), dtype, shape)
            w.write_header()
            for d in deltas:
                n = heads(layout, d.module)
                for p, t in (("a", d.A), ("b", d.B), ("magnitude", d.magnitude)):
                    if t is None:
                        continue
                    if n and p != "a":
                        t = rope_rows_interleave(t, n)
                    w.write(S.TT_KEYS.key(p, tt[d.module]), t)
        return []

    def read_back(self, dest: Path, target: Convention, name: str, opts: PlanOptions):
        a = self._read(dest, dest / S.WEIGHTS_PT)
        a.info.name = name
        return a


def heads(layout: dict | None, module: str) -> int | None:
    """The head count whose rows are permuted for ``module`` (None: not permuted)."""
    if not layout or not layout.get("permuted"):
        return None
    if module.endswith(".q_proj"):
        return layout["num_heads"]
    return layout["num_kv_heads"] if module.endswith(".k_proj") else None


def _unpermute(a, e: ModuleEntry, param: str, t):
    if param == "a" or not e.module.endswith((".q_proj", ".k_proj")):
        return t
    layout = a.codec_state.get("layout")
    if layout is None:
        raise UnsupportedFeature(f"{e.module}: reading torchtune q/k LoRA: {a.codec_state['why']}")
    n = heads(layout, e.module)
    return rope_rows_deinterleave(t, n) if n else t


TORCHTUNE = TorchtuneCodec()
