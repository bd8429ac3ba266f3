"""What each mlx-lm era computes loading an mlx-lm adapter folder as it is (``inspect``'s "loaded as is"), derived by
reading the config as that era's ``load_adapters`` reads it (schema: :mod:`lora_migrate.schemas.mlx_lm`)."""

from __future__ import annotations

import re

from ...findings import LoadCheck
from ...schemas import mlx_lm as S


def as_loaded(a, conventions, era_scale) -> list[LoadCheck]:
    """One LoadCheck per other era in ``conventions``; ``era_scale(conv, lora_parameters)`` → (scale, provenance)."""
    cfg = a.info.config
    lp = cfg.get("lora_parameters", {})
    mine, _ = era_scale(a.convention, lp)
    dora = "dora" in a.features
    out = []
    # releases ≥ 0.22 adapt the last num_layers blocks and refuse tensors of any other block ("contains
    # incompatible tensors"); 0.19–0.21 (layers[-min(num_layers, 0):]) adapted and saved every block for a positive
    # num_layers, so their files can hold more blocks than num_layers says (measured: golden mlxlm0206)
    n = next((cfg[f] for f in ("num_layers", "lora_layers") if isinstance(cfg.get(f), int)), None)
    blocks = {int(m.group(1)) for e in a.modules if (m := re.search(r"\blayers\.(\d+)\.", e.module))}
    extra = f"its tensors are in {len(blocks)} blocks but num_layers = {n}" if n and 0 < n < len(blocks) else None
    for c in (c for c in conventions if c is not a.convention):
        need = S.LAYER_COUNT_FIELDS[c.name]
        lacks = [f for f in need if f not in cfg]
        if len(lacks) == len(need):
            out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                 detail=f"FAILS to load: it reads {' or '.join(need)}, which the config lacks; "
                                        f"convert with --to {c.name}"))
            continue
        problems = [f"the releases that read {f} fail to load it (no {f})" for f in lacks]
        if extra and c.name == "mlx-lm":
            out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=False,
                                 detail=f"FAILS to load: {extra}, and it adapts only the last {n} (\"contains "
                                        f"incompatible tensors\"); convert with --to {c.name}"))
            continue
        switch = S.DORA_FIELDS[c.name]
        off = [f for f in switch if cfg.get(f) not in (True, "dora")]
        if dora and (not switch or off):
            problems.append("DoRA's m is not applied" + (f" by the releases that read {' / '.join(off)}" if switch
                                                          else " by its releases before 0.13.1 (no DoRA there)"))
        if any(e.kind == "experts" for e in a.modules) and "experts" not in c.scaling:
            problems.append(f"its LoRASwitchLinear is not established ({S.REFUSALS['switch_era']})")
        if "alpha" not in lp and S.SCALE_RULES[c.name] == "scale·alpha/rank":
            problems.append("it raises KeyError: no lora_parameters.alpha")
        else:
            s, _ = era_scale(c, lp)
            if s != mine:
                problems.append(f"scale {s:g} instead of {mine:g} ({S.SCALE_RULES[c.name]})")
        out.append(LoadCheck(convention=c.name, library=c.library, versions=c.versions, same=not problems,
                             detail="; ".join(problems) if problems else "the same ΔW"))
    return out
