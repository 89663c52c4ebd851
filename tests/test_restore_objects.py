"""restore of pipes, FIFOs and sockets: each object is dumped in a real program,
the program killed and restored, then the object is used."""

from __future__ import annotations

import pytest
from objectslib import dump_and_kill, restore, start_program


@pytest.fixture
def program(tmp_path):
    started = []

    def _start(code: str, name: str = "prog", **popen):
        prog = start_program(tmp_path, code, name, **popen)
        started.append(prog)
        return prog

    yield _start
    for prog in started:
        prog.kill()


def test_python_program_restores(program, tmp_path):
    """The restorer is a python program too: a dumped one maps the same exe."""
    prog = program(
        """
        ready()
        go()
        report("answer", 42)
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("answer") == b"42"
