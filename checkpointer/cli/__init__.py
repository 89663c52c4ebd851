"""The command line: argument parsing and printing over the library's functions."""

import importlib

import click

from checkpointer import __version__

# The module of each command, imported when that command runs (or --help lists it):
# a restore does not import the dumper's modules, nor a dump the inspection's. Every
# command starts sooner for it (under emulation, imports cost seconds).
COMMAND_MODULES = {
    **dict.fromkeys(("dump", "pre-dump", "converge", "check", "untrack"), "dump_cmds"),
    **dict.fromkeys(("restore", "unlock"), "restore_cmds"),
    **dict.fromkeys(("migrate", "receive", "page-server"), "migrate_cmds"),
    **dict.fromkeys(("show", "decode", "info", "x", "extract", "verify"), "inspect_cmds"),
}


class CommandsOnDemand(click.Group):
    """A group whose commands are registered by importing their module."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMAND_MODULES:
            importlib.import_module(f"checkpointer.cli.{COMMAND_MODULES[name]}")
        return self.commands.get(name)


@click.group(cls=CommandsOnDemand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="checkpointer")
def main() -> None:
    """Checkpoint live Linux process trees incrementally, CRIU-style.

    Dump commands freeze a process tree with ptrace and write its state and memory
    into an images directory; restore brings a final dump back to life; migrate
    moves a live tree to another host over ssh; inspection commands open, verify
    and extract from the images.
    """
