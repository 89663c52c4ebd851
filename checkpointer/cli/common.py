"""What every command shares: one-line errors and exit status 1, logging."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from checkpointer import interrupt
from checkpointer.errors import CheckpointError


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every `finally` (thaw!) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    interrupt.on_signal(Terminated)


def _on_sigint(signum: int, frame: Any) -> None:
    interrupt.on_signal(KeyboardInterrupt)


def _unraisable(info: Any) -> None:
    """An interruption Python had to drop (raised in a finalizer) is not printed
    as a traceback: it is remembered (interrupt.py) and ends the command later."""
    if not isinstance(info.exc_value, (KeyboardInterrupt, Terminated)):
        sys.__unraisablehook__(info)


def error_line(exc: BaseException) -> str:
    """The one line printed for an expected failure (a line break in a path it
    names is written as \\n: one line still)."""
    return _describe(exc).replace("\n", "\\n")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CheckpointError):
        return f"checkpointer: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "checkpointer: interrupted; nothing was left stopped or half-written"
    if isinstance(exc, Terminated):
        return "checkpointer: terminated; nothing was left stopped or half-written"
    assert isinstance(exc, OSError)
    what = exc.strerror or str(exc)
    return f"checkpointer: {exc.filename}: {what}" if exc.filename else f"checkpointer: {what}"


class CheckedCommand(click.Command):
    """A command whose expected failures (bad input, a target that cannot be
    traced, a corrupt image, a full disk, ^C, SIGTERM, SIGHUP) print one line on stderr
    and exit 1, never a traceback. Use as `@main.command(cls=CheckedCommand)`."""

    def invoke(self, ctx: click.Context) -> Any:
        old = _take_handlers()
        old_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
        interrupt.clear()
        status: int | None = None  # once known, a late ^C does not change it
        try:
            try:
                result = super().invoke(ctx)
                status = 0
                return result
            except (CheckpointError, OSError, KeyboardInterrupt, Terminated) as exc:
                _tell(exc)
                status = 1
                raise SystemExit(1) from None
            finally:
                _put_back_handlers(old)
                sys.unraisablehook = old_hook
        except (KeyboardInterrupt, Terminated) as exc:
            # A signal that landed while the outcome was told or the handlers put
            # back (not through click, which would print "Aborted!").
            _put_back_handlers(old)
            sys.unraisablehook = old_hook
            if status is None:
                click.echo(error_line(exc), err=True)
            raise SystemExit(1 if status is None else status) from None


def _tell(exc: BaseException) -> None:
    try:
        sys.stdout.flush()
    except OSError:
        pass
    # An error that an interruption caused (a syscall cut short) is told as the
    # interruption: that is what ended the command.
    requested = interrupt.pending()
    told = getattr(exc, "tells_interruption", False)
    if requested is not None and not isinstance(exc, requested) and not told:
        exc = requested()
    click.echo(error_line(exc), err=True)


_process_ends_with_command = False


def end_process_with_command() -> None:
    """The `checkpointer` command's: this process ends with the command, so once it
    is over a ^C or SIGTERM is ignored rather than given back to the handlers from
    before it (the start-up one would say nothing was done)."""
    global _process_ends_with_command
    _process_ends_with_command = True


def _take_handlers() -> dict[int, Any]:
    """Our handlers for ^C and SIGTERM, and for SIGHUP (a terminal or ssh session
    closed), taken as SIGTERM unless ignored already (nohup); the old ones."""
    old = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
        signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint),
    }
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, _on_sigterm)
    return old


def _put_back_handlers(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, signal.SIG_IGN if _process_ends_with_command else handler)


def setup_logging(verbose: int, logfile: str | None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("checkpointer: %(message)s"))
    root = logging.getLogger("checkpointer")
    root.handlers[:] = [handler]
    root.setLevel(level)


def rows_under(header: str, row: Callable[[Any], str]) -> Callable[[Any], None]:
    """A printer of table rows (`row(item)`) that prints the header above the
    first: a command that fails before its first row prints only its error."""
    pending = [header]

    def echo(item: Any) -> None:
        if pending:
            click.echo(pending.pop())
        click.echo(row(item))

    return echo
