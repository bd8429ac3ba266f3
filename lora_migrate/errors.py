"""The kinds of failure the tool reports, and their exit codes (the CLI maps them in one place):

- 0: done;
- 1: the numeric check failed (:class:`VerificationFailed`), nothing is written;
- 2: bad input or usage (:class:`LoraMigrateError` and its kinds), one line, nothing is written;
- 3: an internal error (any other exception: a bug), one line that says how to get the details, nothing written.
"""

from __future__ import annotations

import os
import re

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class LoraMigrateError(Exception):
    """Bad input or usage: a one-line, user-facing reason. Exit code 2.

    ``path``: the file or folder the error is about. When not given it is the message's leading ``PATH: `` if
    that names something on disk (most messages start that way)."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad-input"

    def __init__(self, message: str = "", *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self._path = None if path is None else str(path)

    @property
    def path(self) -> str | None:
        if self._path is not None:
            return self._path
        m = re.match(r"([^:\s][^:]*?): ", str(self))
        return m.group(1) if m and os.path.lexists(m.group(1)) else None


class UnsupportedFeature(LoraMigrateError):
    """The source uses something the target cannot express exactly; refused, never dropped."""

    kind = "unsupported"


class DetectionError(LoraMigrateError):
    """No convention, or more than one, claims the input."""

    kind = "detection"


class HubError(LoraMigrateError):
    """The Hub refused or failed a download or an upload (a server's answer, not a bug here). Exit code 2."""

    kind = "hub"


class VerificationFailed(Exception):
    """The numeric check found the output's ΔW differs from the source's. Exit code 1."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check-failed"

    def __init__(self, message: str, report=None, tail: str = "nothing was written"):
        super().__init__(message)
        self.report = report
        self.tail = tail  # the CLI's last line: what was (not) done because of it
