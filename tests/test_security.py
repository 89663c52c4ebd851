"""Security: private images, parent chains that stay where they were put,
ptrace permissions as the kernel decides them, and image data that stays data."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import targetlib
from targetlib import assert_one_line_error

from checkpointer.errors import ImageError
from checkpointer.images import DumpWriter, samples
from checkpointer.images import format as fmt

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "checkpointer"
GOLDEN = REPO / "images" / "golden" / "chain"
NOBODY = 65534


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", REPO)
    return targetlib.cli(*args, **kw)


# The interpreter and its packages may live where nobody cannot read them (pyenv
# under /root): load the whole tool as root, then become nobody for good before
# it does anything, so every kernel permission check sees user nobody.
AS_NOBODY = f"""
import difflib, importlib, os, pkgutil, sys
import checkpointer
for m in pkgutil.walk_packages(checkpointer.__path__, "checkpointer."):
    if m.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(m.name)
    except ImportError:
        pass
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
from checkpointer.cli import main
sys.argv[0] = "checkpointer"
main()
"""


def cli_as_nobody(home: Path, *args: str, state_dir: bool = True) -> subprocess.CompletedProcess:
    """As user nobody with HOME=home; with its own state directory unless
    `state_dir` is False (then the tool's default, as for a user who sets none)."""
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("CHECKPOINTER_STATE_DIR", None)
    if state_dir:
        env["CHECKPOINTER_STATE_DIR"] = str(home / "state")
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=home,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- permissions of what is written ----------------------------------------------------


def test_images_private_even_with_umask_0(spawn, tmp_path):
    t = spawn()
    final = tmp_path / "new" / "deeper" / "d"
    r = cli(
        "dump",
        "-t",
        str(t.pid),
        "-D",
        str(final),
        "--leave-running",
        preexec_fn=lambda: os.umask(0),
    )
    assert r.returncode == 0, r.stderr
    for d in (final, final.parent, final.parent.parent):
        assert mode(d) == 0o700, d
    assert all(mode(f) == 0o600 for f in final.iterdir())
    assert mode(tmp_path) == 0o700  # pytest made it; the tool did not touch it


@pytest.mark.parametrize("before", [0o700, 0o750, 0o711, 0o500])
def test_existing_directory_never_loosened(spawn, tmp_path, before):
    t = spawn()
    final = tmp_path / "d"
    final.mkdir()
    final.chmod(before)
    container_before = mode(tmp_path)
    r = cli("pre-dump", "-t", str(t.pid), "-D", str(final), "--tracker", "full")
    assert r.returncode == 0, r.stderr
    after = mode(final)
    assert after & ~before == 0, f"{before:o} -> {after:o}"
    assert after & 0o077 == 0  # nobody else may read the images
    assert mode(tmp_path) == container_before
    assert all(mode(f) == 0o600 for f in final.iterdir())


# -- parent chains stay inside the tree -------------------------------------------------


def _rewrite_parent(path: Path, parent: str | None) -> None:
    inv = fmt.read_records(str(path / "inventory"))[0]
    inv["parent"] = parent
    (path / "inventory").chmod(0o600)
    (path / "inventory").write_bytes(fmt.encode_records("inventory", [inv]))


@pytest.fixture
def chain(tmp_path):
    dst = tmp_path / "tree" / "chain"
    shutil.copytree(GOLDEN, dst, ignore=shutil.ignore_patterns("*.json"))
    outside = tmp_path / "outside"
    shutil.copytree(GOLDEN / "2", outside)  # a sound dump, outside the chain's tree
    _rewrite_parent(outside, None)
    # dump 2's pages still resolve against an intact "1" beside outside/
    shutil.copytree(GOLDEN / "1", tmp_path / "1")
    return dst


def _inspect_all(d: Path, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    out = tmp_path / "extract.bin"
    return [
        cli("verify", str(d)),
        cli("show", str(d)),
        cli(
            "extract", str(d), "--pid", "100", "--addr", "0x10000", "--size", "4096", "-o", str(out)
        ),
    ]


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
@pytest.mark.damages_images
def test_cli_never_follows_a_parent_out_of_the_tree(chain, tmp_path, how):
    outside = tmp_path / "outside"
    if how == "absolute":
        link = str(outside)
    elif how == "dotdot":
        link = "../../../outside"
    else:
        os.symlink(outside, chain / "escape")
        link = "../escape"
    _rewrite_parent(chain / "2", link)
    for r in _inspect_all(chain / "3", tmp_path):
        assert_one_line_error(r)
        assert any(w in r.stderr for w in ("relative", "leaves")), r.stderr
    assert not (tmp_path / "extract.bin").exists()


@pytest.mark.damages_images
def test_explicit_path_outside_is_read(chain, tmp_path):
    """What the user names on the command line is read, wherever it is."""
    r = cli("show", str(tmp_path / "outside"))
    assert r.returncode == 0, r.stderr


def test_pre_dump_refuses_a_parent_outside_the_tree(spawn, tmp_path):
    """A parent the reader would later refuse is refused when writing, clearly."""
    t = spawn()
    assert (
        cli(
            "pre-dump", "-t", str(t.pid), "-D", str(tmp_path / "a" / "1"), "--tracker", "full"
        ).returncode
        == 0
    )
    r = cli(
        "pre-dump",
        "-t",
        str(t.pid),
        "-D",
        str(tmp_path / "b" / "2"),
        "--prev-images-dir",
        str(tmp_path / "a" / "1"),
        "--tracker",
        "full",
    )
    assert_one_line_error(r, "leaves")
    assert not (tmp_path / "b" / "2").exists()


# -- ptrace permissions --------------------------------------------------------------------


def _ptrace_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except FileNotFoundError:
        return None  # no Yama: classic same-uid rules


def _as_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


@pytest.fixture
def nobody_dir():
    """A directory user nobody owns (tmp_path's parents are root-only 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    path = Path(tempfile.mkdtemp(prefix="checkpointer-nobody-"))
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", ["dump", "pre-dump"])
def test_unprivileged_user_refused_a_root_process(spawn, nobody_dir, command):
    t = spawn()
    extra = ["--leave-running"] if command == "dump" else ["--tracker", "full"]
    r = cli_as_nobody(nobody_dir, command, "-t", str(t.pid), "-D", str(nobody_dir / "d"), *extra)
    assert_one_line_error(r, str(t.pid))
    assert "ermission denied" in r.stderr, r.stderr
    assert not (nobody_dir / "d").exists()
    assert t.alive()


def test_unprivileged_user_dumps_its_own_process(nobody_dir):
    scope = _ptrace_scope()
    if scope is not None and scope >= 1:
        pytest.skip(f"kernel.yama.ptrace_scope={scope}: only descendants can be traced")
    from targetlib import target_binary

    binary = target_binary()
    own = subprocess.Popen(
        [str(binary)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # Not pytest's capture file: a deleted file nobody may not read (its
        # contents would go into the images).
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=_as_nobody,
        cwd=nobody_dir,
    )
    try:
        while not own.stdout.readline().startswith("READY"):
            pass
        final = nobody_dir / "d"
        # With no state directory of its own set: /run/checkpointer is root's.
        r = cli_as_nobody(
            nobody_dir,
            *("dump", "-t", str(own.pid), "-D", str(final), "--leave-running"),
            state_dir=False,
        )
        assert r.returncode == 0, r.stderr
        assert final.stat().st_uid == NOBODY
        r = cli("verify", str(final))
        assert r.returncode == 0, r.stderr
        assert own.poll() is None
    finally:
        own.kill()
        own.wait()


# -- image data is never code ----------------------------------------------------------------

DANGEROUS_CALLS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "yaml",
    "jsonpickle",
}


def test_package_never_evaluates_or_unpickles():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and (node.func.id in DANGEROUS_CALLS)
            ):
                problems.append(f"{path}:{node.lineno}: {node.func.id}()")
            elif isinstance(node, ast.Import):
                problems += [
                    f"{path}:{node.lineno}: import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] in DANGEROUS_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and (
                (node.module or "").split(".")[0] in DANGEROUS_MODULES
            ):
                problems.append(f"{path}:{node.lineno}: from {node.module} import")
            elif isinstance(node, ast.Attribute) and node.attr in ("ext_hook", "object_hook"):
                problems.append(f"{path}:{node.lineno}: msgpack {node.attr}")
    assert not problems, problems


CODE_LIKE = [
    "__import__('os').system('touch PWNED')",
    "$(touch PWNED)",
    "`touch PWNED`",
    "!!python/object/apply:os.system ['touch PWNED']",
    "cos\nsystem\n(S'touch PWNED'\ntR.",  # a pickle program, as text
    "{{7*7}} %s %n %x",
]


def test_code_like_strings_decode_as_plain_data(tmp_path):
    d = tmp_path / "d"
    vma = {
        "start": 0x10000,
        "end": 0x11000,
        "prot": "rw-p",
        "offset": 0,
        "dev": "00:00",
        "inode": 0,
        "path": CODE_LIKE[1],
        "kind": "anon",
        "vmflags": CODE_LIKE[:3],
        "shmem": None,
    }
    mm = {
        k: 0
        for k in (
            "start_code",
            "end_code",
            "start_data",
            "end_data",
            "start_brk",
            "brk",
            "start_stack",
            "arg_start",
            "arg_end",
            "env_start",
            "env_end",
            "exit_code",
        )
    }
    mm.update(auxv=CODE_LIKE[4].encode(), exe=CODE_LIKE[0], cwd=CODE_LIKE[3], root="/")
    process = {
        "pid": 100,
        "comm": CODE_LIKE[0],
        "state": "S",
        "personality": 0,
        "creds": {
            "uid": [0] * 4,
            "gid": [0] * 4,
            "groups": [],
            "cap_inh": 0,
            "cap_prm": 0,
            "cap_eff": 0,
            "cap_bnd": 0,
            "cap_amb": 0,
        },
        "rlimits": {CODE_LIKE[5]: [-1, -1]},
        "sigignore": 0,
        "sigcatch": 0,
    }
    regs = {"rip": 0, "rsp": 0}
    thread = {
        "tid": 100,
        "regs": regs,
        "xstate": b"\x80\x04" + CODE_LIKE[4].encode(),
        "blocked": 0,
        "pending": 0,
        "shared_pending": 0,
        "state": "S",
    }
    # The version 2 fields, with the hostile strings where a string goes.
    process = samples.process_rec(100) | process
    thread = samples.thread_rec(100) | thread | {"comm": CODE_LIKE[2]}
    mm = samples.mm_rec() | mm
    vma = samples.vma_rec(0, 0) | vma
    fd = samples.fd_rec(3) | {"target": CODE_LIKE[1], "flags": 0, "mnt_id": 0}
    with DumpWriter(str(d)) as w:
        w.write_pstree([{"pid": 100, "ppid": 0, "pgid": 100, "sid": 100, "threads": [100]}])
        w.write_core(100, process, [thread])
        w.write_mm(100, mm, [vma])
        w.write_fds(100, [fd])
        pages = w.open_pages("pid-100")
        pages.add_data(0x10000, CODE_LIKE[0].encode().ljust(4096, b"\0"))
        pages.close()
        w.commit({"tracker": CODE_LIKE[2]})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    outs = [
        cli("show", str(d), "--json", cwd=cwd),
        cli("verify", str(d), cwd=cwd),
        cli("decode", str(d / "core-100"), cwd=cwd),
        cli("decode", str(d / "mm-100"), cwd=cwd),
        cli("decode", str(d / "fds-100"), cwd=cwd),
        cli("x", str(d), "mems", cwd=cwd),
    ]
    for r in outs:
        assert r.returncode == 0, (r.args, r.stderr)
    assert CODE_LIKE[0] in outs[2].stdout and "touch PWNED" in outs[3].stdout
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()
    assert not Path("PWNED").exists()


def test_msgpack_extension_types_are_refused(tmp_path):
    """An image whose records carry msgpack ext types (which some unpackers turn
    into objects) is a one-line error from the msgpack layer, never an object.
    The file is framed and checksummed correctly, so nothing before the unpacker
    rejects it."""
    import msgpack

    d = tmp_path / "d"
    shutil.copytree(GOLDEN / "1", d)
    hostile = fmt.encode_records(
        "pstree", [{"pid": msgpack.ExtType(42, b"os.system('touch PWNED')")}]
    )
    (d / "pstree").chmod(0o600)
    (d / "pstree").write_bytes(hostile)
    with pytest.raises(ImageError, match=r"corrupt record stream \(ValueError: .*ext"):
        fmt.read_records(str(d / "pstree"))
    r = cli("show", str(d), cwd=tmp_path)
    assert_one_line_error(r, "corrupt record stream")
    assert "compressed" not in r.stderr  # the checksum held: the ext type was reached
    assert not list(tmp_path.rglob("PWNED"))


def test_extract_and_decode_outputs_are_private_whatever_the_umask(tmp_path):
    """What extract and decode write holds memory, registers and credentials, as
    the images do: 0600 like them. They followed the umask (0666 under umask 0)."""
    d = GOLDEN / "1"
    old = os.umask(0)
    try:
        args = ["--pid", "100", "--addr", "0x10000", "--size", "4096"]
        r1 = cli("extract", str(d), *args, "-o", str(tmp_path / "mem.bin"))
        r2 = cli("decode", str(d / "core-100"), "-o", str(tmp_path / "core.json"))
    finally:
        os.umask(old)
    assert (r1.returncode, r2.returncode) == (0, 0), r1.stderr + r2.stderr
    assert mode(tmp_path / "mem.bin") == 0o600
    assert mode(tmp_path / "core.json") == 0o600
