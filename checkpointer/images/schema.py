"""Record schemas, per format version: the fields every record kind must carry.

Records may carry extra fields (ignored by readers); the listed ones are required.
Version 2 is version 1 plus the fields a restore needs (images/README.md).
`check(kind, record, where, version=...)` raises ImageError naming the first bad field.
"""

from __future__ import annotations

from checkpointer.errors import ImageError
from checkpointer.images.format import FORMAT_VERSION

INT = "int"
STR = "str"
BOOL = "bool"
NUM = "num"  # int or float
BYTES = "bytes"
ANY = "any"


def opt(t):
    return ("opt", t)


def list_of(t, n=None):
    return ("list", t, n)


def map_of(t):
    return ("map", t)


def enum(*values):
    return ("enum", values)


def bytes_of(n):
    return ("bytes", n)


WHERE = ("here", "parent", "zero", "same")
VMA_KINDS = (
    "anon", "heap", "stack", "file", "file-private", "shared-anon", "shm",
    "memfd", "vdso", "vvar", "vsyscall", "special",
)  # fmt: skip

SCHEMAS_V1: dict[str, dict] = {
    "inventory": {
        "format_version": INT,
        "tool_version": STR,
        "kind": enum("dump", "pre-dump"),
        "parent": opt(STR),
        "tracker": STR,
        "kernel": STR,
        "page_size": INT,
        "created": NUM,
        "root_pid": INT,
        "pids": list_of(INT),
        "start_times": map_of(INT),
        "complete": BOOL,
        "tracking": map_of(ANY),
        "usable_as_parent": BOOL,
    },
    "pstree": {"pid": INT, "ppid": INT, "pgid": INT, "sid": INT, "threads": list_of(INT)},
    "process": {
        "pid": INT,
        "comm": STR,
        "state": STR,
        "personality": INT,
        "creds": {
            "uid": list_of(INT, 4),
            "gid": list_of(INT, 4),
            "groups": list_of(INT),
            "cap_inh": INT,
            "cap_prm": INT,
            "cap_eff": INT,
            "cap_bnd": INT,
            "cap_amb": INT,
        },
        "rlimits": map_of(list_of(INT, 2)),
        "sigignore": INT,
        "sigcatch": INT,
    },
    "thread": {
        "tid": INT,
        "regs": map_of(INT),
        "xstate": BYTES,
        "blocked": INT,
        "pending": INT,
        "shared_pending": INT,
        "state": STR,
    },
    "mm": {
        "start_code": INT,
        "end_code": INT,
        "start_data": INT,
        "end_data": INT,
        "start_brk": INT,
        "brk": INT,
        "start_stack": INT,
        "arg_start": INT,
        "arg_end": INT,
        "env_start": INT,
        "env_end": INT,
        "exit_code": INT,
        "auxv": BYTES,
        "exe": opt(STR),
        "cwd": opt(STR),
        "root": opt(STR),
    },
    "vma": {
        "start": INT,
        "end": INT,
        "prot": STR,
        "offset": INT,
        "dev": STR,
        "inode": INT,
        "path": STR,
        "kind": enum(*VMA_KINDS),
        "vmflags": list_of(STR),
        "shmem": opt(STR),
    },
    "fd": {
        "fd": INT,
        "target": STR,
        "pos": INT,
        "flags": INT,
        "type": enum("file", "dir", "pipe", "socket", "anon", "tty", "other"),
        "mnt_id": INT,
    },
    "stats": {
        "freezing_time": INT,
        "frozen_time": INT,
        "memdump_time": INT,
        "memwrite_time": INT,
        "pages_scanned": INT,
        "pages_written": INT,
        "pages_skipped_parent": INT,
        "pages_zero": INT,
        "bytes_raw": INT,
        "bytes_compressed": INT,
        "tracker": STR,
        "iteration": opt(INT),
    },
    "pagemap_head": {
        "owner": STR,
        "page_size": INT,
        "frame_size": INT,
        "nr_frames": INT,
        "nr_runs": INT,
        "pages_here": INT,
        "pages_parent": INT,
        "pages_zero": INT,
        "bytes_raw": INT,
        "bytes_compressed": INT,
    },
    "frame": {"off": INT, "clen": INT, "rlen": INT},
    "run": {"addr": INT, "nr": INT, "where": enum(*WHERE), "off": opt(INT)},
}


# A file's identity, from stat(2): tells the file a restore finds from the one dumped.
FILE_ID = {"dev": INT, "ino": INT, "mode": INT, "size": INT, "mtime_ns": INT}
SIGINFO = bytes_of(128)  # a kernel siginfo_t as PTRACE_PEEKSIGINFO returns it

# Version 2 adds, per record kind, what a restore needs (images/README.md, "version 2").
V2_FIELDS: dict[str, dict] = {
    "process": {
        "sigactions": list_of(
            {"sig": INT, "handler": INT, "flags": INT, "restorer": INT, "mask": INT}
        ),
        "itimers": {n: list_of(INT, 2) for n in ("real", "virtual", "prof")},
        "umask": INT,
        "prctl": {
            n: INT
            for n in (
                "dumpable",
                "pdeathsig",
                "child_subreaper",
                "no_new_privs",
                "thp_disable",
                "securebits",
            )
        },  # fmt: skip
        "seccomp": INT,
        "shared_siginfo": list_of(SIGINFO),
    },
    "thread": {
        "tid_address": INT,
        "robust_list": list_of(INT, 2),
        "rseq": {"ptr": INT, "size": INT, "sig": INT},
        "sigaltstack": {"sp": INT, "flags": INT, "size": INT},
        "siginfo": list_of(SIGINFO),
        "comm": STR,
    },
    "mm": {"exe_stat": opt(FILE_ID)},
    "vma": {"deleted": BOOL, "stat": opt(FILE_ID)},
    "fd": {
        "cloexec": BOOL,
        "deleted": BOOL,
        "stat": opt(FILE_ID),
        # v2 tells a FIFO (a path) from a regular file
        "type": enum("file", "dir", "pipe", "fifo", "socket", "anon", "tty", "other"),
    },
}

SCHEMAS_V2: dict[str, dict] = {
    kind: {**spec, **V2_FIELDS.get(kind, {})} for kind, spec in SCHEMAS_V1.items()
}
SCHEMAS_BY_VERSION: dict[int, dict[str, dict]] = {1: SCHEMAS_V1, 2: SCHEMAS_V2}
SCHEMAS = SCHEMAS_BY_VERSION[FORMAT_VERSION]  # the version this checkpointer writes


_STR_LIST = list_of(STR)


def check(
    kind: str, record, where: str | None, what: str | None = None, version: int = FORMAT_VERSION
) -> dict:
    """Validate one record against the schema of `kind` in format `version`; return it."""
    _check(SCHEMAS_BY_VERSION[version][kind], record, where, what or kind)
    return record


def _fail(where, path, msg):
    raise ImageError(f"{path}: {msg}", where)


def _check(spec, value, where, path):
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            _fail(where, path, f"expected a map, found {_tname(value)}")
        for key, sub in spec.items():
            if key not in value:
                _fail(where, path, f"missing field {key!r}")
            v = value[key]
            # The common fields pass here, without a call or a path string (a
            # process may have tens of thousands of VMA records); the rest, and
            # every failure, go through _check, which names the field.
            if type(sub) is str:
                if sub == INT:
                    ok = type(v) is int and -(1 << 63) <= v < (1 << 64)
                else:
                    ok = (sub == STR and type(v) is str) or (sub == BOOL and type(v) is bool)
            elif type(sub) is not tuple:  # a nested map
                ok = False
            elif sub[0] == "opt":
                ok = v is None
            elif sub[0] == "enum":
                ok = type(v) is str and v in sub[1]
            else:
                ok = sub == _STR_LIST and type(v) is list and all(type(x) is str for x in v)
            if not ok:
                _check(sub, v, where, f"{path}.{key}")
        return
    if spec == INT:
        if type(value) is not int:
            _fail(where, path, f"expected an integer, found {_tname(value)}")
        if not -(1 << 63) <= value < (1 << 64):
            _fail(where, path, "integer out of 64-bit range")
    elif spec == STR:
        if type(value) is not str:
            _fail(where, path, f"expected a string, found {_tname(value)}")
    elif spec == BOOL:
        if type(value) is not bool:
            _fail(where, path, f"expected a boolean, found {_tname(value)}")
    elif spec == NUM:
        if type(value) not in (int, float):
            _fail(where, path, f"expected a number, found {_tname(value)}")
    elif spec == BYTES:
        if not isinstance(value, bytes | bytearray):
            _fail(where, path, f"expected bytes, found {_tname(value)}")
    elif spec == ANY:
        _check_any(value, where, path, 0)
    elif spec[0] == "bytes":
        if not isinstance(value, bytes | bytearray):
            _fail(where, path, f"expected bytes, found {_tname(value)}")
        if len(value) != spec[1]:
            _fail(where, path, f"expected {spec[1]} bytes, found {len(value)}")
    elif spec[0] == "opt":
        if value is not None:
            _check(spec[1], value, where, path)
    elif spec[0] == "enum":
        if value not in spec[1] or type(value) is not str:
            _fail(where, path, f"unexpected value {_short(value)}")
    elif spec[0] == "list":
        if not isinstance(value, list | tuple):
            _fail(where, path, f"expected a list, found {_tname(value)}")
        if spec[2] is not None and len(value) != spec[2]:
            _fail(where, path, f"expected {spec[2]} items, found {len(value)}")
        for i, v in enumerate(value):
            _check(spec[1], v, where, f"{path}[{i}]")
    elif spec[0] == "map":
        if not isinstance(value, dict):
            _fail(where, path, f"expected a map, found {_tname(value)}")
        for k, v in value.items():
            if type(k) is not str:
                _fail(where, path, f"map key {_short(k)} is not a string")
            _check(spec[1], v, where, f"{path}[{k[:40]!r}]")
    else:  # pragma: no cover
        raise AssertionError(spec)


def _check_any(value, where, path, depth) -> None:
    """Free-form values: what msgpack round-trips and readers accept (str map keys)."""
    if depth > 32:
        _fail(where, path, "nested too deeply")
    if value is None or type(value) in (bool, float, str, bytes):
        return
    if type(value) is int:
        if not -(1 << 63) <= value < (1 << 64):
            _fail(where, path, "integer out of 64-bit range")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_any(v, where, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                _fail(where, path, f"map key {_short(k)} is not a string")
            _check_any(v, where, f"{path}[{k[:40]!r}]", depth + 1)
    else:
        _fail(where, path, f"unsupported value type {type(value).__name__}")


def _tname(v) -> str:
    return {
        "NoneType": "nil",
        "dict": "map",
        "list": "list",
        "bytes": "bytes",
        "str": "string",
        "int": "integer",
    }.get(type(v).__name__, type(v).__name__)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
