"""Speed and memory of `convert` on large synthetic AdapterHub adapters, as ratios measured in the same run.

    .venv/bin/python bench/bench_adapterhub.py [--sizes 64,256] [--dtype float32]

For each rank it writes a Llama-7B-shaped adapters-1.1 adapter (32 layers; q, k, v, up, down; adapter.safetensors)
and, each in a fresh subprocess, measures wall time and peak RSS of
  - baseline: `import torch` alone (RSS floor),
  - copy: safetensors load_file + torch.save of the same tensors (what a hand-written script does),
  - convert: `lora_migrate.convert(..., to="adapters-1.0")` with its numeric check (scale folded into every B),
then prints time(convert)/time(copy) and peak RSS above the torch floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, INTER, LAYERS = 4096, 11008, 32
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "mlp.down_proj": (INTER, HIDDEN), "mlp.up_proj": (HIDDEN, INTER)}

CHILD = r"""
import json, resource, sys, time
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
import torch
if mode == "copy":
    from safetensors.torch import load_file
    sd = load_file(src + "/adapter.safetensors")
    torch.save(sd, out)
elif mode == "convert":
    import lora_migrate
    r = lora_migrate.convert(src, out, to="adapters-1.0")
    assert r.ok
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_adapter(folder: Path, r: int, dtype: str) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_scale import make_adapter as make

    return make(folder, LAYERS, r, MODULES, hidden=HIDDEN, dtype=dtype)


def run(mode: str, src: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,256", help="ranks to generate (64 ≈ 0.34 GB, 256 ≈ 1.4 GB in fp32)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import os

    print(f"cores: {os.cpu_count()}, dtype {args.dtype}")
    print(f"{'rank':>5} {'size MB':>8} {'copy s':>7} {'convert s':>9} {'ratio':>6} {'copy RSS':>9} "
          f"{'convert RSS':>11}  (RSS above `import torch`, MB)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        floor = run("baseline", tmp, tmp)["peak_rss_mb"]
        for r in (int(x) for x in args.sizes.split(",")):
            src = tmp / f"r{r}"
            size = make_adapter(src, r, args.dtype)
            copy = run("copy", src, tmp / f"copy{r}.bin")
            conv = run("convert", src, tmp / f"out{r}")
            print(f"{r:>5} {size / 1e6:>8.0f} {copy['seconds']:>7.2f} {conv['seconds']:>9.2f} "
                  f"{conv['seconds'] / copy['seconds']:>6.2f} {copy['peak_rss_mb'] - floor:>9.0f} "
                  f"{conv['peak_rss_mb'] - floor:>11.0f}")


if __name__ == "__main__":
    main()
