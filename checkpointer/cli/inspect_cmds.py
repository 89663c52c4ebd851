"""show, decode, info, x, extract, verify: parse arguments, call images.inspect, print.

Errors follow the shared convention of cli/common.py (CheckedCommand).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import IO

import click

from checkpointer.cli import main
from checkpointer.cli.common import CheckedCommand
from checkpointer.images import inspect as api
from checkpointer.images import render


@contextlib.contextmanager
def _output_file(path: str, mode: str) -> Iterator[IO]:
    """Open path for writing, 0600 like the images whose memory and credentials
    it receives; on any failure remove it: no partial output."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, mode) as f:
            os.fchmod(fd, 0o600)  # an existing file too
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _print_json(data, pretty: bool = True, out=None) -> None:
    text = json.dumps(api.jsonable(data), indent=2 if pretty else None, sort_keys=False)
    click.echo(text, file=out)


@main.command(cls=CheckedCommand)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(path: str, as_json: bool) -> None:
    """Summarise a dump directory, or print the records of one image file."""
    if not os.path.isdir(path):
        head, items = api.decode_stream(path)  # streamed: a file may hold many records
        key = "frames" if head["kind"] == "pages" else "entries"
        stdout = click.get_text_stream("stdout")
        if as_json:
            api.write_json_stream(head, items, key, stdout, pretty=True)
        else:
            for line in render.show_file_lines(head, items):
                stdout.write(line + "\n")
        return
    data = api.show_dump(path)
    click.echo(json.dumps(data, indent=2) if as_json else render.show_dump(data))


@main.command(cls=CheckedCommand)
@click.argument("file", type=click.Path())
@click.option("--pretty", is_flag=True, help="Indent the JSON.")
@click.option("-o", "--output", "out", type=click.Path(), help="Write to OUT instead of stdout.")
def decode(file: str, pretty: bool, out: str | None) -> None:
    """Decode one image file to JSON (binary fields as base64; pages: frame index)."""
    head, items = api.decode_stream(file)
    key = "frames" if head["kind"] == "pages" else "entries"
    if out is None or out == "-":
        api.write_json_stream(head, items, key, click.get_text_stream("stdout"), pretty)
        return
    with _output_file(out, "w") as f:
        api.write_json_stream(head, items, key, f, pretty)


@main.command(cls=CheckedCommand)
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(file: str, as_json: bool) -> None:
    """Kind, format version and record count of one image file."""
    data = api.info(file)
    click.echo(json.dumps(data) if as_json else render.info(data))


@main.command(cls=CheckedCommand)
@click.argument("dir", type=click.Path())
@click.argument("view", type=click.Choice(api.X_VIEWS))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def x(dir: str, view: str, as_json: bool) -> None:
    """Tables over a dump: ps, mems, rss, fds, or stats of the whole chain."""
    data = api.x(dir, view)
    if as_json:
        _print_json(data)
    elif view == "stats":
        click.echo(render.stats(data))
    else:
        click.echo(render.table(data))


@main.command(cls=CheckedCommand)
@click.argument("dir", type=click.Path())
@click.option("--pid", type=int, required=True, help="Process whose memory to read.")
@click.option("--addr", required=True, help="Start address (decimal or 0x hex).")
@click.option("--size", required=True, help="Number of bytes (decimal or 0x hex).")
@click.option("-o", "--output", "out", type=click.Path(), required=True, help="File, or -.")
def extract(dir: str, pid: int, addr: str, size: str, out: str) -> None:
    """Write the bytes process PID held at ADDR..ADDR+SIZE at this dump."""
    start, size_ = api.parse_addr(addr), api.parse_addr(size)
    if out == "-":
        api.extract_to(dir, pid, start, size_, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    with _output_file(out, "wb") as f:
        api.extract_to(dir, pid, start, size_, f)


@main.command(cls=CheckedCommand)
@click.argument("dir", type=click.Path())
def verify(dir: str) -> None:
    """Check headers, checksums, schemas, completeness and the parent chain."""
    click.echo(api.verify(dir))
