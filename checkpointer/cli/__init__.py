"""The command line: argument parsing and printing over the library's functions."""

import click

from checkpointer import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="checkpointer")
def main() -> None:
    """Checkpoint live Linux process trees incrementally, CRIU-style.

    Dump commands freeze a process tree with ptrace and write its state and memory
    into an images directory; restore brings a final dump back to life; migrate
    moves a live tree to another host over ssh; inspection commands open, verify
    and extract from the images.
    """


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `main`.
    from checkpointer.cli import dump_cmds, inspect_cmds, migrate_cmds, restore_cmds  # noqa: F401


_register_commands()
