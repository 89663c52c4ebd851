"""The `checkpointer` command and `python -m checkpointer`."""

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Nothing is touched before a command runs (each command installs its own
    # handlers, which undo what it did): a ^C while modules load or arguments are
    # parsed ends it at once, in one line, instead of a traceback or "Aborted!".
    sys.stderr.write("checkpointer: interrupted before it started; nothing was done\n")
    os._exit(1)


def run() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from checkpointer.cli import common, main

    common.end_process_with_command()
    main()


if __name__ == "__main__":
    run()
