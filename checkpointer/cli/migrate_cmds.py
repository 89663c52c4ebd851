"""migrate, receive, page-server: parsing and printing only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from checkpointer.cli import main
from checkpointer.cli.common import CheckedCommand, rows_under, setup_logging
from checkpointer.cli.dump_cmds import (
    pid_option,
    stop_rule_options,
    tcp_option,
    tracker_option,
    verbose_option,
)

received_dir_option = click.option(
    "-D",
    "--images-dir",
    "images_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory the received dumps are written into (created 0700).",
)


@main.command(cls=CheckedCommand)
@received_dir_option
@verbose_option
def receive(images_dir, verbose):
    """Receive an image stream on stdin, answering on stdout (run by `migrate` over ssh).

    Each dump is written into IMAGES_DIR atomically, once all of it arrived and every
    checksum matched. A session that fails or is cut removes what it wrote.
    """
    from checkpointer.receive import receive_stdio

    setup_logging(verbose, None)
    receive_stdio(str(images_dir))


@main.command("page-server", cls=CheckedCommand)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The page server is UNAUTHENTICATED: use it only "
    "inside a trusted network or a tunnel.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=0, help="Port [default: a free one, printed]."
)
@received_dir_option
@click.option("--once", is_flag=True, help="Serve one connection, then exit.")
@verbose_option
def page_server(address, port, images_dir, once, verbose):
    """Receive image streams over plain TCP (`--page-server` of pre-dump, dump, migrate).

    Like CRIU's page server it is unauthenticated and unencrypted. Connections are
    served one at a time; each dump is committed atomically into IMAGES_DIR.
    """
    from checkpointer.receive import serve_tcp

    setup_logging(max(verbose, 1), None)

    def listening(sockname):
        click.echo(f"listening on {sockname[0]}:{sockname[1]}", err=True)

    serve_tcp(address, port, str(images_dir), once=once, on_listening=listening)


@main.command(cls=CheckedCommand)
@pid_option
@click.option("--to", "to", metavar="[USER@]HOST", help="Destination, reached with ssh.")
@click.option(
    "--ssh-option",
    "ssh_options",
    multiple=True,
    metavar="OPT",
    help="Extra ssh argument (repeatable), e.g. --ssh-option=-p2222.",
)
@click.option(
    "--remote-command",
    default="checkpointer",
    show_default=True,
    help="How to run checkpointer on the destination (a shell command).",
)
@click.option("--remote-dir", help="Images directory at the destination.")
@click.option(
    "--page-server",
    metavar="ADDRESS:PORT",
    help="Send to `checkpointer page-server` over plain TCP instead of ssh (unauthenticated).",
)
@click.option(
    "-D",
    "--images-dir",
    "images_dir",
    type=click.Path(path_type=Path),
    help="Keep the local staging chain here [default: a temporary directory, removed].",
)
@click.option(
    "--same-pid-space",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Whether the destination shares our PID space (auto: same boot id and PID namespace).",
)
@click.option(
    "--leave-stopped",
    is_flag=True,
    help="Leave the restored tree stopped at the destination; `kill -CONT` resumes it.",
)
@click.option(
    "--prepare/--no-prepare",
    default=True,
    show_default=True,
    help="Rebuild each pre-dump's memory at the destination while the tree runs, so "
    "that the restore writes only the pages written since (--no-prepare: all of them, "
    "in the downtime).",
)
@tcp_option
@tracker_option
@stop_rule_options
@click.option("--json", "as_json", is_flag=True, help="Print the iterations and summary as JSON.")
@verbose_option
def migrate(
    pid,
    to,
    ssh_options,
    remote_command,
    remote_dir,
    page_server,
    images_dir,
    same_pid_space,
    leave_stopped,
    prepare,
    tcp_established,
    tracker,
    max_iterations,
    min_pages,
    max_grow,
    max_downtime_ms,
    as_json,
    verbose,
):
    """Move the live process tree rooted at PID to another host.

    Pre-dumps stream to the destination while the tree runs; when a stop rule
    holds, the final dump freezes it once, the destination restores it, and only
    when it runs there is the source killed. On any failure the source keeps running.
    """
    from checkpointer.migrate import MigrateOptions
    from checkpointer.migrate import migrate as do_migrate

    if bool(to) == bool(page_server):
        raise click.UsageError("give exactly one of --to and --page-server")
    setup_logging(verbose, None)
    opts = MigrateOptions(
        pid=pid,
        to=to,
        page_server=page_server,
        ssh_options=list(ssh_options),
        remote_command=remote_command,
        remote_dir=remote_dir,
        images_dir=images_dir,
        same_pid_space=same_pid_space,
        leave_stopped=leave_stopped,
        tcp_established=tcp_established,
        tracker=tracker,
        prepare=prepare,
        max_iterations=max_iterations,
        min_pages=min_pages,
        max_grow=max_grow,
        max_downtime_ms=max_downtime_ms,
    )
    header = (
        f"{'iter':>4} {'kind':<8} {'pages':>9} {'MB sent':>8} {'ms':>8} "
        f"{'MB/s':>8} {'frozen ms':>9} {'prepared ms':>11}"
    )
    res = do_migrate(opts, None if as_json else rows_under(header, _iteration_row))
    if as_json:
        click.echo(json.dumps(res.to_json()))
        return
    click.echo(
        f"migrated to {res.destination} ({res.remote_dir}): pid {res.root_pid}"
        f"{' (same PID space)' if res.same_pid_space else ''}\n"
        f"pre-dump loop stopped by rule {res.stop_rule}\n"
        f"frozen (final dump): {res.frozen_ms:.1f} ms\n"
        f"downtime (freeze to running at the destination): {res.downtime_ms:.1f} ms, "
        f"of which the restore {res.restore_ms:.1f} ms "
        f"(writing {res.restore_bytes_written / 1e6:.1f} MB of pages)\n"
        f"streamed {res.bytes_streamed / 1e6:.1f} MB"
    )


def _iteration_row(it) -> str:
    return (
        f"{it.number:>4} {it.kind:<8} {it.pages_written:>9} {it.bytes_streamed / 1e6:>8.1f} "
        f"{it.stream_ms:>8.1f} {it.rate_mb_s:>8.1f} {it.frozen_ms:>9.2f} "
        f"{f'{it.prepare_ms:.1f}' if it.prepare_ms else '-':>11}"
    )
