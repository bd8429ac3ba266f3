#!/usr/bin/env python3
"""Why lora-migrate streams ``.bin`` files with its own writer instead of a public torch path (issue 13, item 5).

Writes the same state dict of N MB (fp32 tensors of a 70B-like adapter's shapes) three ways, each in a fresh
process, and prints wall time, peak anonymous memory above the process's start, and whether the result is a
valid zip (``zipfile.testzip``: every record's CRC-32 matches) that ``torch.load(weights_only=True)`` reads back
equal:

  stream      lora_migrate.io.BinWriter: plan, header, then one tensor at a time (the tensors come from a
              generator, as a conversion produces them)
  torch.save  the public API: the whole dict must be in memory first
  skip_data   the public ``torch.serialization.skip_data()`` skeleton (lazy, untouched ``torch.empty``
              storages), then ``torch.load(mmap=True)`` with MAP_SHARED and each tensor copied in

Usage: python bench/bench_bin_public.py [MB] (default 512). Ratios are against ``stream`` in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, mmap, os, sys, time, zipfile
import torch
MB, how, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

def shapes():
    n, out = 0, []
    i = 0
    while n < MB * 2**20:
        for name, shape in ((f"l{i}.q.lora_A", (64, 8192)), (f"l{i}.q.lora_B", (8192, 64)),
                            (f"l{i}.v.lora_A", (64, 8192)), (f"l{i}.v.lora_B", (1024, 64))):
            out.append((name, shape)); n += 4 * shape[0] * shape[1]
        i += 1
    return out

def tensor(i, shape):
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g)

plan = shapes()
base = anon_kb(); peak = base
t0 = time.perf_counter()
if how == "stream":
    from lora_migrate.io import BinWriter
    w = BinWriter(path)
    for name, shape in plan:
        w.add(name, torch.float32, shape)
    w.write_header()
    for i, (name, shape) in enumerate(plan):
        w.write(name, tensor(i, shape)); peak = max(peak, anon_kb())
    w.close()
elif how == "torch.save":
    sd = {name: tensor(i, shape) for i, (name, shape) in enumerate(plan)}
    peak = max(peak, anon_kb())
    torch.save(sd, path)
    del sd
else:
    from torch.serialization import skip_data
    with skip_data():
        torch.save({name: torch.empty(shape) for name, shape in plan}, path)
    old = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        m = torch.load(path, mmap=True, weights_only=True)
        for i, (name, shape) in enumerate(plan):
            m[name].copy_(tensor(i, shape)); peak = max(peak, anon_kb())
        del m
    finally:
        torch.serialization.set_default_mmap_options(old)
seconds = time.perf_counter() - t0
bad = zipfile.ZipFile(path).testzip()
back = torch.load(path, weights_only=True, mmap=True)
equal = all(torch.equal(back[name], tensor(i, shape)) for i, (name, shape) in enumerate(plan))
print(json.dumps({"seconds": seconds, "peak_anon_mb": (peak - base) / 1024, "bytes": os.path.getsize(path),
                  "zip_ok": bad is None, "first_bad_record": bad, "loads_equal": equal}))
"""


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for how in ("stream", "torch.save", "skip_data"):
            path = os.path.join(d, f"{how.replace('.', '_')}.bin")
            p = subprocess.run([sys.executable, "-c", CHILD, str(mb), how, path], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{how} failed: {p.stderr}")
            rows[how] = json.loads(p.stdout.strip().splitlines()[-1])
            os.unlink(path)
    ref = rows["stream"]
    print(f"{mb} MB of fp32 LoRA factors, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'writer':12} {'seconds':>8} {'×stream':>8} {'peak anon MB':>13} {'valid zip':>10} {'loads equal':>12}")
    for how, r in rows.items():
        print(f"{how:12} {r['seconds']:8.2f} {r['seconds'] / ref['seconds']:8.2f} {r['peak_anon_mb']:13.0f} "
              f"{str(r['zip_ok']):>10} {str(r['loads_equal']):>12}"
              + (f"  (CRC-32 wrong from record {r['first_bad_record']})" if not r["zip_ok"] else ""))


if __name__ == "__main__":
    main()
