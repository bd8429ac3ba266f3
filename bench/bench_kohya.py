"""Speed and memory of a kohya conversion of a Flux-dev-shaped LoRA, against a raw safetensors load + save.

    .venv/bin/python bench/bench_kohya.py [--rank 64] [--dtype bfloat16] [--target kohya] [--repeat 3]

Writes a kohya file shaped like an sd-scripts Flux-dev LoRA (19 double blocks: img/txt attn_qkv, attn_proj, mlp_0,
mlp_2, mod_lin; 38 single blocks: linear1, linear2, modulation_lin; hidden 3072, MLP 12288; rank 64 bf16 ≈ 613 MB)
and, each in a fresh process, in interleaved rounds (medians), measures wall time and peak RSS of
  - baseline: `import torch` alone (RSS floor),
  - copy: safetensors load_file + save_file of the same tensors (what a hand-written script does),
  - api: `lora_migrate.convert(src, out, to=target)` with its numeric check (fused qkv and linear1 split into the
    canonical modules and fused back, sd-scripts' hashes computed),
  - cli: `lora-migrate convert SRC OUT --to target`, timed from spawn to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
extra = {}
if mode == "copy":
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(src, "pt") as f:
        md = f.metadata()
    save_file(load_file(src), out, md)
elif mode == "api":
    import lora_migrate
    r = lora_migrate.convert(src, out, to=TARGET)
    assert r.ok
    extra = {"check_seconds": sum(a.verify.seconds for a in r.adapters)}
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
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


def run(mode: str, src: Path, out: Path, target: str) -> dict:
    """One fresh process, timed from spawn to exit by the parent (the CLI: what a user waits for), with its own
    clock and peak RSS from inside (copy, api)."""
    if mode == "cli":
        cmd = [str(Path(sys.executable).parent / "lora-migrate"), "convert", str(src), str(out), "--to", target]
    else:
        cmd = [sys.executable, "-c", CHILD.replace("TARGET", repr(target)), mode, str(src), str(out)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = p.stdout.read(), p.stderr.read()
    if status:
        raise SystemExit(stderr or stdout)
    res = {"wall": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    if mode != "cli":
        res.update(json.loads(stdout.strip().splitlines()[-1]))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", default="kohya")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "flux_lora.safetensors"
        size = make_file(src, args.rank, args.dtype)
        print(f"Flux-dev-shaped kohya LoRA, rank {args.rank} {args.dtype}: {size / 1e6:.0f} MB → {args.target}; "
              f"load average {os.getloadavg()[0]:.1f}")
        rows = {m: [] for m in ("baseline", "copy", "api", "cli")}
        for _ in range(args.repeat):  # interleaved rounds
            for m in rows:
                out = Path(tmp) / (f"{m}.safetensors" if args.target == "kohya" or m == "copy" else m)
                rows[m].append(run(m, src, out, args.target))
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
        floor = med["baseline"]["peak_rss_mb"]
        for m, r in med.items():
            own = f", own clock {r['seconds']:.2f} s" if "seconds" in r else ""
            chk = f", check {r['check_seconds']:.2f} s" if "check_seconds" in r else ""
            print(f"{m:9} whole process {r['wall']:6.2f} s{own}{chk}; peak RSS {r['peak_rss_mb']:6.0f} MB "
                  f"(+{r['peak_rss_mb'] - floor:.0f} over import torch)")
        print(f"CLI / copy (whole processes): {med['cli']['wall'] / med['copy']['wall']:.2f}×; "
              f"API / copy (own clocks): {med['api']['seconds'] / med['copy']['seconds']:.2f}×; "
              f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
