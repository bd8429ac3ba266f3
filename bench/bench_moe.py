"""MoE expert LoRA (PEFT target_parameters) → mlx-lm and → PEFT at a Qwen3-30B-A3B shape, against a raw safetensors
load+save of the same file. Run by hand.

    .venv/bin/python bench/bench_moe.py [--layers 48] [--experts 128] [--rank 16] [--repeat 1]

A synthetic PEFT adapter: hidden 2048, 32 heads of 128 (q 4096, k/v 512), 128 experts with moe_intermediate 768,
LoRA on q/k/v/o and on both expert parameters (``mlp.experts.gate_up_proj`` (E, 1536, 2048), ``down_proj``
(E, 2048, 768): lora_A (E·r, in), lora_B (out, r·E)), bf16 (48 layers ≈ 1.3 GB). The check compares every expert
of every module as its own LoRA pair (128 per module). Each measurement is a fresh process (bench_gguf.run).

- ``copy``: ``safetensors.torch.load_file`` + ``save_file``;
- ``mlx``: ``lora-migrate convert SRC OUT --to mlx-lm --model-type qwen2_moe`` (the experts split into
  switch_mlp.gate/up/down; qwen2_moe's names: the shapes are what is measured);
- ``peft``: ``lora-migrate convert SRC OUT --to peft-0.16`` (the flat layout read into the stacked form and back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import COPY, run, write_bf16  # noqa: E402

H, Q, KV, I = 2048, 4096, 512, 768
LINEAR = {"self_attn.q_proj": (H, Q), "self_attn.k_proj": (H, KV), "self_attn.v_proj": (H, KV),
          "self_attn.o_proj": (Q, H)}  # (in, out)
EXPERTS = {"mlp.experts.gate_up_proj": (H, 2 * I), "mlp.experts.down_proj": (I, H)}


def make(folder: Path, layers: int, E: int, r: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": r, "lora_alpha": 2 * r,
         "target_modules": sorted(m.split(".")[1] for m in LINEAR), "target_parameters": sorted(EXPERTS),
         "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "peft_version": "0.21.2"}))
    plan = []
    for i in range(layers):
        for m, (inp, out) in LINEAR.items():
            k = f"base_model.model.model.layers.{i}.{m}"
            plan += [(f"{k}.lora_A.weight", (r, inp)), (f"{k}.lora_B.weight", (out, r))]
        for m, (inp, out) in EXPERTS.items():  # gate_up_proj is the inner wrapper (experts.base_layer)
            k = f"base_model.model.model.layers.{i}.mlp.experts" + (".base_layer" if "gate_up" in m else "")
            plan += [(f"{k}.lora_A.weight", (E * r, inp)), (f"{k}.lora_B.weight", (out, r * E))]
    return write_bf16(folder / "adapter_model.safetensors", plan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--make", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        print(make(Path(args.make[0]), *map(int, args.make[1:])))
        return
    cli = str(Path(sys.executable).with_name("lora-migrate"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        src = tmp / "adapter"
        size = int(subprocess.run([sys.executable, __file__, "--make", src, str(args.layers), str(args.experts),
                                   str(args.rank)], check=True, capture_output=True, text=True).stdout.strip())
        print(f"PEFT adapter: {args.layers} layers × (4 linear + 2 expert parameters, {args.experts} experts), "
              f"r={args.rank}, bf16: {size / 1e9:.2f} GB; cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        cmds = {"torch": [sys.executable, "-c", "import torch"],
                "copy": [sys.executable, "-c", COPY, str(src), str(tmp / "copy.safetensors")],
                "mlx": [cli, "convert", str(src), str(tmp / "mlx"), "--to", "mlx-lm", "--model-type", "qwen2_moe",
                        "--json", "--overwrite"],
                "peft": [cli, "convert", str(src), str(tmp / "peft"), "--to", "peft-0.16", "--json", "--overwrite"]}
        runs = {k: [run(c, tmp) for _ in range(args.repeat)] for k, c in cmds.items()}
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "cpu", "rss_mb", "anon_mb")}
               for k, v in runs.items()}
        t, c = med["torch"], med["copy"]
        for name, m in med.items():
            if name == "torch":
                continue
            print(f"{name}: {m['wall']:.1f} s wall, {m['cpu']:.1f} s CPU, peak anonymous {m['anon_mb']:.0f} MB "
                  f"({m['anon_mb'] - t['anon_mb']:.0f} above torch)"
                  + ("" if name == "copy" else f"; / copy: wall {m['wall'] / c['wall']:.2f}×, "
                                               f"anonymous {m['anon_mb'] / c['anon_mb']:.2f}×"))


if __name__ == "__main__":
    main()
