"""The two kinds of failure the tool reports, and their exit codes.

Every error a user can cause is a :class:`LoraMigrateError` with a one-line message; the CLI maps it to exit
code 2 in one place. A conversion whose numeric check fails raises :class:`VerificationFailed` (exit code 1).
"""

from __future__ import annotations


class LoraMigrateError(Exception):
    """Bad input or usage: a one-line, user-facing reason. Exit code 2."""

    exit_code = 2


class UnsupportedFeature(LoraMigrateError):
    """The source uses something the target cannot express exactly; refused, never dropped."""


class DetectionError(LoraMigrateError):
    """No convention, or more than one, claims the input."""


class VerificationFailed(Exception):
    """The numeric check found the output's ΔW differs from the source's. Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report=None, tail: str = "nothing was written"):
        super().__init__(message)
        self.report = report
        self.tail = tail  # the CLI's last line: what was (not) done because of it
