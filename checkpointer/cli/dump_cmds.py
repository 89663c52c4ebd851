"""dump, pre-dump, converge, check, untrack: parsing and printing only."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from checkpointer.cli import main
from checkpointer.cli.common import CheckedCommand, rows_under, setup_logging
from checkpointer.freezer import Thaw
from checkpointer.trackers import CHOICES

pid_option = click.option(
    "-t", "--tree", "pid", type=int, required=True, help="PID of the root of the process tree."
)
dir_option = click.option(
    "-D",
    "--images-dir",
    "images_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory to write the images into (created 0700).",
)
tracker_option = click.option(
    "--tracker",
    type=click.Choice(CHOICES),
    default="auto",
    show_default=True,
    help="Dirty-page tracker; auto picks soft-dirty, else uffd-wp, else full.",
)
verbose_option = click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
level_option = click.option(
    "--compress-level",
    type=click.IntRange(-131072, 22),
    default=None,
    help="zstd level of page data [default: -50 for a frozen dump, -500 for one with a "
    "parent (few pages, copied frozen), -1 for a pre-dump].",
)
log_option = click.option("-o", "--log-file", type=click.Path(), help="Write the log here.")
tcp_option = click.option(
    "--tcp-established",
    is_flag=True,
    help="Dump established TCP connections (repair mode; locked by an iptables rule "
    "until the restore).",
)
page_server_option = click.option(
    "--page-server",
    metavar="ADDRESS:PORT",
    help="Also send the committed dump to `checkpointer page-server` there (plain TCP, "
    "unauthenticated; same name, same parent link).",
)


@contextlib.contextmanager
def page_server_session(page_server: str | None):
    """The session with --page-server's server (None without it), opened before the
    dump and closed after it."""
    if not page_server:
        yield None
        return
    from checkpointer.transport import connect_page_server

    dest = connect_page_server(page_server)
    try:
        yield dest
    finally:
        dest.close()


def send_to_page_server(dest, res, page_server: str | None, as_json: bool) -> None:
    if dest is not None:
        from checkpointer.transport import push_dump

        answer = push_dump(dest, str(res.path))
        if not as_json:
            click.echo(f"sent to {page_server}: {answer['path']}")


snapshot_option = click.option(
    "--no-snapshot",
    "no_snapshot",
    is_flag=True,
    help="With --leave-running: copy pages with the tree frozen, not from a copy-on-write "
    "child of each process (the default: the tree is thawed once the children exist).",
)


def leave_options(fn):
    fn = click.option(
        "--leave-stopped",
        is_flag=True,
        help="Leave every task stopped (SIGSTOP); `kill -CONT` resumes it.",
    )(fn)
    fn = click.option("--leave-running", is_flag=True, help="Let the tree run on after the dump.")(
        fn
    )
    return fn


def stop_rule_options(fn):
    """The pre-dump loop's stop rules (converge.py), for converge and migrate."""
    for option in reversed(
        [
            click.option("--max-iterations", default=8, show_default=True,
                         help="Pre-dumps at most."),
            click.option("--min-pages", default=64, show_default=True,
                         help="Stop when an iteration writes this many pages or fewer."),
            click.option("--max-grow", default=10.0, show_default=True,
                         help="Stop when an iteration writes this percent more than the last."),
            click.option("--max-downtime-ms", default=300.0, show_default=True,
                         help="Stop when the predicted final dump fits in this time."),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def thaw_mode(leave_running: bool, leave_stopped: bool) -> Thaw:
    if leave_running and leave_stopped:
        raise click.UsageError("--leave-running and --leave-stopped exclude each other")
    return Thaw.RUNNING if leave_running else Thaw.STOPPED if leave_stopped else Thaw.KILL


shell_job_option = click.option(
    "--shell-job",
    "-j",
    is_flag=True,
    help="The tree may use a terminal and session outside it (a job of a shell), as in "
    "CRIU; restore it with --shell-job.",
)


def print_dump_result(res, as_json: bool = False) -> None:
    s = res.stats
    if as_json:
        click.echo(
            json.dumps(
                {
                    "images_dir": str(res.path),
                    "tracker": res.tracker,
                    "incremental": res.incremental,
                    "full_pass_reason": res.full_pass_reason,
                    "stats": s,
                }
            )
        )
        return
    ratio = s["bytes_raw"] / s["bytes_compressed"] if s["bytes_compressed"] else 0
    click.echo(
        f"{res.path}: {len(res.pids)} process(es), tracker {res.tracker}"
        f"{' (incremental)' if res.incremental else ''}; "
        f"pages written {s['pages_written']}, from parent {s['pages_skipped_parent']}, "
        f"zero {s['pages_zero']}"
        + (f", as the parent process's {s['pages_same']}" if s.get("pages_same") else "")
        + f"; {s['bytes_compressed'] / 1e6:.1f} MB of pages on disk "
        f"(x{ratio:.1f}); frozen {s['frozen_time'] / 1000:.1f} ms"
    )


@main.command(cls=CheckedCommand)
@pid_option
@dir_option
@leave_options
@tracker_option
@click.option("--prev-images-dir", help="Parent dump, relative to the images dir (as in CRIU).")
@click.option(
    "--track-mem",
    is_flag=True,
    help="Read and reset dirty tracking, so later dumps can be incremental.",
)
@click.option(
    "--freeze-cgroup",
    type=click.Path(exists=True),
    help="Freeze this cgroup v2 (cgroup.freeze) first: for whole containers. A group "
    "frozen already stays frozen afterwards.",
)
@shell_job_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@tcp_option
@level_option
@page_server_option
@snapshot_option
@verbose_option
@log_option
def dump(
    pid,
    images_dir,
    leave_running,
    leave_stopped,
    tracker,
    prev_images_dir,
    track_mem,
    freeze_cgroup,
    shell_job,
    as_json,
    tcp_established,
    compress_level,
    page_server,
    no_snapshot,
    verbose,
    log_file,
):
    """Checkpoint the process tree rooted at PID into IMAGES_DIR.

    Every thread of every descendant is frozen with PTRACE_SEIZE/INTERRUPT for the
    whole dump. Afterwards the tree is KILLED, as in CRIU, unless --leave-running
    or --leave-stopped is given.
    """
    from checkpointer.dump import DumpRequest
    from checkpointer.dump import dump as do_dump

    setup_logging(verbose, log_file)
    req = DumpRequest(
        pid=pid,
        images_dir=images_dir,
        prev_images_dir=prev_images_dir,
        tracker=tracker,
        track_mem=track_mem,
        thaw=thaw_mode(leave_running, leave_stopped),
        cgroup=freeze_cgroup,
        compress_level=compress_level,
        shell_job=shell_job,
        tcp_established=tcp_established,
        snapshot=not no_snapshot,
    )
    with page_server_session(page_server) as dest:
        res = do_dump(req)
        print_dump_result(res, as_json)
        send_to_page_server(dest, res, page_server, as_json)


@main.command("pre-dump", cls=CheckedCommand)
@pid_option
@dir_option
@tracker_option
@click.option("--prev-images-dir", help="Parent dump, relative to the images dir (as in CRIU).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@level_option
@page_server_option
@verbose_option
@log_option
def pre_dump_cmd(
    pid, images_dir, tracker, prev_images_dir, as_json, compress_level, page_server, verbose,
    log_file,
):  # fmt: skip
    """Copy the memory of a running tree, leaving it running.

    Without a parent: every present page, and tracking is reset. With
    --prev-images-dir: only pages written since the parent; the rest is recorded as
    held by the parent. full needs no freeze at all; uffd-wp stops a process only
    to register memory it mapped since the last pass; soft-dirty freezes only to
    read and reset the dirty bits.
    """
    from checkpointer.dump import DumpRequest, pre_dump

    setup_logging(verbose, log_file)
    req = DumpRequest(
        pid=pid,
        images_dir=images_dir,
        prev_images_dir=prev_images_dir,
        tracker=tracker,
        compress_level=compress_level,
    )
    with page_server_session(page_server) as dest:
        res = pre_dump(req)
        print_dump_result(res, as_json)
        send_to_page_server(dest, res, page_server, as_json)


@main.command(cls=CheckedCommand)
@pid_option
@dir_option
@tracker_option
@stop_rule_options
@click.option("--interval-ms", default=0.0, show_default=True, help="Pause between pre-dumps.")
@leave_options
@shell_job_option
@click.option("--json", "as_json", is_flag=True, help="Print the iterations and summary as JSON.")
@tcp_option
@verbose_option
@log_option
def converge(
    pid,
    images_dir,
    tracker,
    max_iterations,
    min_pages,
    max_grow,
    max_downtime_ms,
    interval_ms,
    leave_running,
    leave_stopped,
    shell_job,
    as_json,
    tcp_established,
    verbose,
    log_file,
):
    """Pre-dump until little is left, then one short frozen final dump.

    Writes IMAGES_DIR/pre-1, pre-2, ... each linked to the previous one, and the
    final checkpoint IMAGES_DIR/final on top. The tree is KILLED after the final dump
    unless --leave-running or --leave-stopped is given.
    """
    from checkpointer.converge import ConvergeOptions
    from checkpointer.converge import converge as do_converge

    setup_logging(verbose, log_file)
    opts = ConvergeOptions(
        pid=pid,
        images_dir=images_dir,
        tracker=tracker,
        max_iterations=max_iterations,
        min_pages=min_pages,
        max_grow=max_grow,
        max_downtime_ms=max_downtime_ms,
        interval_ms=interval_ms,
        thaw=thaw_mode(leave_running, leave_stopped),
        shell_job=shell_job,
        tcp_established=tcp_established,
    )
    header = (
        f"{'iter':>4} {'kind':<8} {'pages':>9} {'MB':>8} {'ms':>8} "
        f"{'frozen ms':>9} {'dirty pages/s':>13}"
    )
    result = do_converge(opts, None if as_json else rows_under(header, _iteration_row))
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    verdict = "converged" if result.converged else "did NOT converge"
    click.echo(
        f"{verdict} (stopped by rule {result.stop_rule}); tracker {result.tracker}\n"
        f"final checkpoint: {result.final_dir}\n"
        f"downtime (final dump frozen): {result.downtime_ms:.1f} ms\n"
        f"chain on disk: {result.chain_bytes / 1e6:.1f} MB, "
        f"compression x{result.compression_ratio:.1f}"
    )


def _iteration_row(it) -> str:
    return (
        f"{it.number:>4} {it.kind:<8} {it.pages_written:>9} "
        f"{it.bytes_written / 1e6:>8.1f} {it.duration_ms:>8.1f} {it.frozen_ms:>9.2f} "
        f"{it.dirty_rate_pages_s:>13.0f}"
    )


@main.command(cls=CheckedCommand)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(as_json):
    """Report what this kernel offers for incremental checkpoints, like `criu check`.

    Exit status 0 when incremental tracking (soft-dirty or uffd-wp) is available.
    """
    from checkpointer.check import check_kernel

    report = check_kernel()
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"kernel {report['kernel']}")
        for f in report["features"]:
            click.echo(f"  {f['name']:<24} {'yes' if f['ok'] else 'no ':<4} {f['detail']}")
        click.echo(f"auto tracker: {report['auto_tracker']} ({report['auto_reason']})")
    sys.exit(0 if report["incremental"] else 1)


@main.command(cls=CheckedCommand)
@pid_option
@verbose_option
def untrack(pid, verbose):
    """Remove dirty tracking from PID and leave it as found."""
    from checkpointer.untrack import untrack as do_untrack

    setup_logging(verbose, None)
    click.echo(do_untrack(pid))
