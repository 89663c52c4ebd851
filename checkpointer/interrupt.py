"""^C and SIGTERM, remembered as well as raised.

Python drops an exception raised inside a finalizer or a weakref callback
("Exception ignored in ..."), so a KeyboardInterrupt can be lost when the
signal lands there. A converge that lost one went on to its final dump, which
kills the target: the opposite of what ^C asked for. The signal handlers record
the request here too, and long-running loops call `check` between steps.
"""

from __future__ import annotations

_pending: type[BaseException] | None = None


def request(exc_type: type[BaseException]) -> None:
    """A signal handler's: remember that exc_type is to end the command."""
    global _pending
    _pending = exc_type


def check() -> None:
    """Raise the requested interruption, if one came (lost or not)."""
    if _pending is not None:
        raise _pending()


def clear() -> None:
    global _pending
    _pending = None
