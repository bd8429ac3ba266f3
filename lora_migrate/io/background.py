"""A planned writer whose tensor writes run on one worker thread, so that the bytes of one module go to the file
while the next module is read, rewritten and checked.

The write calls of both writers release the GIL (Python's file ``write``, torch's ``write_record``), so the
thread overlaps real work; a bounded queue keeps at most ``depth`` tensors waiting, so memory stays about a
module. The wrapped writer sees exactly the same calls in the same order. An error in the thread (a full disk,
a tensor off the plan) is raised by the next ``write`` or by ``close``, and the partial file is deleted as
before.
"""

from __future__ import annotations

import queue
import threading

from lora_migrate.io._common import ClosesOrAborts

_STOP = object()


class BackgroundWriter(ClosesOrAborts):
    """``add`` / ``write_header`` / ``write`` / ``close`` / ``abort`` of ``writer``, with ``write`` on a thread."""

    def __init__(self, writer, depth: int = 4):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandoned = False  # set by abort(): queued tensors are dropped, not written
        self._thread: threading.Thread | None = None

    def add(self, name, dtype, shape) -> None:
        self.writer.add(name, dtype, shape)

    def write_header(self) -> None:
        self.writer.write_header()
        self._thread = threading.Thread(target=self._run, name="lora-migrate-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is None and not self._abandoned:  # after an error or abort, only drain the queue
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
                    self._error = exc
            del item

    def write(self, name: str, tensor) -> None:
        """Queue the next planned tensor (waits while ``depth`` are queued); raises an earlier write's error."""
        self._raise()
        if self._thread is None:
            self.writer.write(name, tensor)  # before write_header: let the writer refuse it as it does
            return
        self._queue.put((name, tensor))

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            self._stop()  # the thread only drains the queue once it has failed
            exc, self._error = self._error, None
            self.writer.abort()
            raise exc

    def close(self) -> None:
        """Wait for the queued writes, then close the writer (raising any error of theirs)."""
        self._stop()
        self._raise()
        self.writer.close()

    def abort(self) -> None:
        self._abandoned = True
        self._stop()
        self._error = None
        self.writer.abort()

    @property
    def streaming(self):
        return getattr(self.writer, "streaming", None)
