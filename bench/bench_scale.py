"""Performance at scale, as ratios measured in one run (issue 5). Run by hand; not a test.

    .venv/bin/python bench/bench_scale.py [--layers 80,5] [--rank 64] [--repeat 3] [--skip-users]

Synthetic adapters-1.1 (AdapterHub) adapters shaped like a 70B-class Llama (hidden 8192, intermediate 28672,
GQA k/v 1024, 80 layers; q, k, v, up, down: every linear layer AdapterHub's LoRA adapts), r=64, bf16:
80 layers ≈ 1.1 GB, 5 layers ≈ 0.07 GB. Every measurement runs in a fresh subprocess (wall time, CPU time, peak
RSS); the median of ``--repeat`` rounds counts (each figure its own median), because the 2-core machine is shared;
each round runs every measurement of a size once in turn, so a burst of load from elsewhere hits them alike;
the load average is printed before and after each size. ``--also TREE`` adds the same conversions by another
checkout (before/after a change), interleaved with the rest:

  (a) ``convert --to adapters-1.0`` (scale 2 folded into every B, with the numeric check) vs a raw
      ``safetensors.load_file`` + ``save_file`` of the same file ("copy"), and vs that copy followed by an
      ``fsync`` of the file and its folder ("copy+fsync"): convert makes its output durable before renaming it
      into place (crash safety), which the plain copy does not. Timed two ways: "API", ``lora_migrate.convert()``
      in a child whose own clock runs from before ``import torch`` to the end of its script, against the copy
      timed alike; "CLI", the ``lora-migrate convert`` console script as a user runs it, timed by the parent from
      spawn to exit (CPU time and peak RSS from ``wait4``), against the copy script's whole process alike.
      Output ``bin``: pytorch_adapter.bin (the adapters default: torch's zip format, CRC-32 per record); ``st``:
      ``--safetensors``;
  (b) peak RSS of convert minus that of ``python -c "import torch"``, for both sizes;
  (c) the check's share of the conversion (``VerifyReport.seconds`` / convert's own time);
  (d) ``lora-migrate --help`` and ``lora-migrate conventions`` wall time;
  (e) ``batch``: measured by ``bench/bench_batch.py`` (500 small adapters: ``bench_batch.py 500 2``);
  (f) what users do today: load a base model with adapters 1.3.0, ``load_adapter``, ``save_adapter`` (on a
      small Llama), vs ``lora_migrate.convert()`` and the ``lora-migrate convert`` CLI on the same adapter, which
      read no base weights.
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

HIDDEN, INTER, KV = 8192, 28672, 1024
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
           "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN)}  # (in, out)

CHILD = r"""
import json, resource, sys, time
mode, src, out = sys.argv[1:4]
t0, c0 = time.perf_counter(), time.process_time()
import torch
extra = {}
if mode in ("copy", "copy_fsync"):
    import os
    from safetensors.torch import load_file, save_file
    save_file(load_file(src + "/adapter.safetensors"), out)
    if mode == "copy_fsync":  # what convert does before its rename: the file, then its folder
        for p, flags in ((out, os.O_RDONLY), (os.path.dirname(out), os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(p, flags)
            os.fsync(fd)
            os.close(fd)
elif mode in ("convert", "convert_st"):
    import lora_migrate
    t1 = time.perf_counter()
    r = lora_migrate.convert(src, out, to="adapters-1.0", safetensors=mode == "convert_st")
    assert r.ok, r
    extra = {"convert_seconds": time.perf_counter() - t1, "check_seconds": r.adapters[0].verify.seconds,
             "summary": r.adapters[0].verify.summary(), "package": lora_migrate.__file__}
elif mode == "users":  # what a user does today: the base model, the source library, the target library
    import adapters, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[4])
    adapters.init(model)
    name = model.load_adapter(src, use_safetensors=True)
    model.save_adapter(out, name)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def make_adapter(folder: Path, layers: int, r: int, modules=MODULES, hidden=HIDDEN, dtype="bfloat16") -> int:
    """An adapters-1.1 adapter (adapter.safetensors), streamed to disk one tensor at a time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from lora_migrate.io import SafetensorsWriter

    folder.mkdir(parents=True)
    cfg = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": True, "output_lora": True,
           "leave_out": [], "r": r, "alpha": 2 * r, "dropout": 0.0, "attn_matrices": ["q", "k", "v"],
           "composition_mode": "add", "init_weights": "lora", "use_gating": False, "dtype": None}
    (folder / "adapter_config.json").write_text(json.dumps(
        {"config": cfg, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_name": None,
         "model_type": "llama", "name": "m1", "version": "adapters.1.3.0"}))
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    plan = []
    for i in range(layers):
        for m, (inp, out) in modules.items():
            k = f"model.layers.{i}.{m}.loras.m1"
            plan += [(f"{k}.lora_A", (r, inp)), (f"{k}.lora_B", (out, r))]
    with SafetensorsWriter(folder / "adapter.safetensors") as w:
        for k, shape in plan:
            w.add(k, dt, shape)
        w.write_header()
        for k, shape in plan:
            w.write(k, torch.empty(shape).normal_(0, 0.02, generator=g).to(dt))
    return (folder / "adapter.safetensors").stat().st_size


def child(mode: str, src: Path, out: Path, *more, tree: str | None = None) -> dict:
    """One measurement in a fresh process; ``tree``: import lora_migrate from that checkout instead.

    Besides the child's own figures (its clock starts before ``import torch`` and stops before the interpreter's
    teardown), the parent measures the whole process as a user waits for it: ``wall`` from spawn to exit, and
    ``cpu_all`` / ``rss_all`` from ``wait4``. Modes ``cli`` / ``cli_st`` run the ``lora-migrate`` console script
    itself, which reports nothing of its own."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    env = dict(os.environ, PYTHONPATH=tree) if tree else None
    if mode in ("cli", "cli_st"):
        exe = str(Path(sys.executable).with_name("lora-migrate"))
        if tree:  # the other checkout's entry point (`main` before `run` existed), run by this interpreter
            cmd = [sys.executable, "-c", "import sys; from lora_migrate import cli; sys.argv[0] = 'lora-migrate'; "
                   "getattr(cli, 'run', cli.main)()"]
        else:
            cmd = [exe]
        cmd += ["convert", str(src), str(out), "--to", "adapters-1.0", *(["--safetensors"] if mode == "cli_st" else [])]
    else:
        cmd = [sys.executable, "-c", CHILD, mode, str(src), str(out), *map(str, more)]
    # cwd: with `python -c` the working directory comes first on sys.path, before PYTHONPATH
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env, cwd=tree or out.parent)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
    if p.returncode:
        raise SystemExit(f"{mode} failed:\n{stderr}")
    got = json.loads(stdout.strip().splitlines()[-1]) if mode not in ("cli", "cli_st") else {}
    if tree and "package" in got and not Path(got["package"]).is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"--also {tree}: the child imported {got['package']}")
    got.update(wall=wall, cpu_all=ru.ru_utime + ru.ru_stime, rss_all=ru.ru_maxrss / 1024)
    got.setdefault("seconds", wall)
    return got


def medians(runs: list[dict]) -> dict:
    """Each numeric figure's median over the runs (and the wall times of all runs)."""
    out = dict(runs[len(runs) // 2])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.median(r[k] for r in runs)
    out["walls"] = [r["seconds"] for r in runs]
    out["walls_all"] = [r["wall"] for r in runs]
    return out


def median(mode: str, repeat: int, *args) -> dict:
    return medians([child(mode, *args) for _ in range(repeat)])


def interleaved(jobs: dict[str, tuple], repeat: int) -> dict[str, dict]:
    """``repeat`` rounds, each running every job once in turn (so a burst of load from elsewhere hits all of them
    alike), then each job's medians. ``jobs``: name -> (mode, src, out[, tree[, more arguments]])."""
    runs: dict[str, list] = {name: [] for name in jobs}
    for _ in range(repeat):
        for name, (mode, src, out, *rest) in jobs.items():
            tree, more = (rest[0] if rest else None), rest[1:]
            runs[name].append(child(mode, src, out, *more, tree=tree))
    return {name: medians(r) for name, r in runs.items()}


def wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SMALL = {"self_attn.q_proj": (512, 512), "self_attn.k_proj": (512, 512), "self_attn.v_proj": (512, 512),
         "mlp.up_proj": (512, 1376), "mlp.down_proj": (1376, 512)}


def make_base(base: Path) -> None:
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(base)
    make_adapter(base.parent / "small", 8, 16, SMALL, hidden=512, dtype="float32")


def in_child(*args) -> None:
    """Build inputs in a subprocess: Linux keeps a process's peak RSS across fork + exec, so a parent that had
    imported torch (or built a model) would lift every measured child's peak RSS to its own."""
    subprocess.run([sys.executable, __file__, *map(str, args)], check=True)


def users_today(tmp: Path, repeat: int) -> None:
    """(f): a small Llama saved as a base model, an adapters-1.3.0 adapter for it, both routes timed."""
    base, src = tmp / "base", tmp / "small"
    in_child("--make-base", base)
    base_mb = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) / 1e6
    got = interleaved({"users": ("users", src, tmp / "users_out", None, base), "ours": ("convert", src, tmp / "ours_out"),
                       "cli": ("cli", src, tmp / "ours_out")}, repeat)
    users, ours, cli = got["users"], got["ours"], got["cli"]
    print(f"(f) small Llama (8 layers, hidden 512, base model {base_mb:.0f} MB), r=16 adapter: load base + "
          f"load_adapter + save_adapter (adapters 1.3.0) {users['seconds']:.2f} s, {users['peak_rss_mb']:.0f} MB; "
          f"lora_migrate.convert() {ours['seconds']:.2f} s, {ours['peak_rss_mb']:.0f} MB, no base weights read: "
          f"{users['seconds'] / ours['seconds']:.1f}× faster; whole processes: users {users['wall']:.2f} s, "
          f"`lora-migrate convert` {cli['wall']:.2f} s, {users['wall'] / cli['wall']:.1f}× faster")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="80,5", help="layer counts of the 70B-shaped adapters (80 ≈ 1.1 GB bf16)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-users", action="store_true", help="skip (f), which loads a small base model")
    ap.add_argument("--also", metavar="TREE", help="also time the conversions with lora_migrate imported from TREE "
                    "(another checkout, e.g. `git archive <commit> | tar -x -C TREE`), interleaved: rows '... also'")
    ap.add_argument("--make-adapter", nargs=3, help=argparse.SUPPRESS)  # folder layers rank (in a child)
    ap.add_argument("--make-base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_adapter:
        folder, layers, rank = args.make_adapter
        make_adapter(Path(folder), int(layers), int(rank))
        return
    if args.make_base:
        make_base(Path(args.make_base))
        return
    print(f"cores: {os.cpu_count()}, torch threads in convert: {os.environ.get('LORA_MIGRATE_THREADS', '1')}, "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    exe = Path(sys.executable).with_name("lora-migrate")
    print(f"(d) `lora-migrate --help` {wall([str(exe), '--help'], 5):.3f} s, `lora-migrate conventions` "
          f"{wall([str(exe), 'conventions'], 5):.3f} s (target < 0.3 s)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        floor = median("baseline", 3, tmp, tmp / "x")
        print(f"`import torch` alone: {floor['seconds']:.2f} s, peak RSS {floor['peak_rss_mb']:.0f} MB")
        print("(a) API: lora_migrate.convert() in a child, clock from before `import torch` to the end of the "
              "script (no interpreter teardown), vs the copy script's own clock alike; CPU likewise\n"
              "(a) CLI: `lora-migrate convert` as a user runs it, wall from spawn to exit, vs the copy script's "
              "whole process alike (with its teardown); CPU from wait4")
        print(f"{'layers':>6} {'MB':>6} {'out':>8} {'copy':>6} {'+fsync':>6} {'API s':>6} {'(a) API':>8} {'+fsync':>7} "
              f"{'cpu':>6} {'copy w':>6} {'CLI w':>6} {'(a) CLI':>8} {'cpu':>6} {'(c) chk':>7} {'(b) RSS':>7} "
              f"{'CLI RSS':>7} {'copy RSS':>8}")
        for layers in (int(x) for x in args.layers.split(",")):
            src = tmp / f"l{layers}"
            in_child("--make-adapter", src, layers, args.rank)
            size = (src / "adapter.safetensors").stat().st_size
            print(f"       load average {os.getloadavg()[0]:.1f}")
            jobs = {"copy": ("copy", src, tmp / "copy.safetensors"),
                    "copy_fsync": ("copy_fsync", src, tmp / "copy.safetensors"),
                    "bin": ("convert", src, tmp / "out"), "st": ("convert_st", src, tmp / "out"),
                    "bin cli": ("cli", src, tmp / "out"), "st cli": ("cli_st", src, tmp / "out")}
            if args.also:  # the same conversions by another checkout (e.g. before a change)
                jobs.update({"bin also": ("convert", src, tmp / "out", args.also),
                             "st also": ("convert_st", src, tmp / "out", args.also),
                             "bin also cli": ("cli", src, tmp / "out", args.also),
                             "st also cli": ("cli_st", src, tmp / "out", args.also)})
            got = interleaved(jobs, args.repeat)
            copy, copy_fsync = got["copy"], got["copy_fsync"]
            for out in [k for k in jobs if k.startswith(("bin", "st")) and not k.endswith("cli")]:
                conv, cli = got[out], got[out + " cli"]
                print(f"{layers:>6} {size / 1e6:>6.0f} {out:>8} {copy['seconds']:>6.2f} {copy_fsync['seconds']:>6.2f} "
                      f"{conv['seconds']:>6.2f} {conv['seconds'] / copy['seconds']:>7.2f}× "
                      f"{conv['seconds'] / copy_fsync['seconds']:>6.2f}× {conv['cpu'] / copy['cpu']:>5.2f}× "
                      f"{copy['wall']:>6.2f} {cli['wall']:>6.2f} {cli['wall'] / copy['wall']:>7.2f}× "
                      f"{cli['cpu_all'] / copy['cpu_all']:>5.2f}× "
                      f"{conv['check_seconds'] / conv['convert_seconds']:>7.0%} "
                      f"{conv['peak_rss_mb'] - floor['peak_rss_mb']:>6.0f}M "
                      f"{cli['rss_all'] - floor['peak_rss_mb']:>6.0f}M "
                      f"{copy['peak_rss_mb'] - floor['peak_rss_mb']:>7.0f}M")
                print(f"{'':>22} API {' '.join(f'{w:.2f}' for w in conv['walls'])}; CLI "
                      f"{' '.join(f'{w:.2f}' for w in cli['walls'])}; copy {' '.join(f'{w:.2f}' for w in copy['walls'])} "
                      f"(whole process {' '.join(f'{w:.2f}' for w in copy['walls_all'])})")
            print(f"       check: {got['st']['summary']}; load average {os.getloadavg()[0]:.1f}")
            shutil.rmtree(src)
        print("(e) batch: see bench/bench_batch.py")
        if not args.skip_users:
            users_today(tmp, args.repeat)


if __name__ == "__main__":
    main()
