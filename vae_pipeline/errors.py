"""The pipeline's errors: one base, two kinds, one rule for the CLI and the flows.

- `UserError`: bad input, or a state that a person must fix (a params value, a missing file,
  a damaged checkpoint, a refused source, a model that cannot be registered). Retrying would
  fail the same way, so the flows never retry it; the CLI prints its message in one line.
- `TransientError`: a service or resource that may come back (an unreachable tracking server
  or data source, a DVC push that failed). The flows retry it with backoff; the CLI prints its
  message in one line.

Anything else is a bug (or a library's own failure): the CLI shows its traceback, and the
flows treat it as they treat any unknown failure of a step that touches the network (retried;
steps that do not touch the network are never retried). Every message says what is wrong and
what to do, naming the input.
"""

from __future__ import annotations

__all__ = ["PipelineError", "TransientError", "UserError", "is_permanent", "is_reported"]


class PipelineError(Exception):
    """An error of the pipeline's own, whose message already says what is wrong."""


class UserError(PipelineError, ValueError):
    """Bad input or a state a person must fix: never retried, printed in one line. Also a
    ValueError (a value that cannot be used), as Python's own bad-input errors are."""


class TransientError(PipelineError):
    """A service or resource that may come back: retried by the flows."""


def is_permanent(exc: BaseException) -> bool:
    """The flows' retry rule: a `UserError` is never retried, unless it is transient too (a
    data source that did not answer is both a data error and worth another try)."""
    return isinstance(exc, UserError) and not isinstance(exc, TransientError)


def is_reported(exc: BaseException) -> bool:
    """The CLI's rule: the pipeline's own errors are one line; anything else is a traceback."""
    return isinstance(exc, PipelineError)
