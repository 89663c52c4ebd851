"""What every command shares: one-line errors, exit status 1, logging."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from checkpointer.errors import CheckpointError


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every `finally` (thaw!) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def fail(message: str) -> None:
    click.echo(f"checkpointer: {message}", err=True)
    sys.exit(1)


def one_line_errors(fn: Callable) -> Callable:
    """Turn every expected failure into `checkpointer: WHERE: WHAT` and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except CheckpointError as err:
            fail(str(err))
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            fail(f"{where}{err.strerror or err}")
        except KeyboardInterrupt:
            fail("interrupted; the target was released")
        except Terminated:
            fail("terminated; the target was released")
        finally:
            signal.signal(signal.SIGTERM, old)

    return wrapper


def setup_logging(verbose: int, logfile: str | None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("checkpointer: %(message)s"))
    root = logging.getLogger("checkpointer")
    root.handlers[:] = [handler]
    root.setLevel(level)
