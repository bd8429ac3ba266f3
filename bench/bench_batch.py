"""Batch vs separate CLI calls: N small generated adapters (T5-like, 4 modules, r=8, fp32), converted
adapter-transformers-3.1 → adapters-1.0 (a rescale + the numeric check), three ways:

  1. N separate `lora-migrate convert` processes (what a shell loop does; each imports torch);
  2. `lora-migrate batch -j 1` (one process);
  3. `lora-migrate batch -j J`.

Prints wall-clock seconds and the ratios. Usage: .venv/bin/python bench/bench_batch.py [N] [J]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CLI = [str(Path(sys.executable).parent / "lora-migrate")]
MODULES = [f"encoder.block.{b}.layer.0.SelfAttention.{m}" for b in (0, 1) for m in ("q", "v")]


def make(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True)
    cfg = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "r": 8,
           "alpha": 16, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
           "init_weights": "lora", "use_gating": False}
    (folder / "adapter_config.json").write_text(json.dumps(
        {"config": cfg, "hidden_size": 64, "model_class": "T5ForConditionalGeneration", "model_name": None,
         "model_type": "t5", "name": "m1", "version": "3.1.0"}))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in MODULES:
        sd[f"{m}.loras.m1.lora_A"] = torch.randn(8, 64, generator=g)
        sd[f"{m}.loras.m1.lora_B"] = torch.randn(64, 8, generator=g)
    torch.save(sd, folder / "pytorch_adapter.bin")


def timed(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    j = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for i in range(n):
            make(d / "src" / f"a{i:04d}", i)
        (d / "m.jsonl").write_text("".join(json.dumps({"source": f"src/a{i:04d}", "to": "adapters-1.0"}) + "\n"
                                           for i in range(n)))
        t0 = time.perf_counter()
        for i in range(n):
            subprocess.run([*CLI, "convert", str(d / "src" / f"a{i:04d}"), str(d / "sep" / f"a{i:04d}"),
                            "--to", "adapters-1.0"], check=True, capture_output=True)
        sep = time.perf_counter() - t0
        b1 = timed([*CLI, "batch", str(d / "m.jsonl"), "--out", str(d / "b1"), "-j", "1"])
        bj = timed([*CLI, "batch", str(d / "m.jsonl"), "--out", str(d / "bj"), "-j", str(j)])
        rerun = timed([*CLI, "batch", str(d / "m.jsonl"), "--out", str(d / "bj"), "-j", str(j)])
    print(f"{n} adapters, {torch.get_num_threads()} torch threads available")
    print(f"  {n} separate convert calls: {sep:7.1f} s  ({sep / n:.2f} s each)")
    print(f"  batch -j 1:                 {b1:7.1f} s  ({sep / b1:.1f}x faster)")
    print(f"  batch -j {j}:                 {bj:7.1f} s  ({sep / bj:.1f}x faster)")
    print(f"  rerun, all skipped (-j {j}):  {rerun:7.1f} s")


if __name__ == "__main__":
    main()
