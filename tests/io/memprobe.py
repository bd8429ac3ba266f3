"""Peak-memory probes for tests that run a script in a fresh interpreter (Linux /proc only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (where the kernel allows) and return that RSS; if it cannot be reset,
    growth measured from here is over-, never under-estimated."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status("VmRSS")


def run_script(script: str, *args: str, timeout: int = 180) -> list[str]:
    """Run ``script`` in a fresh interpreter and return its stdout lines.

    A fixed glibc mmap threshold makes every large tensor its own mapping, unmapped when freed, so RSS is the
    memory actually alive; with glibc's dynamic threshold freed tensors may stay in a fragmented heap and even a
    loop that only creates and drops tensors peaks anywhere up to their total — noise about the allocator.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()
