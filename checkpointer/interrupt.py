"""^C and SIGTERM, remembered as well as raised, and held off where a step must finish.

Python drops an exception raised inside a finalizer or a weakref callback
("Exception ignored in ..."), so a KeyboardInterrupt can be lost when the
signal lands there. A converge that lost one went on to its final dump, which
kills the target: the opposite of what ^C asked for. The signal handlers record
the request here too, and long-running loops call `check` between steps.

Some steps put something into the target that only their own end takes out again
(cowchild.py: a clone child and a code page). An interruption raised in their
middle would leave it there, so they run under `deferred()`: a signal meanwhile is
only recorded, and raised when the step is over.
"""

from __future__ import annotations

import sys

_pending: type[BaseException] | None = None
_depth = 0  # nesting of deferred() blocks
_held: type[BaseException] | None = None  # came while deferred, not raised yet


def request(exc_type: type[BaseException]) -> None:
    """A signal handler's: remember that exc_type is to end the command."""
    global _pending
    _pending = exc_type


def on_signal(exc_type: type[BaseException]) -> None:
    """A signal handler's: remember exc_type, and raise it unless deferred."""
    global _held
    request(exc_type)
    if _depth:
        _held = exc_type
        return
    raise exc_type()


def pending() -> type[BaseException] | None:
    """The interruption requested, if any (raised or not)."""
    return _pending


def check() -> None:
    """Raise the requested interruption, if one came (lost or not)."""
    if _pending is not None:
        raise _pending()


def clear() -> None:
    global _pending, _held
    _pending = _held = None


class deferred:
    """`with deferred():` an interruption arriving inside is raised at its end. Not
    there if an exception is being handled already (a clean-up after an error or an
    earlier ^C): that one ends the command, and the clean-up must go on."""

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, exc_type: object, *rest: object) -> None:
        global _depth, _held
        _depth -= 1
        if _depth or _held is None:
            return
        held, _held = _held, None
        if exc_type is None and sys.exc_info()[0] is None:
            raise held()
