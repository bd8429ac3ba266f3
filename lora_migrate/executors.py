"""Where the batch runner's items run. An executor takes a top-level function and a list of argument tuples and
yields ``(index, result)`` pairs as they finish, in any order. The function never raises for a bad item (it
returns a failed record); an executor reports a worker that died with :class:`WorkerLost` as the result instead.

- :class:`InlineExecutor`: in this process, one after the other (``-j 1``).
- :class:`ProcessExecutor`: a local pool of ``spawn``-ed processes (``-j N``).
- :class:`RayExecutor`: tasks on a Ray cluster (``--executor ray --address ...``; ``pip install lora-migrate[ray]``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from .errors import LoraMigrateError


class WorkerLost:
    """The result of an item whose worker died (killed, out of memory, a crash in native code)."""

    def __init__(self, reason: str):
        self.reason = reason


class Executor(Protocol):
    name: str
    workers: int

    def map_unordered(self, fn: Callable, args: list[tuple]) -> Iterator[tuple[int, object]]: ...

    def close(self) -> None: ...


class InlineExecutor:
    name = "inline"
    workers = 1

    def map_unordered(self, fn, args):
        for i, a in enumerate(args):
            yield i, fn(*a)

    def close(self) -> None:
        pass


def _init_worker(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


class ProcessExecutor:
    """``workers`` processes; a worker that dies fails only the items it was running: the others are resubmitted
    to a fresh pool (once each)."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads,))

    def map_unordered(self, fn, args):
        todo = list(range(len(args)))
        retried: set[int] = set()
        while todo:
            pool = self._pool()
            try:
                futs = {pool.submit(fn, *args[i]): i for i in todo}
                todo = []
                pending = set(futs)
                broken = False
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = futs[f]
                        try:
                            yield i, f.result()
                        except BrokenProcessPool:
                            broken = True
                            if i in retried:
                                yield i, WorkerLost("its worker process died (killed or crashed) twice")
                            else:
                                retried.add(i)
                                todo.append(i)
                        except Exception as e:  # noqa: BLE001 - pickling problems and the like: fail the item
                            yield i, WorkerLost(f"{type(e).__name__}: {e}")
                if broken:
                    todo.sort()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        pass


class RayExecutor:
    """The same per-item function as Ray tasks. ``address=None`` starts a local Ray instance (``workers`` CPUs);
    ``"auto"`` joins the cluster of this node; ``"ray://head:10001"`` connects a Ray client to a remote cluster.
    Every node needs lora-migrate installed and must see the sources and the output folder (a shared filesystem),
    or use ``hf://`` sources."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 1):
        try:
            import ray
        except ImportError:
            raise LoraMigrateError("--executor ray needs Ray: pip install -c constraints.txt 'lora-migrate[ray]'") \
                from None
        import logging

        self.ray = ray
        self.workers = workers
        self._started = False
        if not ray.is_initialized():
            kw = {"num_cpus": workers} if address in (None, "local") else {}
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, logging_level=logging.WARNING, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LoraMigrateError(f"cannot start or reach Ray at {address or 'a new local instance'}: "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._started = True

    def map_unordered(self, fn, args):
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=1)(fn)
        refs = {remote.remote(*a): i for i, a in enumerate(args)}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                try:
                    yield i, ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker / node: fail the item, keep going
                    yield i, WorkerLost(f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(kind: str, workers: int, address: str | None = None) -> Executor:
    if workers < 1:
        raise LoraMigrateError(f"-j {workers}: need at least one worker")
    if kind == "ray":
        return RayExecutor(address, workers)
    if address:
        raise LoraMigrateError("--address is for --executor ray")
    if kind != "local":
        raise LoraMigrateError(f"unknown executor {kind!r} (local or ray)")
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)
