"""restore of pipes, FIFOs and sockets: each object is dumped in a real program,
the program killed and restored, then the object is used."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

import pytest
from objectslib import dump_and_kill, program_starter, refused_at_dump, restore
from redislib import HAVE_REDIS, Resp, commands_processed, start_benchmark, start_redis
from targetlib import CLI, assert_one_line_error, cli, free_port

from checkpointer.images import Dump
from checkpointer.kernel import netlock, sockets


@pytest.fixture
def program(tmp_path):
    with program_starter(tmp_path) as start:
        yield start


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


# -- pipes and FIFOs -----------------------------------------------------------------------


def test_pipe_keeps_its_bytes_and_size(program, tmp_path):
    prog = program(
        """
        import fcntl
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        os.write(w, bytes(range(256)) * 1000)
        ready()
        go()
        report("size", fcntl.fcntl(r, 1032))
        os.write(w, b"and more")
        os.set_blocking(r, False)
        got = b""
        while True:
            try:
                got += os.read(r, 1 << 20)
            except BlockingIOError:
                break
        report("data", got)
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("size") == str(1 << 20).encode()
    assert prog.result("data") == bytes(range(256)) * 1000 + b"and more"


READ_STDIN = """
    ready()
    go()
    got = b""
    while chunk := os.read(0, 65536):
        got += chunk
    report("data", got)
    """


def test_pipe_from_outside_is_joined_again(program, tmp_path):
    """A pipe from a process outside the tree (here: this test) into the dumped
    program: restored, the program reads on from the same pipe."""
    r, w = os.pipe()
    prog = program(READ_STDIN, stdin=r)
    os.close(r)
    os.write(w, b"before the dump|")
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    os.write(w, b"after the restore")
    os.close(w)
    prog.go()
    assert prog.result("data") == b"before the dump|after the restore"


def test_pipe_from_outside_gone_gives_its_bytes_then_eof(program, tmp_path):
    r, w = os.pipe()
    prog = program(READ_STDIN, stdin=r)
    os.close(r)
    os.write(w, b"written, then the writer went away")
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    os.close(w)  # nobody holds the pipe any more
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("data") == b"written, then the writer went away"


def test_fifo_keeps_its_path_and_bytes(program, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    prog = program(
        f"""
        r = os.open({str(fifo)!r}, os.O_RDONLY | os.O_NONBLOCK)
        w = os.open({str(fifo)!r}, os.O_WRONLY)
        os.write(w, b"in the fifo|")
        ready()
        go()
        os.write(w, b"after")
        report("data", os.read(r, 100))
        report("path", os.readlink(f"/proc/self/fd/{{r}}").encode())
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("data") == b"in the fifo|after"
    assert prog.result("path").decode() == str(fifo)


def test_shell_pipeline_delivers_every_byte_once_in_order(tmp_path):
    """producer | filter | consumer, dumped with data in both pipes."""
    lines = 300_000
    (tmp_path / "producer.py").write_text(
        "import sys, time\n"
        f"for i in range({lines}):\n"
        "    sys.stdout.write(f'{i:08d}\\n')\n"
        "    if i % 2000 == 0:\n"
        "        sys.stdout.flush(); time.sleep(0.002)\n"
    )
    (tmp_path / "consumer.py").write_text(
        "import sys, time\n"
        "for n, line in enumerate(sys.stdin):\n"
        "    sys.stdout.write(line)\n"
        "    if n % 1000 == 0:\n"
        "        sys.stdout.flush(); time.sleep(0.004)\n"
        "sys.stdout.write('END\\n')\n"
    )
    out = tmp_path / "out"
    py = sys.executable
    shell = subprocess.Popen(
        ["sh", "-c", f"{py} producer.py | cat | {py} consumer.py > {out}"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 200_000, "the pipeline to flow")
        dump_and_kill(shell.pid, tmp_path / "images", reap=shell.wait)
        in_flight = out.stat().st_size
        assert in_flight < lines * 9, "the pipeline ended before the dump"
        restore(tmp_path / "images")
        wait_until(lambda: out.read_bytes().endswith(b"END\n"), "the pipeline to end", 60)
        assert out.read_bytes() == b"".join(b"%08d\n" % i for i in range(lines)) + b"END\n"
    finally:
        subprocess.run(["pkill", "-9", "-s", str(shell.pid)], check=False)
        if shell.returncode is None:
            shell.kill()
            shell.wait()


def wait_until(pred, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- unix sockets --------------------------------------------------------------------------


def test_unix_socketpair_keeps_queued_bytes_both_ways(program, tmp_path):
    prog = program(
        """
        a, b = socket.socketpair()
        a.send(b"for b")
        b.send(b"for a")
        ready()
        go()
        report("b", b.recv(100))
        report("a", a.recv(100))
        a.send(b"again")
        report("again", b.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert (prog.result("a"), prog.result("b"), prog.result("again")) == (
        b"for a", b"for b", b"again",
    )  # fmt: skip


def test_unix_pair_between_parent_and_child(program, tmp_path):
    prog = program(
        """
        a, b = socket.socketpair()
        child = os.fork()
        if child == 0:
            a.close()
            go()
            b.send(b"ping")
            b.recv(100)
            os._exit(0)
        b.close()
        ready()
        go()
        report("from_child", a.recv(100))
        a.send(b"pong")
        report("child_status", os.waitpid(child, 0)[1])
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("from_child") == b"ping"
    assert prog.result("child_status") == b"0"


@pytest.mark.parametrize("kind", ["SOCK_STREAM", "SOCK_SEQPACKET"])
def test_unix_socket_whose_peer_closed_gives_its_bytes_then_eof(program, tmp_path, kind):
    """One end of a pair closed (the JVM holds such a socket): the other keeps the
    bytes sent before, then reads EOF and cannot write. It was refused at dump as
    "connected to an unnamed socket outside the dumped tree"."""
    prog = program(
        f"""
        a, b = socket.socketpair(socket.AF_UNIX, socket.{kind})
        b.send(b"sent before the close")
        b.close()
        ready()
        go()
        report("queued", a.recv(100))
        report("then", a.recv(100))
        try:
            a.send(b"x")
            report("send", b"sent")
        except BrokenPipeError:
            report("send", b"EPIPE")
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("queued") == b"sent before the close"
    assert (prog.result("then"), prog.result("send")) == (b"", b"EPIPE")


def test_fds_in_flight_on_a_unix_socket_are_refused(program, tmp_path):
    """SCM_RIGHTS fds sent and not received yet were dropped silently."""
    if not _shows_scm_fds():
        pytest.skip("needs a kernel that shows scm_fds in unix sockets' fdinfo")
    prog = program(
        """
        a, b = socket.socketpair()
        socket.send_fds(a, [b"fd"], [0])
        report("fd", b.fileno())
        ready()
        go()
        report("alive", 1)
        """
    )
    fd = int(prog.result("fd"))
    refused_at_dump(prog, tmp_path, f"fd {fd} of", "1 file descriptors sent over it")


def _shows_scm_fds() -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return "scm_fds" in open(f"/proc/self/fdinfo/{s.fileno()}").read()


def test_unix_pair_half_closed_stays_half_closed(program, tmp_path):
    """shutdown(SHUT_WR) on one end of a pair in the tree: its peer reads the queued
    bytes then EOF, it may not write, and the other direction still works."""
    prog = program(
        """
        a, b = socket.socketpair()
        a.send(b"last words")
        a.shutdown(socket.SHUT_WR)
        ready()
        go()
        report("b_reads", b.recv(100) + b"|" + b.recv(100))
        try:
            a.send(b"x")
            report("a_send", b"sent")
        except BrokenPipeError:
            report("a_send", b"EPIPE")
        b.send(b"reply")
        report("a_reads", a.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("b_reads") == b"last words|"
    assert (prog.result("a_send"), prog.result("a_reads")) == (b"EPIPE", b"reply")


def test_unix_listener_keeps_its_path_mode_and_backlog(program, tmp_path):
    path = tmp_path / "listener.sock"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({str(path)!r})
        os.chmod({str(path)!r}, 0o640)
        u.listen(7)
        report("fd", u.fileno())
        ready()
        while True:
            c, _ = u.accept()
            c.send(b"served")
            c.close()
        """
    )
    fd = int(prog.result("fd"))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    inode = os.stat(f"/proc/{prog.pid}/fd/{fd}").st_ino
    assert sockets.unix_socket(inode).backlog == 7
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))
        assert c.recv(100) == b"served"


def test_unix_listener_renamed_after_bind_is_found_where_its_file_is(program, tmp_path):
    """The JVM's attach listener binds a temporary name, then renames the file to the
    one clients connect to. Restore bound the socket at the old name again: a new
    file there, and nothing listening at the name the clients use ("Connection
    refused" from jcmd). It binds the old name (what getsockname says) and moves
    the file where it was."""
    tmp, final = tmp_path / "attach.tmp", tmp_path / "attach"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({str(tmp)!r})
        os.chmod({str(tmp)!r}, 0o600)
        os.rename({str(tmp)!r}, {str(final)!r})
        u.listen(4)
        ready()
        go()
        report("name", u.getsockname().encode())
        while True:
            c, _ = u.accept()
            c.send(b"attached")
            c.close()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    assert not tmp.exists()
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    prog.go()
    assert prog.result("name") == str(tmp).encode()
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(final))
        assert c.recv(100) == b"attached"


def test_a_connection_not_yet_accepted_by_a_renamed_listener(program, tmp_path):
    """A client of the tree waiting in the accept queue of a listener whose file was
    renamed (its peer name is the old name) connects again where the file is now."""
    tmp, final = tmp_path / "l.tmp", tmp_path / "l"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({str(tmp)!r})
        os.rename({str(tmp)!r}, {str(final)!r})
        u.listen(4)
        c = socket.socket(socket.AF_UNIX)
        c.connect({str(final)!r})
        ready()
        go()
        s, _ = u.accept()
        c.send(b"queued")
        report("got", s.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("got") == b"queued"


def test_unix_socket_whose_file_was_removed_comes_back_without_it(program, tmp_path):
    """A socket whose file the program removed after binding (reachable only by the
    connections it has) comes back without a file at its name."""
    path = tmp_path / "gone.sock"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({str(path)!r})
        u.listen(1)
        c = socket.socket(socket.AF_UNIX)
        c.connect({str(path)!r})
        s, _ = u.accept()
        os.unlink({str(path)!r})
        ready()
        go()
        c.send(b"still")
        report("got", s.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    assert not path.exists()
    prog.go()
    assert prog.result("got") == b"still"


def test_unix_listener_bound_by_a_relative_name_comes_back_in_its_directory(program, tmp_path):
    """A relative name is resolved in the binding process's working directory, and
    getsockname says it as given. Restore bound it in the restorer's directory."""
    work = tmp_path / "run"
    work.mkdir()
    prog = program(
        f"""
        os.chdir({str(work)!r})
        u = socket.socket(socket.AF_UNIX)
        u.bind("app.sock")
        u.listen(2)
        ready()
        go()
        report("name", u.getsockname().encode())
        while True:
            c, _ = u.accept()
            c.send(b"relative")
            c.close()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    (work / "app.sock").unlink()  # as a restore on another host would find it
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("name") == b"app.sock"
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(work / "app.sock"))
        assert c.recv(100) == b"relative"


def test_unix_stream_to_outside_is_refused(program, tmp_path):
    path = str(tmp_path / "outside.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    prog = program(
        f"""
        c = socket.socket(socket.AF_UNIX)
        c.connect({path!r})
        ready()
        go()
        report("alive", 1)
        """
    )
    r = cli("dump", "-t", str(prog.pid), "-D", str(tmp_path / "images"))
    assert_one_line_error(r, f"process {prog.pid}", "outside the dumped tree")
    prog.go()
    assert prog.result("alive") == b"1"  # left running
    server.close()


# -- TCP and UDP ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, host, option",
    [
        ("AF_INET", "127.0.0.1", ("SOL_SOCKET", "SO_KEEPALIVE")),
        ("AF_INET6", "::1", ("IPPROTO_IPV6", "IPV6_V6ONLY")),
    ],
)
def test_tcp_listener_keeps_address_options_and_backlog(program, tmp_path, family, host, option):
    level, name = (getattr(socket, n) for n in option)
    prog = program(
        f"""
        s = socket.socket(socket.{family})
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt({level}, {name}, 1)
        s.bind(({host!r}, 0))
        s.listen(33)
        report("fd", s.fileno())
        report("port", s.getsockname()[1])
        ready()
        while True:
            c, _ = s.accept()
            c.send(b"served")
            c.close()
        """
    )
    fd, port = int(prog.result("fd")), int(prog.result("port"))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    with socket.create_connection((host, port), timeout=5) as c:
        assert c.recv(100) == b"served"
    with socket.socket(fileno=sockets.copy_fd(prog.pid, fd)) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert s.getsockopt(level, name) == 1
        inode = os.fstat(s.fileno()).st_ino
    assert sockets.tcp_listen_backlog(getattr(socket, family), inode) == 33


def test_a_unix_socket_file_keeps_its_owner(program, tmp_path):
    """The restorer binds a listener again, so its file was root's: a user's 0600
    socket (an ssh agent's, sshd's forwarded agent) then refused its own user
    ("Permission denied"). The file's owner is now dumped and given back."""
    where = tempfile.mkdtemp(dir="/tmp")  # (pytest's is root's alone)
    os.chmod(where, 0o755)
    path = os.path.join(where, "agent.sock")
    prog = program(
        f"""
        s = socket.socket(socket.AF_UNIX)
        s.bind({path!r})
        os.chown({path!r}, 65534, 65534)
        os.chmod({path!r}, 0o600)
        s.listen()
        ready()
        while True:
            c, _ = s.accept()
            c.send(b"served")
            c.close()
        """
    )
    try:
        dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
        restore(tmp_path / "images")
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
        as_nobody = subprocess.run(
            ["/usr/bin/python3", "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
             f"s.connect({path!r}); print(s.recv(10).decode())"],
            user=65534, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert as_nobody.stdout.strip() == "served", as_nobody.stderr
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_socket_options_servers_rely_on_come_back(program, tmp_path):
    """Only six options were kept. dnsmasq's wildcard UDP socket asks IP_PKTINFO
    for the interface of each query, and drops a query without it: after a restore
    it answered none. rsyslog and journald take senders' credentials (SO_PASSCRED);
    a TCP listener's fast open queue and keepalive times went back to defaults."""
    prog = program(
        """
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
        u.bind(("0.0.0.0", 0))
        x = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        x.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        x.bind(str(D / "log"))
        t = socket.socket()
        t.setsockopt(socket.IPPROTO_TCP, 23, 5)  # TCP_FASTOPEN
        t.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
        t.bind(("127.0.0.1", 0))
        t.listen()
        report("fds", [u.fileno(), x.fileno(), t.fileno()])
        report("port", u.getsockname()[1])
        ready()
        while True:
            data, anc, _, addr = u.recvmsg(100, 100)
            u.sendto(bytes([len(anc)]), addr)  # how many control messages it got
        """
    )
    fds, port = eval(prog.result("fds")), int(prog.result("port"))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(5)
        c.sendto(b"query", ("127.0.0.1", port))
        assert c.recv(10) == b"\x01"  # the IP_PKTINFO message came with it
    wanted = [
        (socket.IPPROTO_IP, 8, 1),
        (socket.SOL_SOCKET, socket.SO_PASSCRED, 1),
        (socket.IPPROTO_TCP, 23, 5),
    ]
    for fd, (level, name, value) in zip(fds, wanted, strict=True):
        with socket.socket(fileno=sockets.copy_fd(prog.pid, fd)) as s:
            assert s.getsockopt(level, name) == value
            if name == 23:
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77


def test_tcp_listener_port_taken_is_refused_before_anything_is_made(program, tmp_path):
    prog = program(
        """
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(5)
        report("port", s.getsockname()[1])
        ready()
        go()
        """
    )
    port = int(prog.result("port"))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
        assert_one_line_error(r, f"port {port}", "in use")
    assert not os.path.exists(f"/proc/{prog.pid}")


def test_udp_socket_keeps_its_address(program, tmp_path):
    prog = program(
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        report("port", s.getsockname()[1])
        ready()
        while True:
            data, peer = s.recvfrom(100)
            s.sendto(data.upper(), peer)
        """
    )
    port = int(prog.result("port"))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(5)
        c.sendto(b"echo", ("127.0.0.1", port))
        assert c.recv(100) == b"ECHO"


CLIENT = """
    c = socket.create_connection(("127.0.0.1", {port}))
    c.sendall(b"hello")
    ready()
    go()
    got = b""
    while not got.endswith(b"|end"):
        got += c.recv(65536)
    c.sendall(got.upper())
    report("got", got)
    """


def test_tcp_established_is_refused_without_the_flag(program, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, _ = server.accept()
        r = cli("dump", "-t", str(prog.pid), "-D", str(tmp_path / "images"))
        assert_one_line_error(r, f"process {prog.pid}", "--tcp-established")
        assert not (tmp_path / "images").exists()
        prog.go()
        peer.sendall(b"still alive|end")
        assert prog.result("got") == b"still alive|end"  # left running, connection intact
        peer.close()


def test_tcp_established_goes_on_with_the_flag(program, tmp_path):
    """Queued bytes both ways, bytes sent while the program is down: the same
    connection carries them all after the restore, and no reset reached us."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, (_, port) = server.accept()
        assert peer.recv(5) == b"hello"
        peer.sendall(b"queued at the dump|")
        time.sleep(0.1)
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        lock = _lock_rule(server.getsockname()[1], port)
        assert lock in _lock_rules()
        peer.sendall(b"sent while it was down|end")  # retransmitted until it is back
        restore(tmp_path / "images")
        assert lock not in _lock_rules()
        prog.go()
        expected = b"queued at the dump|sent while it was down|end"
        assert prog.result("got") == expected
        peer.settimeout(10)
        got = b""
        while len(got) < len(expected):
            got += peer.recv(65536)
        assert got == expected.upper()
        peer.close()


def test_unlock_lifts_the_locks_of_a_dump_that_will_not_be_restored(program, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, (_, port) = server.accept()
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        lock = _lock_rule(server.getsockname()[1], port)
        assert lock in _lock_rules()
        r = cli("unlock", "-D", str(tmp_path / "images"))
        assert (r.returncode, r.stdout) == (0, "lifted the locks of 1 connection(s)\n"), r.stderr
        assert lock not in _lock_rules()
        peer.close()
    assert_one_line_error(cli("unlock", "-D", str(tmp_path / "none")), "no such dump directory")


def test_tcp_established_left_running_goes_on_unlocked(program, tmp_path):
    """dump --leave-running --tcp-established: the connection leaves repair mode and
    its lock before the program runs again."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, (_, port) = server.accept()
        r = cli("dump", "-t", str(prog.pid), "-D", str(tmp_path / "images"),
                "--tcp-established", "--leave-running")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert _lock_rule(server.getsockname()[1], port) not in _lock_rules()
        assert "tcp_repair" in str(Dump.open(str(tmp_path / "images")).fds(prog.pid))
        prog.go()
        peer.sendall(b"after a dump|end")
        assert prog.result("got") == b"after a dump|end"
        peer.settimeout(10)
        got = b""
        while not got.endswith(b"|END"):
            got += peer.recv(100)
        assert got == b"helloAFTER A DUMP|END"
        peer.close()


HALF_CLOSED_CLIENT = """
    c = socket.socket({family})
    c.connect(("{host}", {port}))
    c.sendall(b"hello")
    ready()
    go()
    got = b""
    while chunk := c.recv(65536):  # the bytes queued at the dump, then end of file
        got += chunk
    c.sendall(b"still here")  # the peer only closed its way
    c.close()
    report("got", got)
    """


@pytest.mark.parametrize("family,host", [("socket.AF_INET", "127.0.0.1"),
                                         ("socket.AF_INET6", "::1")])  # fmt: skip
def test_tcp_close_wait_gets_its_bytes_then_end_of_file(program, tmp_path, family, host):
    """The peer sent its last bytes and closed (its FIN arrived: CLOSE_WAIT, as an
    idle pooled connection whose server timed out), the program has not read them
    yet. It was refused at dump ("state close-wait cannot be dumped"). Restored, the
    program reads the bytes, then end of file, and can still send."""
    with socket.create_server((host, 0), family=eval(family)) as server:
        prog = program(HALF_CLOSED_CLIENT.format(family=family, host=host,
                                                 port=server.getsockname()[1]))  # fmt: skip
        peer, _ = server.accept()
        assert peer.recv(5) == b"hello"
        peer.sendall(b"last words")
        peer.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while sockets.tcp_state(peer) != 5:  # FIN_WAIT2: the program's kernel acked the FIN
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        restore(tmp_path / "images")
        prog.go()
        assert prog.result("got") == b"last words"
        peer.settimeout(10)
        got = b""
        while chunk := peer.recv(100):
            got += chunk
        assert got == b"still here"  # then end of file: it closed
        peer.close()


LINGER_ZERO = (
    'client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); '
    "client.close()"
)
ENDED_CONNECTION = """
import errno, struct
listener = socket.create_server(("127.0.0.1", 0), reuse_port=False)
port = listener.getsockname()[1]
client = socket.create_connection(("127.0.0.1", port))
conn, _ = listener.accept()
conn.shutdown(socket.SHUT_WR)  # a lingering close, as Apache's
assert client.recv(10) == b""
{client_close}
while conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != 7:  # TCP_CLOSE
    time.sleep(0.01)
report("port", port)
ready()
go()
try:
    report("read", conn.recv(10) or b"end of file")
except OSError as exc:
    report("read", errno.errorcode[exc.errno].encode())
try:
    conn.send(b"x")
except OSError as exc:
    report("send", errno.errorcode[exc.errno].encode())
again = socket.create_connection(("127.0.0.1", port))
listener.accept()[0].sendall(b"served")
report("again", again.recv(10))
"""


@pytest.mark.parametrize(
    "client_close, read",
    [("client.close()", b"end of file"), (LINGER_ZERO, b"end of file")],
    ids=["fin", "reset"],
)
def test_tcp_connection_that_ended_reads_end_of_file(program, tmp_path, client_close, read):
    """A server's accepted connection that is over while its fd is still open: the
    server shut it for writing, the client closed (FIN) or reset it. Its socket
    holds the listener's port in state CLOSE. Restore bound it to that port again,
    which the restored listener holds: "Address already in use" (Apache, under
    load). It is restored unbound, shut both ways: reads see end of file, writes
    EPIPE, and the listener serves on."""
    prog = program(ENDED_CONNECTION.format(client_close=client_close))
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("read") == read
    assert prog.result("send") == b"EPIPE"
    assert prog.result("again") == b"served"


def test_tcp_connection_that_ended_with_bytes_unread_is_refused(program, tmp_path):
    """The client's last bytes arrived with its FIN after the program shut its side:
    the connection is over, its bytes unread. A fresh socket cannot be given bytes
    to read, so the dump says so instead of dropping them."""
    prog = program(
        ENDED_CONNECTION.split("report(")[0].format(
            client_close='client.sendall(b"late"); client.close()'
        )
        + "ready()\ngo()\nreport('alive', 1)\n"
    )
    refused_at_dump(prog, tmp_path, "TCP connection that ended", "4 bytes not yet read")


@pytest.mark.parametrize("damage", ["drop-window", "queue-as-text", "no-peer", "negative-window"])
def test_tcp_record_of_a_damaged_image_is_refused_in_one_line(program, tmp_path, damage, request):
    """A hostile or damaged connection record (the fd schema leaves socket fields to
    their kind) was met halfway, with a KeyError's traceback: refused before any
    process exists now."""
    from checkpointer.images import format as fmt

    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, (_, port) = server.accept()
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        # No restore will lift the connection's lock: lifted here, or a later
        # connection with the same ports would find its segments dropped.
        lock = (2, ("127.0.0.1", port), ("127.0.0.1", server.getsockname()[1]))
        request.addfinalizer(lambda: netlock.unlock_connections([lock]))
        path = tmp_path / "images" / f"fds-{prog.pid}"
        records = fmt.read_records(str(path))
        rec = next(r for r in records if r.get("tcp_state") == "established")
        if damage == "drop-window":
            del rec["tcp_repair"]["window"]
        elif damage == "queue-as-text":
            rec["tcp_repair"]["recv_queue"] = "text"
        elif damage == "negative-window":  # the right type, out of range: struct.error
            rec["tcp_repair"]["window"][1] = -5
        else:
            rec["sock_peer_addr"] = None
        data = fmt.encode_records(fmt.kind_of_name(path.name), records)
        version = fmt.read_header(str(path))[1]
        path.write_bytes(data[:8] + version.to_bytes(2, "little") + data[10:])
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
        assert_one_line_error(r, "record")
        assert not os.path.exists(f"/proc/{prog.pid}")
        peer.close()


SERVER_CONNECTION = """
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", {port}))
    srv.listen()
    ready()
    c, _ = srv.accept()
    report("accepted", 1)
    go()
    report("reuseaddr", c.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
    time.sleep(1000)
    """


@pytest.mark.parametrize("mode", ["leave-running", "restore"])
def test_tcp_connection_keeps_so_reuseaddr_through_repair_mode(program, tmp_path, mode):
    """Leaving TCP repair mode clears SO_REUSEADDR (the kernel forces reuse while
    in it, and resets it to none after). An accepted connection of a server that set
    it lost it through a dump or a restore; killed later, its FIN_WAIT/TIME_WAIT
    then kept the port from the restarted server's bind for a minute (postgres
    after a --leave-running dump: "Address already in use")."""
    port = free_port()
    prog = program(SERVER_CONNECTION.format(port=port))
    with socket.create_connection(("127.0.0.1", port)):  # open throughout
        prog.result("accepted")
        if mode == "restore":
            dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
            restore(tmp_path / "images")
        else:
            r = cli("dump", "-t", str(prog.pid), "-D", str(tmp_path / "images"),
                    "--tcp-established", "--leave-running")  # fmt: skip
            assert r.returncode == 0, r.stderr
        prog.go()
        assert prog.result("reuseaddr") == b"1"
        os.kill(prog.pid, 9)  # the server side closes first: its socket lingers
        prog.reap()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{prog.pid}"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))  # a restarted server


def _lock_rule(peer_port: int, local_port: int) -> str:
    """What `iptables -S` shows of the lock of a loopback connection."""
    return f"--sport {peer_port} --dport {local_port} -j DROP"


def _lock_rules() -> str:
    return subprocess.run(
        ["iptables", "-w", "-S", "CHECKPOINTER"], capture_output=True, text=True
    ).stdout


# -- real programs -------------------------------------------------------------------------


def fetch(url: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_http_server_serves_the_same_directory(tmp_path):
    """python3 -m http.server: restored, it serves a fresh request from the same
    directory."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "page.txt").write_bytes(b"the same directory\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--directory", str(served)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/page.txt"
        assert fetch(url) == b"the same directory\n"
        dump_and_kill(server.pid, tmp_path / "images", reap=server.wait)
        restore(tmp_path / "images")
        assert fetch(url, timeout=2) == b"the same directory\n"
        assert b"page.txt" in fetch(f"http://127.0.0.1:{port}/")
    finally:
        _kill(server)


def _kill(p: subprocess.Popen) -> None:
    try:
        os.kill(p.pid, 9)
    except ProcessLookupError:
        pass
    if p.returncode is None:
        p.wait()


def _restores_epoll() -> bool:
    from checkpointer.restore.files import KINDS

    return "anon" in KINDS


# auto: the host's tracker (uffd-wp here); soft-dirty runs in the QEMU guests (TCG:
# everything is 10-30x slower there, hence the generous timeouts below).
@pytest.mark.skipif(not HAVE_REDIS, reason="needs redis-server and redis-tools")
@pytest.mark.skipif(not _restores_epoll(), reason="redis needs epoll restore (event-fd work)")
@pytest.mark.parametrize(
    "tracker", [pytest.param("soft-dirty", marks=pytest.mark.softdirty), "auto"]
)
def test_redis_under_load_restored_after_converge(tmp_path, tracker):
    """redis-server with keys, under redis-benchmark, a writer and a kept client:
    converge (--tcp-established) kills it, restore brings it back. Every key
    acknowledged before the dump reads back; the writer's, the kept client's and
    redis-benchmark's connections go on; a new client is served."""
    port = free_port()
    server = start_redis(tmp_path / "redis", port)
    bench = None
    try:
        kept = Resp(port)
        keys = 20_000
        kept.pipeline([("SET", f"key:{i}", f"value-{i}") for i in range(keys)])
        bench = start_benchmark(port)
        acked: list[int] = []
        stop = threading.Event()

        def write() -> None:
            w = Resp(port)
            i = 0
            while not stop.is_set():
                w.call("SET", f"w:{i}", i)
                acked.append(i)
                i += 1
            w.close()

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)
        r = cli("converge", "-t", str(server.pid), "-D", str(tmp_path / "images"),
                "--tcp-established", "--max-iterations", "3", "--tracker", tracker,
                timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr
        at_dump = len(acked)
        server.wait(timeout=60)
        r = cli("restore", "-D", str(tmp_path / "images" / "final"), "-d", timeout=900)
        assert r.returncode == 0, r.stderr
        assert kept.call("PING") == b"PONG"  # the connection kept open across the checkpoint
        values = kept.call("MGET", *(f"key:{i}" for i in range(keys)))
        assert values == [f"value-{i}".encode() for i in range(keys)]
        deadline = time.monotonic() + 120
        while len(acked) < at_dump + 100:  # the writer's connection goes on
            assert time.monotonic() < deadline and writer.is_alive(), "the writer is stuck"
            time.sleep(0.05)
        stop.set()
        writer.join(timeout=30)
        written = kept.call("MGET", *(f"w:{i}" for i in acked))
        assert written == [str(i).encode() for i in acked]
        fresh = Resp(port)
        assert fresh.call("GET", "key:7") == b"value-7"
        before = commands_processed(fresh)
        deadline = time.monotonic() + 60
        while commands_processed(fresh) < before + 1000:
            assert time.monotonic() < deadline, "redis-benchmark's connections stopped"
            time.sleep(0.2)
        fresh.close()
        kept.close()
    finally:
        if bench is not None:
            _kill(bench)
        _kill(server)


# -- more sockets, and what is refused -----------------------------------------------------


def test_unix_connection_not_yet_accepted(program, tmp_path):
    """A client of the tree's own listener, not accepted at the dump: connected
    again at restore, it is accepted afterwards."""
    path = str(tmp_path / "l.sock")
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({path!r})
        u.listen(3)
        c = socket.socket(socket.AF_UNIX)
        c.connect({path!r})
        ready()
        go()
        a, _ = u.accept()
        c.send(b"to the server")
        a.send(b"to the client")
        report("server", a.recv(100))
        report("client", c.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("server") == b"to the server"
    assert prog.result("client") == b"to the client"


def test_unix_dgram_connected_outside_is_connected_again(program, tmp_path):
    path = str(tmp_path / "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(10)
    prog = program(
        f"""
        d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        d.connect({path!r})
        ready()
        go()
        d.send(b"a log line")
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert sink.recv(100) == b"a log line"
    sink.close()


@pytest.mark.parametrize("kind", ["SOCK_DGRAM", "SOCK_SEQPACKET"])
def test_unix_pair_keeps_queued_messages(program, tmp_path, kind):
    prog = program(
        f"""
        a, b = socket.socketpair(socket.AF_UNIX, socket.{kind})
        for m in (b"one", b"two", b"three"):
            a.send(m)
        b.send(b"back")
        ready()
        go()
        report("b", b"|".join(b.recv(100) for _ in range(3)))
        report("a", a.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("b") == b"one|two|three"
    assert prog.result("a") == b"back"


@pytest.mark.parametrize("named_sender", [False, True])
def test_unix_datagram_server_messages(program, tmp_path, named_sender):
    """Messages queued on a named datagram socket come back when their senders had
    no name; a named sender (a reply address) cannot be stood in for: refused,
    counting its messages only (it counted an unnamed sender's too)."""
    path = str(tmp_path / "dgram.sock")
    prog = program(
        f"""
        d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        d.bind({path!r})
        ready()
        go()
        report("alive", 1)
        report("got", b"|".join(d.recv(100) for _ in range(2)))
        """
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        if named_sender:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unnamed:
                unnamed.sendto(b"zero", path)
            client.bind(str(tmp_path / "client.sock"))
        client.sendto(b"first", path)
        client.sendto(b"second", path)
        if named_sender:
            refused_at_dump(prog, tmp_path, "2 of 3 unix dgram messages", "cannot stand in for")
            return
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("got") == b"first|second"


@pytest.mark.parametrize(
    "make, words",
    [
        ("socket.AF_PACKET, socket.SOCK_RAW, 0", "packet socket cannot be dumped"),
        ("socket.AF_INET, socket.SOCK_DGRAM, 136", "inet UDP-Lite socket cannot be dumped"),
        (
            "socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP",
            "inet raw socket cannot be dumped",
        ),
    ],
)
def test_other_sockets_are_refused(program, tmp_path, make, words):
    prog = program(
        f"""
        n = socket.socket({make})
        ready()
        go()
        report("alive", 1)
        """
    )
    refused_at_dump(prog, tmp_path, words)


@pytest.fixture
def ping_sockets():
    """Unprivileged ICMP echo sockets (as ping uses them) for root's group, as the
    net.ipv4.ping_group_range of most distributions allows; put back after."""
    path = "/proc/sys/net/ipv4/ping_group_range"
    old = open(path).read()
    with open(path, "w") as f:
        f.write("0 0")
    yield
    with open(path, "w") as f:
        f.write(old)


def test_ping_socket_stays_a_ping_socket(program, tmp_path, ping_sockets):
    """An ICMP echo socket (SOCK_DGRAM, IPPROTO_ICMP) came back as a UDP socket
    and its echo requests went nowhere."""
    prog = program(
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        s.settimeout(5)
        def ping(seq):
            s.sendto(bytes([8, 0, 0, 0, 0, 0, 0, seq]) + b"payload", ("127.0.0.1", 0))
            return s.recv(100)[7]
        report("before", ping(1))
        ready()
        go()
        report("after", (s.proto, ping(2)))
        """
    )
    assert prog.result("before") == b"1"
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert prog.result("after") == repr((socket.IPPROTO_ICMP, 2)).encode()


# -- netlink --------------------------------------------------------------------------------

ADDRESS = "127.0.0.77"  # put on lo and taken off again: an event for address monitors


@pytest.fixture
def address_event():
    """add(): puts ADDRESS on lo (RTM_NEWADDR to every listener of the group)."""
    added = []

    def add():
        subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
        added.append(1)

    yield add
    if added:
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=False)


NETLINK_PROGRAM = """
    import struct
    RTNLGRP_IPV4_IFADDR, SOL_NETLINK, LIST, NO_ENOBUFS = 5, 270, 9, 5
    def state(s):
        bits = int.from_bytes(s.getsockopt(SOL_NETLINK, LIST, 64), "little")
        return (s.getsockname(), [n + 1 for n in range(512) if bits >> n & 1],
                s.getsockopt(SOL_NETLINK, NO_ENOBUFS),
                s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    monitor = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    monitor.setsockopt(SOL_NETLINK, NO_ENOBUFS, 1)
    monitor.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)  # SO_RCVBUFFORCE
    monitor.bind((0, 1 << (RTNLGRP_IPV4_IFADDR - 1)))
    monitor.setsockopt(SOL_NETLINK, 1, 33)  # a group past the 32 bind() takes
    query = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    report("before", (state(monitor), state(query)))
    ready()
    go()
    report("after", (state(monitor), state(query)))
    # RTM_GETADDR (22), a dump of every IPv4 address, from the socket never bound
    query.send(struct.pack("=LHHLLBxxxL", 24, 22, 0x301, 1, 0, socket.AF_INET, 0))
    answer, done = b"", False
    while not done:
        part = query.recv(1 << 16)
        answer += part
        off = 0
        while off < len(part):
            length, kind = struct.unpack_from("=LH", part, off)
            done = done or kind == 3  # NLMSG_DONE
            off += (length + 3) & ~3
    report("dumped", socket.inet_aton("127.0.0.1") in answer)
    report("event", monitor.recv(1 << 16))
"""


def test_netlink_sockets_keep_port_groups_flags_and_work(program, tmp_path, address_event):
    """A route monitor (groups, one past 32; NO_ENOBUFS; a forced receive buffer)
    and a query socket: both come back as they were, the monitor gets the next
    address event and the query socket answers a dump. They were refused before."""
    prog = program(NETLINK_PROGRAM)
    before = prog.result("before")
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    address_event()
    prog.go()
    assert prog.result("after") == before
    assert prog.result("dumped") == b"True"
    assert socket.inet_aton(ADDRESS) in prog.result("event")


def test_netlink_messages_queued_unread_are_refused(program, tmp_path, address_event):
    """The kernel's messages cannot be queued again: the dump refuses and names
    it, and the program keeps them."""
    prog = program(
        """
        monitor = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        monitor.bind((0, 1 << 4))
        ready()
        go()
        report("alive", 1)
        """
    )
    address_event()
    refused_at_dump(prog, tmp_path, "netlink messages are queued")


def test_ip_monitor_sees_events_after_restore(tmp_path, address_event):
    """`ip monitor address`, a real netlink listener, reports an address added
    after its restore."""
    out = tmp_path / "monitor.out"
    with open(out, "wb") as f:
        p = subprocess.Popen(["ip", "-o", "monitor", "address"], stdout=f,
                             stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        time.sleep(0.5)
        dump_and_kill(p.pid, tmp_path / "images", reap=p.wait)
        restore(tmp_path / "images")
        address_event()
        wait_until(lambda: ADDRESS in out.read_text(), "the event in ip monitor's output")
    finally:
        subprocess.run(["kill", "-9", str(p.pid)], check=False)


def test_tcp_shut_for_writing_by_the_program_goes_on(program, tmp_path):
    """shutdown(SHUT_WR) by the program, its FIN acked (FIN_WAIT2): it was refused
    at dump even with the flag. Restored, the peer still answers and the program
    reads the answer, then end of file."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(
            f"""
            c = socket.create_connection(("127.0.0.1", {server.getsockname()[1]}))
            c.sendall(b"question")
            c.shutdown(socket.SHUT_WR)
            ready()
            go()
            got = b""
            while chunk := c.recv(100):
                got += chunk
            report("got", got)
            """
        )
        peer, _ = server.accept()
        peer.settimeout(10)
        assert peer.recv(100) == b"question" and peer.recv(10) == b""  # then its FIN
        wait_until(lambda: _tcp_state_of(prog.pid) == "fin-wait2", "FIN_WAIT2")
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        restore(tmp_path / "images")
        prog.go()
        peer.sendall(b"answer")
        peer.close()
        assert prog.result("got") == b"answer"


# A client that, with `fill`, writes until the peer (not reading) takes no more.
CONNECT_AND_FILL = """
    c = socket.create_connection(("127.0.0.1", {port}))
    c.setblocking(False)
    sent = 0
    try:
        while {fill}:
            sent += c.send(bytes([sent % 251]) * 65536)
    except BlockingIOError:
        pass
"""


def _filling_client(port: int, fill: bool) -> str:
    return textwrap.dedent(CONNECT_AND_FILL.format(port=port, fill=fill))


def _filled_with(sent: int) -> bytes:
    """What CONNECT_AND_FILL wrote (only its last write can be short)."""
    return b"".join(bytes([n % 251]) * 65536 for n in range(0, sent, 65536))[:sent]


def test_tcp_fin_waiting_behind_unsent_bytes_goes_out_after_them(program, tmp_path):
    """The program wrote more than the peer would take, then shut down writing:
    its FIN waits behind the unsent bytes (FIN_WAIT1). Restored, the peer reads
    every byte, then end of file."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(
            _filling_client(server.getsockname()[1], True)
            + textwrap.dedent("""
            c.shutdown(socket.SHUT_WR)
            report("sent", sent)
            ready()
            go()
            """)
        )
        peer, _ = server.accept()
        sent = int(prog.result("sent"))
        assert _tcp_state_of(prog.pid) == "fin-wait1"
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        restore(tmp_path / "images")
        peer.settimeout(10)
        got = bytearray()
        while chunk := peer.recv(1 << 20):
            got += chunk
        assert got == _filled_with(sent)  # then end of file
        prog.go()
        peer.close()


@pytest.mark.parametrize("direction", ["to-peer", "from-peer"])
def test_tcp_connection_with_megabytes_queued(program, tmp_path, direction):
    """Megabytes queued on an established connection (a slow reader of a big
    reply, or a program that has not read yet): the dumped socket's buffers had
    grown to hold them, the new one's had not, and the restore waited forever
    writing the queue back."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(
            _filling_client(server.getsockname()[1], direction == "to-peer")
            + textwrap.dedent("""
            report("sent", sent)
            ready()
            go()
            c.setblocking(True)
            got = bytearray()
            while chunk := c.recv(1 << 20):
                got += chunk
            report("got", (len(got), got == bytes(i % 199 for i in range(len(got)))))
            """)
        )
        peer, _ = server.accept()
        peer.setblocking(False)
        pushed = 0
        if direction == "from-peer":
            pattern = bytes(i % 199 for i in range(1 << 24))
            try:
                while True:
                    pushed += peer.send(pattern[pushed : pushed + 65536])
            except BlockingIOError:
                pass
            time.sleep(0.2)
        sent = int(prog.result("sent"))
        assert max(sent, pushed) > 1 << 20
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        restore(tmp_path / "images")
        prog.go()
        peer.settimeout(10)
        got = bytearray()
        while len(got) < sent:
            got += peer.recv(1 << 20)
        assert got == _filled_with(sent)
        peer.close()
        assert prog.result("got") == repr((pushed, True)).encode()


@pytest.mark.parametrize("blocking", [True, False])
def test_tcp_connect_in_progress_completes_after_restore(program, tmp_path, blocking):
    """A connect whose SYN is unanswered (a backend down, a lost packet: SYN_SENT)
    was refused at dump. Restored, it starts again from its port, and completes
    once the peer answers: in a connect() the program was blocked in, issued
    again, or one it polls for."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        rule = ["INPUT", "-i", "lo", "-p", "tcp", "--syn", "--dport", str(port), "-j", "DROP"]
        subprocess.run(["iptables", "-I", *rule], check=True)
        try:
            prog = program(
                f"""
                import select
                c = socket.socket()
                ready()
                if {blocking!r}:
                    c.connect(("127.0.0.1", {port}))
                else:
                    c.setblocking(False)
                    c.connect_ex(("127.0.0.1", {port}))
                    select.select([], [c], [])
                    c.setblocking(True)
                c.sendall(b"through")
                report("done", c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                """
            )
            wait_until(lambda: _tcp_state_of(prog.pid) == "syn-sent", "SYN_SENT")
            dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
            restore(tmp_path / "images")
        finally:
            subprocess.run(["iptables", "-D", *rule], check=True)
        server.settimeout(20)  # the next SYN goes after the kernel's backoff (1 s, 2 s)
        peer, _ = server.accept()
        peer.settimeout(10)
        assert peer.recv(100) == b"through"
        assert prog.result("done", timeout=20) == b"0"
        peer.close()


def _tcp_state_of(pid: int) -> str:
    """The state of the one TCP socket of process pid (in the dump's names)."""
    from checkpointer.fdstate.socket import TCP_STATES

    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
            with socket.socket(fileno=sockets.copy_fd(pid, int(fd))) as s:
                if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM:
                    return TCP_STATES[sockets.tcp_state(s)]
    raise AssertionError("no TCP socket")


def test_fifo_gone_at_restore_is_refused(program, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    prog = program(
        f"""
        r = os.open({str(fifo)!r}, os.O_RDWR)
        ready()
        go()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    fifo.unlink()
    r = cli("restore", "-D", str(tmp_path / "images"), "-d")
    assert_one_line_error(r, str(fifo), "No such file")
    assert not os.path.exists(f"/proc/{prog.pid}")


def dumped_unix_listener(program, tmp_path):
    """A program listening on tmp_path/l.sock, dumped (killed), its socket file
    removed; (program, path). Once let go it reports "alive"."""
    path = tmp_path / "l.sock"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({str(path)!r})
        u.listen(1)
        ready()
        go()
        report("alive", 1)
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    path.unlink()
    return prog, path


def test_unix_listener_path_taken_by_a_file_is_refused(program, tmp_path):
    prog, path = dumped_unix_listener(program, tmp_path)
    path.write_text("not a socket")
    r = cli("restore", "-D", str(tmp_path / "images"), "-d")
    assert_one_line_error(r, str(path), "not a socket")
    assert not os.path.exists(f"/proc/{prog.pid}")


def test_unix_listener_path_a_live_socket_holds_is_refused(program, tmp_path):
    """A program started again on the path meanwhile keeps it: the restore took it
    over (unlinked its socket file and bound its own), leaving it unreachable."""
    prog, path = dumped_unix_listener(program, tmp_path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(1)
        r = cli("restore", "-D", str(tmp_path / "images"), "-d")
        assert_one_line_error(r, str(path), "a live unix socket is bound to it")
        assert not os.path.exists(f"/proc/{prog.pid}")
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # still the other program's
    restore(tmp_path / "images")  # its file is stale now: replaced
    prog.go()
    assert prog.result("alive") == b"1"


def test_tcp_established_on_a_dual_stack_server(program, tmp_path):
    """An IPv4 client of a dual-stack IPv6 listener: the accepted connection's
    addresses are IPv4-mapped; it is locked as IPv4 and rebuilt as IPv6."""
    prog = program(
        """
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        s.listen(1)
        report("port", s.getsockname()[1])
        ready()
        c, _ = s.accept()
        report("accepted", 1)
        go()
        got = b""
        while not got.endswith(b"|end"):
            got += c.recv(100)
        c.sendall(got.upper())
        """
    )
    port = int(prog.result("port"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        prog.result("accepted")
        dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
        rule = f"-s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m tcp --sport {client.getsockname()[1]}"
        assert rule in _lock_rules()  # an IPv4 rule: the packets are IPv4
        client.sendall(b"across|end")
        restore(tmp_path / "images")
        prog.go()
        got = b""
        while not got.endswith(b"|END"):
            got += client.recv(100)
        assert got == b"ACROSS|END"


def test_tcp_connection_inside_the_tree(program, tmp_path):
    """Both ends of a loopback connection in the dumped program, bytes queued both
    ways: both rebuilt in repair mode."""
    prog = program(
        """
        s = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(s.getsockname())
        a, _ = s.accept()
        c.sendall(b"to a")
        a.sendall(b"to c")
        time.sleep(0.1)
        ready()
        go()
        report("a", a.recv(100))
        report("c", c.recv(100))
        a.sendall(b"again")
        report("again", c.recv(100))
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", "--tcp-established", reap=prog.reap)
    restore(tmp_path / "images")
    prog.go()
    assert (prog.result("a"), prog.result("c"), prog.result("again")) == (
        b"to a", b"to c", b"again",
    )  # fmt: skip


def test_tcp_established_without_cap_net_admin_is_refused(program, tmp_path):
    """Root without CAP_NET_ADMIN can trace, but not repair or lock a connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        prog = program(CLIENT.format(port=server.getsockname()[1]))
        peer, _ = server.accept()
        r = subprocess.run(
            ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--",
             *CLI, "dump", "-t", str(prog.pid), "-D", str(tmp_path / "images"),
             "--tcp-established"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert_one_line_error(r, f"process {prog.pid}", "needs CAP_NET_ADMIN")
        prog.go()
        peer.sendall(b"still connected|end")
        assert prog.result("got") == b"still connected|end"
        peer.close()


def test_unix_listener_with_an_abstract_name(program, tmp_path):
    name = f"\0checkpointer-test-{os.getpid()}-{time.monotonic_ns()}"
    prog = program(
        f"""
        u = socket.socket(socket.AF_UNIX)
        u.bind({name!r})
        u.listen(2)
        ready()
        while True:
            c, _ = u.accept()
            c.send(b"abstract")
            c.close()
        """
    )
    dump_and_kill(prog.pid, tmp_path / "images", reap=prog.reap)
    restore(tmp_path / "images")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(name)
        assert c.recv(100) == b"abstract"
