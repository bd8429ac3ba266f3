"""PEFT → llama.cpp GGUF at 70B shape, against a raw safetensors load+save of the same file. Run by hand.

    .venv/bin/python bench/bench_gguf.py [--layers 80] [--rank 64] [--outtype bf16] [--repeat 1]
                                         [--converter "CMD PREFIX"]

A synthetic PEFT adapter shaped like a 70B-class Llama (hidden 8192, intermediate 28672, GQA k/v 1024, 64 heads /
8 kv heads, all seven linear layers per block, r = 64, bf16: 80 layers ≈ 1.66 GB) and a base config.json (for the
q/k permutation heads). Each measurement is a fresh process timed by the parent from spawn to exit, CPU time and
peak RSS from ``wait4``; BENCH_DIR chooses the scratch disk.

- ``copy``: ``safetensors.torch.load_file`` + ``save_file`` of adapter_model.safetensors (what a user's script does
  at the least);
- ``convert``: the converter (``lora-migrate convert SRC OUT.gguf --to gguf --base-model BASE --outtype T``), with
  its numeric check of every module and the read-back confirmation;
- ``torch``: ``python -c "import torch"`` (the floor of every process's RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, KV, HEADS, KV_HEADS = 8192, 28672, 1024, 64, 8
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
           "mlp.down_proj": (INTER, HIDDEN)}  # (in, out)

COPY = ("import sys\nfrom safetensors.torch import load_file, save_file\n"
        "save_file(load_file(sys.argv[1] + '/adapter_model.safetensors'), sys.argv[2])\n")


def make(folder: Path, base: Path, layers: int, r: int) -> int:
    """The PEFT adapter (streamed to disk one tensor at a time) and the base model's config.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    folder.mkdir(parents=True)
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
         "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
         "num_hidden_layers": layers, "vocab_size": 128256, "tie_word_embeddings": False}))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
         "lora_alpha": 2 * r, "target_modules": sorted(m.split(".")[1] for m in MODULES), "lora_dropout": 0.0,
         "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "peft_version": "0.21.2"}))
    plan = []
    for i in range(layers):
        for m, (inp, out) in MODULES.items():
            k = f"base_model.model.model.layers.{i}.{m}"
            plan += [(f"{k}.lora_A.weight", (r, inp)), (f"{k}.lora_B.weight", (out, r))]
    return write_bf16(folder / "adapter_model.safetensors", plan)


def write_bf16(path: Path, plan: list[tuple[str, tuple]]) -> int:
    """N(0, 0.02²) bf16 tensors of the planned (key, shape)s, streamed one at a time; the file's size."""
    import torch

    from lora_migrate.io import SafetensorsWriter

    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path) as w:
        for k, shape in plan:
            w.add(k, torch.bfloat16, shape)
        w.write_header()
        for k, shape in plan:
            w.write(k, torch.empty(shape).normal_(0, 0.02, generator=g).to(torch.bfloat16))
    return path.stat().st_size


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def run(cmd: list[str], cwd: Path) -> dict:
    """Wall, CPU, peak RSS (wait4: anonymous + file-backed pages, mapped tensor files included) and peak
    anonymous RSS (RssAnon of /proc/PID/status sampled every 20 ms: what the process itself holds)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, cwd=cwd)
        anon = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _anon_kb(p.pid))
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fe.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{cmd[:3]} failed: {fe.read()[-2000:]}")
        fo.seek(0)
        out = fo.read()
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "anon_mb": anon / 1024,
            "stdout": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--converter", default=str(Path(sys.executable).with_name("lora-migrate")))
    ap.add_argument("--make", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        print(make(Path(args.make[0]), Path(args.make[1]), int(args.make[2]), int(args.make[3])))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        src, base = tmp / "adapter", tmp / "base"
        # built in a child: Linux keeps a process's peak RSS across fork + exec
        size = int(subprocess.run([sys.executable, __file__, "--make", src, base, str(args.layers), str(args.rank)],
                                  check=True, capture_output=True, text=True).stdout.strip())
        print(f"PEFT adapter: {args.layers} layers × 7 modules, r={args.rank}, bf16: {size / 1e9:.2f} GB; "
              f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        runs: dict[str, list] = {"torch": [], "copy": [], "convert": []}
        out = tmp / "out.gguf"
        for _ in range(args.repeat):
            runs["torch"].append(run([sys.executable, "-c", "import torch"], tmp))
            runs["copy"].append(run([sys.executable, "-c", COPY, str(src), str(tmp / "copy.safetensors")], tmp))
            (tmp / "copy.safetensors").unlink()
            if out.exists():
                out.unlink()
            runs["convert"].append(run([*shlex.split(args.converter), "convert", str(src), str(out), "--to", "gguf",
                                        "--base-model", str(base), "--outtype", args.outtype, "--json"], tmp))
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "cpu", "rss_mb", "anon_mb")} for k, v in runs.items()}
        t, c, v = med["torch"], med["copy"], med["convert"]
        print(f"`import torch`: {t['wall']:.2f} s, peak RSS {t['rss_mb']:.0f} MB, anonymous {t['anon_mb']:.0f} MB")
        for name, m in (("copy (load_file + save_file)", c), (f"convert --to gguf --outtype {args.outtype}", v)):
            print(f"{name}: {m['wall']:.1f} s wall, {m['cpu']:.1f} s CPU, peak RSS {m['rss_mb']:.0f} MB "
                  f"({m['rss_mb'] - t['rss_mb']:.0f} above torch), peak anonymous {m['anon_mb']:.0f} MB "
                  f"({m['anon_mb'] - t['anon_mb']:.0f} above torch)")
        print(f"output {out.stat().st_size / 1e9:.2f} GB; ratio convert / copy: wall {v['wall'] / c['wall']:.2f}×, "
              f"CPU {v['cpu'] / c['cpu']:.2f}×, peak RSS {v['rss_mb'] / c['rss_mb']:.2f}×, peak anonymous "
              f"{v['anon_mb'] / c['anon_mb']:.2f}×")


if __name__ == "__main__":
    main()
