"""Speed and memory of a kohya conversion of a Flux-dev-shaped LoRA, against a raw safetensors load + save.

    .venv/bin/python bench/bench_kohya.py [--rank 64] [--dtype bfloat16] [--target kohya]

Writes a kohya file shaped like an sd-scripts Flux-dev LoRA (19 double blocks: img/txt attn_qkv, attn_proj, mlp_0,
mlp_2, mod_lin; 38 single blocks: linear1, linear2, modulation_lin; hidden 3072, MLP 12288; rank 64 bf16 ≈ 613 MB)
and, each in a fresh subprocess, measures wall time and peak RSS of
  - baseline: `import torch` alone (RSS floor),
  - copy: safetensors load_file + save_file of the same tensors (what a hand-written script does),
  - convert: the kohya codec's claim/open/plan/write (fused qkv and linear1 split into the canonical modules and
    fused back), then read_back with a ΔW comparison of every module against the source (the check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

H, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38
DOUBLE_MODULES = {"img_attn_qkv": (H, 3 * H), "txt_attn_qkv": (H, 3 * H), "img_attn_proj": (H, H),
                  "txt_attn_proj": (H, H), "img_mlp_0": (H, MLP), "img_mlp_2": (MLP, H), "txt_mlp_0": (H, MLP),
                  "txt_mlp_2": (MLP, H), "img_mod_lin": (H, 6 * H), "txt_mod_lin": (H, 6 * H)}
SINGLE_MODULES = {"linear1": (H, 3 * H + MLP), "linear2": (H + MLP, H), "modulation_lin": (H, 3 * H)}

CHILD = r"""
import json, resource, sys, time
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
import torch
if mode == "copy":
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        md = f.metadata()
    save_file(load_file(src), out, md)
elif mode == "convert":
    from pathlib import Path
    from lora_migrate.codecs.kohya import CODEC
    from lora_migrate.codecs.base import PlanOptions
    from lora_migrate.io._common import few_threads, release_memory
    with few_threads():   # as the API runs a conversion
        assert CODEC.claim(Path(src)) is not None
        a = CODEC.open(Path(src)).adapters[0]
        ex = CODEC.plan(a, CODEC.conventions[0], PlanOptions(), [], "out.safetensors")
        CODEC.write(ex, Path(out), ex.deltas())
        t1 = time.perf_counter()
        back = CODEC.read_back(Path(out), CODEC.conventions[0], "out", PlanOptions())
        by = {e.module: e for e in back.modules}
        for e in a.modules:   # the check: same factors and scale, module by module
            d1, d2 = a.load(e), back.load(by[e.module])
            assert d1.scale == d2.scale and torch.equal(d1.A, d2.A) and torch.equal(d1.B, d2.B), e.module
            release_memory()
    print(json.dumps({"write_seconds": t1 - t0}), file=sys.stderr)
elif mode == "baseline":
    pass
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_file(path: Path, r: int, dtype: str) -> int:
    import torch
    from lora_migrate.io import SafetensorsWriter

    dt = getattr(torch, dtype)
    mods = [(f"lora_unet_double_blocks_{i}_{m}", io) for i in range(DOUBLE) for m, io in DOUBLE_MODULES.items()]
    mods += [(f"lora_unet_single_blocks_{i}_{m}", io) for i in range(SINGLE) for m, io in SINGLE_MODULES.items()]
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path, {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(r),
                                  "ss_network_alpha": "32.0", "ss_base_model_version": "flux1"}) as w:
        plan = []
        for name, (i, o) in sorted(mods):
            plan += [(f"{name}.alpha", (), None), (f"{name}.lora_down.weight", (r, i), None),
                     (f"{name}.lora_up.weight", (o, r), None)]
        for k, shape, _ in plan:
            w.add(k, dt, shape)
        w.write_header()
        for k, shape, _ in plan:
            w.write(k, torch.tensor(32.0, dtype=dt) if not shape else (torch.randn(*shape, generator=g) * 0.02).to(dt))
    return path.stat().st_size


def run(mode: str, src: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for line in p.stderr.splitlines():
        if line.startswith("{"):
            res.update(json.loads(line))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "flux_lora.safetensors"
        size = make_file(src, args.rank, args.dtype)
        print(f"Flux-dev-shaped kohya LoRA, rank {args.rank} {args.dtype}: {size / 1e6:.0f} MB")
        rows = {m: [] for m in ("baseline", "copy", "convert")}
        for _ in range(args.repeat):
            for m in rows:
                out = Path(tmp) / f"{m}.safetensors"
                rows[m].append(run(m, src, out))
                out.unlink(missing_ok=True)
        best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in rows.items()}
        floor = best["baseline"]["peak_rss_mb"]
        for m, r in best.items():
            print(f"{m:9} {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['peak_rss_mb'] - floor:.0f} "
                  f"over import torch)" + (f"  write done at {r['write_seconds']:.2f} s" if "write_seconds" in r else ""))
        print(f"convert / copy: {best['convert']['seconds'] / best['copy']['seconds']:.2f}×")


if __name__ == "__main__":
    main()
