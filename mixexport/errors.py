"""Errors a user can act on.

Every subclass of :class:`MixexportError` is printed by the CLI as ``error: …`` and ``hint: …``
lines with no traceback, and exits with the class's ``exit_code``:

* 1 — a check failed (parity gate, integrity, latency gate, a pass's own postcondition)
* 2 — usage or bad input (checkpoint, options, a pass that does not apply)
* 3 — environment unavailable (no TensorRT, no GPU, missing optional package or data)

Any other exception is a bug in mixexport: the CLI prints its traceback and asks for a report
(exit 4). :class:`PassError` is such a bug, raised inside a pass; it names the pass and the passes
that ran before it.
"""

from __future__ import annotations


class MixexportError(Exception):
    """Base class: a message saying what was expected and what was found, and a hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"


class BadInputError(MixexportError):
    """The user's input (checkpoint, bundle, option, request) is not what mixexport expects."""

    exit_code = 2


class PreconditionError(BadInputError):
    """A pass does not apply to this model; the message names what was expected and found."""


class GateFailedError(MixexportError):
    """A verification gate (parity, integrity) failed."""

    exit_code = 1


class PostconditionError(MixexportError):
    """A pass ran, but its result failed the pass's own check (``ensures``): e.g. the segments a
    request-level pass cut do not reproduce the program it was given. A check failed (exit 1),
    not bad input: the model is fine, the pass's result is not."""

    exit_code = 1


class PassError(RuntimeError):
    """An unexpected exception inside a pass (a bug, exit 4 with the traceback), naming the pass and
    the passes that ran before it. The original exception is its ``__cause__``."""

    def __init__(self, pass_name: str, before: list[str] | tuple[str, ...], problem: str) -> None:
        after = f"after {', '.join(before)}" if before else "the first pass of this build"
        super().__init__(f"pass {pass_name} failed ({after}): {problem}")
        self.pass_name = pass_name
        self.before = tuple(before)


class IntegrityError(GateFailedError):
    """A bundle broke its trust boundary: a path leaving the bundle, a file that does not match its
    sha256 in the manifest (or has none), a manifest that does not match its pinned sha256."""


class EnvironmentUnavailableError(MixexportError):
    """A backend, device, optional package or dataset is not available here."""

    exit_code = 3


class StoreUnavailableError(EnvironmentUnavailableError):
    """A table store (a Redis Cluster node) refused the connection, is down, answered with an error
    it cannot recover from (e.g. out of memory), or did not answer within the request's deadline.
    Nothing was scored, nothing was flipped."""


class StoreTimeoutError(StoreUnavailableError):
    """A table-store request ran past its deadline (a node hung, or failing over)."""


class TablesVersionError(IntegrityError):
    """The table store's current ``tables_version`` is not the one the bundle's segments were
    built with, or the version's rows are gone: refusing to score with other tables."""
