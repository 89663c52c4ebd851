"""The inspection commands: output, JSON, exit codes, one-line errors."""

import base64
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from checkpointer.cli import main

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "images", "golden", "chain")
D3 = os.path.join(GOLDEN, "3")


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_show_dir_summary():
    code, out, _ = run("show", D3)
    assert code == 0
    assert "kind dump, complete, format 2" in out
    assert "pages: 3 here, 12 in parents, 2 zero" in out
    assert "100 (ppid 1) golden [S] threads 100,102; 4 vmas" in out
    assert "shm-00:01-4242: 1 here, 3 in parents, 0 zero" in out
    assert out.index("chain/3 [dump") < out.index("chain/2 [pre-dump") < out.index("chain/1 [")


def test_every_command_reads_a_version_1_chain(tmp_path):
    d3 = os.path.join(GOLDEN, "..", "v1", "chain", "3")
    code, out, _ = run("show", d3)
    assert code == 0 and "kind dump, complete, format 1" in out
    for args in (
        ["verify", d3],
        ["info", os.path.join(d3, "core-100")],
        ["decode", os.path.join(d3, "mm-100")],
        ["x", d3, "mems"],
        ["x", d3, "fds"],
        [
            "extract",
            d3,
            "--pid",
            "100",
            "--addr",
            "0x10000",
            "--size",
            "4096",
            "-o",
            tmp_path / "out",
        ],  # fmt: skip
    ):
        code, out, err = run(*args)
        assert code == 0, (args, out, err)
    assert (tmp_path / "out").stat().st_size == 4096


def test_show_json_and_file():
    code, out, _ = run("show", D3, "--json")
    data = json.loads(out)
    assert code == 0 and data["pages"] == {"here": 3, "parent": 12, "zero": 2, "same": 0}
    assert [c["kind"] for c in data["chain"]] == ["dump", "pre-dump", "pre-dump"]
    code, out, _ = run("show", os.path.join(D3, "pstree"))
    assert code == 0 and out.startswith("pstree: pstree file, format version 2\nrecords:\n")
    assert out.endswith("\n2 records\n")
    code, out, _ = run("show", os.path.join(D3, "stats"), "--json")
    assert code == 0 and json.loads(out)["entries"][0]["pages_written"] == 3


def test_decode_and_info(tmp_path):
    code, out, _ = run("decode", os.path.join(D3, "core-100"), "--pretty")
    data = json.loads(out)
    assert code == 0 and data["kind"] == "core" and len(data["entries"]) == 3
    assert data["entries"][1]["xstate"] == {"base64": base64.b64encode(bytes(range(64))).decode()}
    code, out, _ = run("decode", os.path.join(D3, "pages-pid-100"), "-o", tmp_path / "o.json")
    data = json.loads((tmp_path / "o.json").read_text())
    assert code == 0 and data["kind"] == "pages" and data["frames"][0]["content_size"] == 4096
    code, out, _ = run("info", os.path.join(D3, "pagemap-pid-100"))
    assert (code, out) == (0, f"{D3}/pagemap-pid-100: kind pagemap, version 2, 9 records\n")


def test_x_views():
    code, out, _ = run("x", D3, "ps")
    assert code == 0 and out.splitlines()[0].split() == [
        "PID", "PPID", "PGID", "SID", "THREADS", "STATE", "COMM"
    ]  # fmt: skip
    assert out.splitlines()[2].split() == ["101", "100", "100", "100", "1", "S", "golden-child"]
    code, out, _ = run("x", D3, "mems")
    assert "0x7f0000000000  0x7f0000004000  rw-s  shm" in out
    code, out, _ = run("x", D3, "rss")
    assert out.splitlines()[0].split()[4:8] == ["HERE", "PARENT", "ZERO", "SAME"]
    assert out.splitlines()[1].split() == [
        "100",
        "0x10000",
        "0x20000",
        "16",
        "1",
        "7",
        "1",
        "0",
        "anon",
    ]
    code, out, _ = run("x", D3, "fds")
    assert "pipe:[9876]" in out
    code, out, _ = run("x", D3, "stats")
    lines = out.splitlines()
    assert lines[1].split()[:6] == ["0", "pre-dump", "soft-dirty", "13", "0", "4"]
    assert "iter 0 |######################################## 13" in out
    code, out, _ = run("x", D3, "stats", "--json")
    assert [r[3] for r in json.loads(out)["rows"]] == [13, 3, 3]


def test_extract(tmp_path):
    page = runpy.run_path(os.path.join(GOLDEN, "..", "..", "make-golden.py"))["page"]
    out = tmp_path / "mem"
    code, _, _ = run("extract", D3, "--pid", 100, "--addr", "0x10800", "--size", "0x1000",
                     "-o", out)  # fmt: skip
    assert code == 0 and out.read_bytes() == page("a1", 0)[2048:] + page("a3", 1)[:2048]
    code, _, err = run("extract", D3, "--pid", 100, "--addr", "0x400000", "--size", 8, "-o", out)
    assert code == 1
    assert err == (
        f"checkpointer: {D3}: 0x400000-0x400008 of pid 100 "
        "(/usr/bin/golden) is not held in the images\n"
    )
    assert not out.exists()  # no partial output
    code, _, err = run("extract", D3, "--pid", 100, "--addr", "0x1f000", "--size", "0x2000",
                       "-o", out)  # fmt: skip
    assert code == 1 and "0x20000-0x21000 is not mapped in pid 100" in err
    assert not out.exists()
    code, _, err = run("extract", D3, "--pid", 100, "--addr", "zz", "--size", 8, "-o", out)
    assert code == 1 and "bad address 'zz'" in err


@pytest.mark.damages_images
def test_verify_ok_and_first_problem(tmp_path):
    code, out, _ = run("verify", D3)
    assert code == 0 and out.startswith(f"OK {D3}: 3 dump(s) in chain") and out.count("\n") == 1
    chain = tmp_path / "chain"
    shutil.copytree(GOLDEN, chain, ignore=shutil.ignore_patterns("*.json"))
    p = chain / "1" / "pages-shm-00:01-4242"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40  # inside the checksum of the last frame
    p.write_bytes(bytes(data))
    code, out, err = run("verify", chain / "3")
    assert code == 1 and out == ""
    assert err.startswith(f"checkpointer: {chain}/1/pages-shm-00:01-4242: corrupt page frame")
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", ["missing", "new\nline"])
@pytest.mark.parametrize("cmd", [["show"], ["verify"], ["x", None, "ps"], ["info"], ["decode"]])
def test_errors_are_one_line(tmp_path, cmd, name):
    """Also for a path with a newline in it (it made the message two lines)."""
    target = str(tmp_path / name)
    args = [a if a is not None else target for a in cmd]
    if len(args) == 1:
        args.append(target)
    code, out, err = run(*args)
    assert code == 1 and err.startswith("checkpointer: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_subprocess_exit_code_and_stderr(tmp_path):
    (tmp_path / "inventory").write_bytes(b"CKPTIMG\0\x09\x00\x01\x00\0\0\0\0")
    r = subprocess.run(
        [sys.executable, "-m", "checkpointer", "show", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"checkpointer: {tmp_path}/inventory: unsupported image format version 9 "
        "(this checkpointer reads 1 and 2)\n"
    )


def test_every_command_is_found_by_its_name():
    """The CLI imports a command's module only when that command runs, looked up by
    the command's name: the table must name every command of every module, each
    with the module that defines it, and nothing else."""
    import importlib

    from checkpointer import cli

    for module in set(cli.COMMAND_MODULES.values()):
        importlib.import_module(f"checkpointer.cli.{module}")
    assert set(cli.main.commands) == set(cli.COMMAND_MODULES)
    for name, command in cli.main.commands.items():
        assert command.callback.__module__ == f"checkpointer.cli.{cli.COMMAND_MODULES[name]}"
