"""The image stream: receive, page-server, --page-server, and every way a stream
can go wrong (truncation, corruption, a killed receiver, a full disk)."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from targetlib import CLI, assert_one_line_error, cli

from checkpointer.errors import ImageError
from checkpointer.images import Dump, DumpWriter
from checkpointer.images import samples as s
from checkpointer.images.stream import END, StreamSender, read_messages
from checkpointer.receive import Session

GOLDEN = Path(__file__).parent.parent / "images" / "golden" / "chain"


def encode(*dumps: Path, end: bool = True) -> bytes:
    out = bytearray()
    sender = StreamSender(out.extend)
    for d in dumps:
        sender.send_dump(str(d))
    if end:
        sender.control(END)
    return bytes(out)


def receive(data: bytes, dest: Path) -> list[dict]:
    events: list[dict] = []
    Session(str(dest), events.append).run(io.BytesIO(data).read)
    return events


def receive_cli(dest: Path, data: bytes) -> subprocess.CompletedProcess:
    """`checkpointer receive -D dest` fed data; stdout and stderr as text."""
    r = subprocess.run([*CLI, "receive", "-D", str(dest)], input=data, capture_output=True,
                       timeout=120)  # fmt: skip
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def assert_nothing_complete(dest: Path) -> None:
    """No directory under dest opens as a dump, hidden temp dirs included."""
    if not dest.exists():
        return
    for p in dest.iterdir():
        with pytest.raises(ImageError):
            Dump.open(str(p))


def test_chain_round_trips_byte_for_byte(tmp_path):
    chain = [GOLDEN / "1", GOLDEN / "2", GOLDEN / "3"]
    events = receive(encode(*chain), tmp_path / "dest")
    assert [e["event"] for e in events] == ["hello", "committed", "committed", "committed", "end"]
    for d in chain:
        got = tmp_path / "dest" / d.name
        assert files_of(got) == files_of(d)
        assert stat.S_IMODE(got.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in got.iterdir()} == {0o600}
    assert sorted(os.listdir(tmp_path / "dest")) == ["1", "2", "3"]  # no temp dir left
    assert Dump.open(str(tmp_path / "dest" / "3")).read_memory(100, 0x10000, 16) is not None


def test_every_truncation_is_refused_and_leaves_nothing(tmp_path):
    data = encode(GOLDEN / "1")
    cuts = sorted({0, 5, 16, 17, 40, len(data) // 3, len(data) // 2, len(data) - 5, len(data) - 1})
    for cut in cuts:
        dest = tmp_path / f"cut-{cut}"
        with pytest.raises(ImageError, match="truncated"):
            receive(data[:cut], dest)
        assert os.listdir(dest) == [], cut


def test_a_stream_without_end_commits_nothing_it_received(tmp_path):
    # Every dump arrived whole, but the session did not end: a migration that
    # failed must not leave a chain that looks complete.
    data = encode(GOLDEN / "1", GOLDEN / "2", end=False)
    with pytest.raises(ImageError, match="truncated"):
        receive(data, tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []


@pytest.mark.parametrize("where", [3, 20, 30, 200, 1000, -300, -40, -10, -2])
def test_any_flipped_byte_is_detected(tmp_path, where):
    data = bytearray(encode(GOLDEN / "1", GOLDEN / "2"))
    data[where] ^= 0x40
    with pytest.raises(ImageError) as err:
        receive(bytes(data), tmp_path / "dest")
    assert re.search(r"checksum|magic|unknown type|too long|version|reserved", str(err.value))
    assert_nothing_complete(tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []


def test_an_existing_dump_is_never_overwritten(tmp_path):
    receive(encode(GOLDEN / "1"), tmp_path / "dest")
    before = files_of(tmp_path / "dest" / "1")
    with pytest.raises(ImageError, match="refusing to overwrite"):
        receive(encode(GOLDEN / "1"), tmp_path / "dest")
    assert files_of(tmp_path / "dest" / "1") == before


def test_a_dump_whose_parent_is_missing_is_refused(tmp_path):
    with pytest.raises(ImageError, match="missing|no such"):
        receive(encode(GOLDEN / "2"), tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []


def test_read_messages_checks_the_header(tmp_path):
    with pytest.raises(ImageError, match="bad magic"):
        list(read_messages(io.BytesIO(b"X" * 64).read))


# ---- the receive command ----


def test_receive_cli_commits_and_answers_json_lines(tmp_path):
    r = receive_cli(tmp_path / "dest", encode(GOLDEN / "1", GOLDEN / "2"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert '"event": "hello"' in lines[0] and '"event": "end"' in lines[-1]
    assert files_of(tmp_path / "dest" / "2") == files_of(GOLDEN / "2")


def test_receive_cli_corrupt_stream_is_one_line(tmp_path):
    data = bytearray(encode(GOLDEN / "1"))
    data[len(data) // 2] ^= 1
    r = receive_cli(tmp_path / "dest", bytes(data))
    assert_one_line_error(r, "checksum mismatch")
    assert '"event": "error"' in r.stdout.splitlines()[-1]
    assert os.listdir(tmp_path / "dest") == []


def _big_dump(path: Path, mb: int) -> Path:
    """A dump of `mb` MiB of incompressible pages."""
    with DumpWriter(str(path), kind="pre-dump") as w:
        w.write_pstree([s.pstree_rec(3)])
        w.write_mm(3, s.mm_rec(), [s.vma_rec(0x100000, 0x100000 + (mb << 20))])
        pw = w.open_pages("pid-3")
        for i in range(mb):
            pw.add_data(0x100000 + (i << 20), os.urandom(1 << 20))
        w.commit()
    return path


@pytest.mark.parametrize("kill_with", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_receiver_killed_mid_dump_leaves_nothing_complete(tmp_path, kill_with):
    src = _big_dump(tmp_path / "src" / "big", 24)
    data = encode(src)
    dest = tmp_path / "dest"
    p = subprocess.Popen(
        [*CLI, "receive", "-D", str(dest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdin.write(data[: len(data) // 2])
    p.stdin.flush()
    deadline = time.monotonic() + 30
    while not any(x.name.startswith(".big.tmp-") for x in dest.glob(".*")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(kill_with)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert_nothing_complete(dest)
    if kill_with != signal.SIGKILL:  # a receiver that could clean up did
        assert os.listdir(dest) == []
        assert "Traceback" not in p.stderr.read().decode()
    p.stdin.close()
    p.stdout.close()
    p.stderr.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)])
    if r.returncode:
        pytest.skip("cannot mount a tmpfs (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_at_the_destination_is_one_line_and_leaves_nothing(tmp_path, small_tmpfs):
    src = _big_dump(tmp_path / "src" / "big", 80)
    r = receive_cli(small_tmpfs / "dest", encode(src))
    assert_one_line_error(r, "No space left on device")
    assert os.listdir(small_tmpfs / "dest") == []
    assert os.statvfs(small_tmpfs).f_bfree * os.statvfs(small_tmpfs).f_bsize > 60 << 20


# ---- page-server and --page-server ----


@pytest.fixture
def page_server(tmp_path):
    dest = tmp_path / "server"
    p = subprocess.Popen(
        [*CLI, "page-server", "--port", "0", "-D", str(dest)],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stderr.readline()
    m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert m, line
    yield f"127.0.0.1:{m.group(1)}", dest
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=10)
    p.stderr.close()


@pytest.mark.uffd_wp
def test_page_server_chain_equals_local_chain(spawn, tmp_path, page_server):
    address, server_dir = page_server
    t = spawn("--anon-mb", "16", "--hot-pages", "8")
    local = tmp_path / "local"
    steps = [
        ("pre-dump", "pre-1", []),
        ("pre-dump", "pre-2", ["--prev-images-dir", "../pre-1"]),
        ("dump", "final", ["--prev-images-dir", "../pre-2", "--leave-running"]),
    ]
    for command, name, extra in steps:
        r = cli(command, "-t", str(t.pid), "-D", str(local / name), "--tracker", "uffd-wp",
                "--page-server", address, *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"sent to {address}" in r.stdout
    for _, name, _ in steps:
        assert files_of(server_dir / name) == files_of(local / name), name
    r = cli("verify", str(server_dir / "final"))
    assert r.returncode == 0 and "3 dump(s) in chain" in r.stdout, r.stdout + r.stderr
    t.assert_carries_on()


@pytest.mark.parametrize("command", ["pre-dump", "dump"])
@pytest.mark.parametrize(
    "address, words",
    [("127.0.0.1:1", ("page server 127.0.0.1:1", "cannot connect")),
     ("nonsense", ("--page-server 'nonsense'", "want ADDRESS:PORT"))],
)  # fmt: skip
def test_page_server_unreachable_is_one_line_before_the_dump(spawn, tmp_path, command, address,
                                                             words):  # fmt: skip
    """Found out before anything is dumped: a dump found it out only once done, after
    it had killed the target (and told the dump's result, then the error)."""
    t = spawn("--anon-mb", "1")
    r = cli(command, "-t", str(t.pid), "-D", str(tmp_path / "d"), "--tracker", "full",
            "--page-server", address)  # fmt: skip
    assert_one_line_error(r, *words)
    assert r.stdout == "" and not (tmp_path / "d").exists()
    t.assert_carries_on()


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_page_server_refuses_a_place_it_cannot_write_at_once(tmp_path, kind):
    """It listened, and failed only when a client came ("link lost")."""
    dest = tmp_path / "dest"
    if kind == "file":
        dest.write_text("a file")
    else:
        dest.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(dest)],
                       check=True)  # fmt: skip
    try:
        r = cli("page-server", "--port", "0", "-D", str(dest), timeout=30)
        assert_one_line_error(r, str(dest))
    finally:
        if kind != "file":
            subprocess.run(["umount", "-l", str(dest)], check=True)


def test_page_server_binds_loopback_by_default(page_server):
    address, _ = page_server
    assert address.startswith("127.0.0.1:")


def test_a_restored_tree_whose_commit_never_comes_is_killed(spawn, tmp_path, monkeypatch):
    # A session whose tree was restored (here: a running target stands for it) and
    # that then hears nothing: the source rolled back, so the tree must not run twice.
    import checkpointer.receive as receive_mod

    t = spawn("--anon-mb", "1")
    monkeypatch.setattr(receive_mod, "COMMIT_TIMEOUT", 0.5)
    r, w = os.pipe()
    os.write(w, encode(GOLDEN / "1", end=False))
    events: list[dict] = []
    session = Session(str(tmp_path / "dest"), events.append)
    session.restored_pids = [t.pid]
    try:
        with pytest.raises(Exception, match="no word from the source"):
            session.run(session.reader(r, lambda n: os.read(r, n)))
    finally:
        os.close(r)
        os.close(w)
    assert t.proc.wait(timeout=5) == -signal.SIGKILL
    assert events[-1]["event"] == "error" and os.listdir(tmp_path / "dest") == []
