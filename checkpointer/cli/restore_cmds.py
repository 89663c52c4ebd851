"""restore, unlock: parsing and printing only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from checkpointer.cli import main
from checkpointer.cli.common import CheckedCommand, Terminated, setup_logging


@main.command(cls=CheckedCommand)
@click.option(
    "-D",
    "--images-dir",
    "images_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The final dump to restore (its parent chain is followed).",
)
@click.option(
    "-d",
    "--restore-detached",
    "detached",
    is_flag=True,
    help="Exit once the tree runs, instead of waiting for the root task.",
)
@click.option(
    "--leave-stopped", is_flag=True, help="Leave every task stopped; `kill -CONT` resumes it."
)
@click.option("--pidfile", type=click.Path(path_type=Path), help="Write the root task's PID here.")
@click.option(
    "--shell-job", is_flag=True, help="Give the dump's terminal fds this shell's terminal."
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Start before the dump: wait up to SECONDS for it to be complete and for its "
    "PIDs to be free, then restore at once. Meanwhile each pre-dump beside it (a "
    "converge chain) is rebuilt in a template, so the restore writes only the pages "
    "written since the last one.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
def restore(images_dir, detached, leave_stopped, pidfile, shell_job, wait_s, as_json, verbose):
    """Restore the process tree of a final dump, each process with its PID.

    Every process, thread, mapping, page, fd, signal handler and register comes
    back as dumped; the tree then runs (or stays stopped with --leave-stopped).
    Without -d, waits for the root task and exits with its status, as CRIU does.
    Needs root. Nothing is left behind if it fails.
    """
    from checkpointer.restore import RestoreRequest, wait_root
    from checkpointer.restore import restore as do_restore

    setup_logging(verbose, None)
    req = RestoreRequest(images_dir, detached, leave_stopped, shell_job, pidfile)
    if wait_s is None:
        res = do_restore(req)
    else:
        from checkpointer.restore.standby import wait_and_restore

        res = wait_and_restore(req, wait_s)
    try:
        if as_json:
            click.echo(json.dumps({"root_pid": res.root_pid, "pids": res.pids,
                                   "restore_ms": res.restore_ms,
                                   "bytes_written": res.bytes_written}))  # fmt: skip
        else:
            click.echo(
                f"restored {len(res.pids)} process(es), root {res.root_pid}, "
                f"in {res.restore_ms:.1f} ms" + ("; stopped" if leave_stopped else "")
            )
        status = None if detached else wait_root(res.root_pid, res.job_group)
    except (KeyboardInterrupt, Terminated):  # the restore is done: the tree runs on
        click.echo(f"checkpointer: interrupted; process {res.root_pid} runs on", err=True)
        raise SystemExit(1) from None
    if status is not None:
        raise SystemExit(status)


@main.command(cls=CheckedCommand)
@click.option(
    "-D",
    "--images-dir",
    "images_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="A dump taken with --tcp-established.",
)
@click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
def unlock(images_dir, verbose):
    """Lift the TCP locks of a dump that will not be restored.

    A dump with --tcp-established that killed its tree leaves a netfilter rule per
    connection (chain CHECKPOINTER) so that the peers see no reset until the
    restore, which lifts them. If the images will never be restored, this lifts
    them: otherwise a later connection between the same two ports would have its
    segments dropped.
    """
    from checkpointer.fdstate.tree import lift_locks
    from checkpointer.images import Dump

    setup_logging(verbose, None)
    with Dump.open(str(images_dir)) as dump:
        count = lift_locks({pid: dump.fds(pid) for pid in dump.pids})
    click.echo(f"lifted the locks of {count} connection(s)")
