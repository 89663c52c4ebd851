"""Hostile images: every reader ends in a one-line ImageError, with bounded memory."""

import os
import shutil
import subprocess
import sys
import tempfile

import msgpack
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpointer.errors import ImageError, UnsupportedVersion
from checkpointer.images import Dump
from checkpointer.images import format as fmt
from checkpointer.images.fuzzing import exercise_dir, exercise_file
from checkpointer.images.inspect import decode, info, show, verify
from checkpointer.images.resolve import resolve

# Every test here damages images on purpose.
pytestmark = pytest.mark.damages_images


GOLDEN = os.path.join(os.path.dirname(__file__), "..", "images", "golden", "chain")
# files of the top dump and of its oldest ancestor (reached through the chain)
FILES = [f"{n}/{f}" for n in ("3", "1") for f in sorted(os.listdir(os.path.join(GOLDEN, n)))]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def chain(tmp_path):
    dst = tmp_path / "chain"
    shutil.copytree(GOLDEN, dst, ignore=shutil.ignore_patterns("*.json"))
    return dst


def _rewrite_inventory(path, **changes):
    inv = fmt.read_records(os.path.join(path, "inventory"))[0]
    inv.update(changes)
    os.chmod(path, 0o700)
    with open(os.path.join(path, "inventory"), "wb") as f:
        f.write(fmt.encode_records("inventory", [inv]))


# ---- headers ----


def test_bad_magic_truncated_and_unknown_version(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"ELF\0" * 8)
    with pytest.raises(ImageError, match="bad magic"):
        info(str(p))
    p.write_bytes(fmt.MAGIC[:5])
    with pytest.raises(ImageError, match="truncated header"):
        decode(str(p))
    p.write_bytes(fmt.HEADER.pack(fmt.MAGIC, 7, 1, 0) + b"junk")
    with pytest.raises(UnsupportedVersion) as e:
        decode(str(p))
    assert str(e.value) == (
        f"{p}: unsupported image format version 7 (this checkpointer reads 1 and 2)"
    )


def test_unknown_version_in_inventory(chain):
    _rewrite_inventory(chain / "3", format_version=3)
    with pytest.raises(UnsupportedVersion, match="version 3 .this checkpointer reads 1 and 2"):
        Dump.open(str(chain / "3"))


def test_version_must_agree_across_a_dumps_files(chain):
    # A version 1 inventory over version 2 records would read them with the wrong schema.
    _rewrite_inventory(chain / "3", format_version=1)
    with pytest.raises(ImageError, match="inventory says format version 1, its file header 2"):
        Dump.open(str(chain / "3"))
    _rewrite_inventory(chain / "3", format_version=2)
    core = chain / "3" / "core-100"
    data = bytearray(core.read_bytes())
    data[8:10] = (1).to_bytes(2, "little")
    core.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="core-100: file is format version 1, its dump's"):
        Dump.open(str(chain / "3")).core(100)
    with pytest.raises(ImageError, match="file is format version 1"):
        verify(str(chain / "3"))


def test_version_2_requires_its_fields(chain):
    path = chain / "3" / "core-100"
    recs = fmt.read_records(str(path))
    del recs[1]["tid_address"]
    path.write_bytes(fmt.encode_records("core", recs))
    with pytest.raises(ImageError, match=r"thread\[0\]: missing field 'tid_address'"):
        Dump.open(str(chain / "3")).core(100)
    recs[1]["tid_address"] = 0
    recs[0]["shared_siginfo"] = [b"short"]
    path.write_bytes(fmt.encode_records("core", recs))
    with pytest.raises(ImageError, match=r"shared_siginfo\[0\]: expected 128 bytes, found 5"):
        Dump.open(str(chain / "3")).core(100)


def test_header_kind_must_match_file(chain):
    shutil.copy(chain / "3" / "pstree", chain / "3" / "stats")
    with pytest.raises(ImageError, match="expected a stats file, found pstree"):
        _ = Dump.open(str(chain / "3")).stats


# ---- bombs and absurd lengths ----


def _record_file(path, body: bytes, kind="pstree"):
    cctx = zstd.ZstdCompressor(level=1, write_checksum=True)
    with open(path, "wb") as f:
        f.write(fmt.pack_header(kind) + cctx.compress(body))


def test_absurd_msgpack_lengths(tmp_path):
    p = str(tmp_path / "pstree")
    for body in (b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff"):
        _record_file(p, body)
        with pytest.raises(ImageError, match="corrupt record stream|truncated record"):
            decode(p)


def test_wrong_record_types(chain):
    _record_file(str(chain / "3" / "pstree"), msgpack.packb([1, 2, 3]))
    with pytest.raises(ImageError, match=r"pstree\[0\]: expected a map, found list"):
        Dump.open(str(chain / "3"))
    _record_file(str(chain / "3" / "pstree"), msgpack.packb({"pid": "100"}))
    with pytest.raises(ImageError, match="missing field 'ppid'|expected an integer"):
        Dump.open(str(chain / "3"))


BOMB = r"""
import resource, sys, zstandard as zstd
sys.path.insert(0, sys.argv[1])
from checkpointer.images import format as fmt
from checkpointer.images.inspect import decode
from checkpointer.errors import ImageError
path = sys.argv[2]
cobj = zstd.ZstdCompressor(level=1, write_checksum=True).compressobj(size=(1 << 30) + 5)
zeros = bytes(1 << 20)
with open(path, "wb") as f:
    f.write(fmt.pack_header("pstree"))
    f.write(cobj.compress(b"\xc6\x3f\xff\xff\xff"))  # bin32 of ~1 GiB
    for _ in range(1024):
        f.write(cobj.compress(zeros))
    f.write(cobj.flush())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode(path)
except ImageError as e:
    print(e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_decompression_bomb_bounded(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(
        [sys.executable, "-c", BOMB, root, str(tmp_path / "pstree")],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    msg, grew = out.stdout.strip().splitlines()
    assert "corrupt record stream" in msg or "decompressed content exceeds" in msg
    assert int(grew) < 100 * 1024  # KiB: never near the 1 GiB the frame claims


def test_page_frame_bigger_than_index_says(chain):
    d3 = chain / "3"
    pm = fmt.read_records(str(d3 / "pagemap-pid-100"))
    data = zstd.ZstdCompressor(write_checksum=True).compress(bytes(64 << 10))
    with open(d3 / "pages-pid-100", "wb") as f:
        f.write(fmt.pack_header("pages") + data)
    pm[1]["clen"] = len(data)
    with open(d3 / "pagemap-pid-100", "wb") as f:
        f.write(fmt.encode_records("pagemap", pm))
    with pytest.raises(ImageError, match="holds more than 4096 bytes"):
        Dump.open(str(d3)).read_memory(100, 0x11000, 16)


def test_page_frame_without_checksum_is_refused(chain):
    d3 = chain / "3"
    pm = fmt.read_records(str(d3 / "pagemap-pid-100"))
    data = zstd.ZstdCompressor(write_checksum=False).compress(b"\x07" * 4096)
    with open(d3 / "pages-pid-100", "wb") as f:
        f.write(fmt.pack_header("pages") + data)
    pm[1]["clen"] = len(data)
    with open(d3 / "pagemap-pid-100", "wb") as f:
        f.write(fmt.encode_records("pagemap", pm))
    with pytest.raises(ImageError, match="page frame at offset 16 has no content checksum"):
        Dump.open(str(d3)).read_memory(100, 0x11000, 16)


# every record file of a dump, and of its parent reached through the chain
RECORD_FILES = [
    "3/inventory", "3/pstree", "3/core-100", "3/mm-100", "3/fds-100", "3/pagemap-pid-100",
    "3/stats", "1/core-101",
]  # fmt: skip


@pytest.mark.parametrize("name", RECORD_FILES)
@pytest.mark.parametrize("cut", [1, 4])
def test_record_file_with_its_checksum_cut_is_refused(chain, name, cut):
    path = chain / name
    path.write_bytes(path.read_bytes()[:-cut])
    for read in (verify, decode):
        with pytest.raises(ImageError, match="truncated zstd checksum") as e:
            read(str(chain / "3") if read is verify else str(path))
        assert str(e.value).startswith(f"{path}: ")


def test_record_file_changed_and_its_checksum_cut_is_refused(chain):
    # Byte 76 flipped still decodes to valid records of the same length but other
    # content: only the checksum, cut here, tells.
    path = chain / "3" / "core-100"
    data = bytearray(path.read_bytes())
    data[76] ^= 1
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(ImageError, match="truncated zstd checksum"):
        Dump.open(str(chain / "3")).core(100)


def test_record_file_without_content_size_or_checksum_is_refused(tmp_path):
    p = str(tmp_path / "pstree")
    body = msgpack.packb({"pid": 1})
    for cctx, words in (
        (zstd.ZstdCompressor(write_checksum=False), "no content checksum"),
        (zstd.ZstdCompressor(write_checksum=True, write_content_size=False), "no content size"),
    ):
        with open(p, "wb") as f:
            f.write(fmt.pack_header("pstree") + cctx.compress(body))
        with pytest.raises(ImageError, match=words):
            decode(p)


# ---- parent links ----


@pytest.mark.parametrize(
    "link, msg",
    [
        ("/etc", "is not a relative path"),
        ("../../..", "leaves"),
        ("../../../tmp", "leaves"),
        ("../3", "forms a cycle"),
        (".", "forms a cycle"),
        ("", "is not a relative path"),
        ("../nonexistent", "no such dump directory"),
    ],
)
def test_bad_parent_links(chain, link, msg):
    _rewrite_inventory(chain / "2", parent=link)
    with pytest.raises(ImageError, match=msg):
        Dump.open(str(chain / "3")).chain()
    with pytest.raises(ImageError, match=msg):
        verify(str(chain / "3"))


def test_cycle_and_escape_via_symlinks(chain, tmp_path):
    os.symlink("3", chain / "loop")
    _rewrite_inventory(chain / "1", parent="../loop")
    with pytest.raises(ImageError, match="forms a cycle"):
        Dump.open(str(chain / "3")).chain()
    outside = tmp_path / "outside"
    shutil.copytree(chain / "1", outside)
    os.symlink(str(outside), chain / "escape")
    _rewrite_inventory(chain / "1", parent=None)
    _rewrite_inventory(chain / "2", parent="../escape")
    with pytest.raises(ImageError, match="leaves"):
        Dump.open(str(chain / "3")).chain()


def test_parent_flagged_page_missing_from_ancestors(chain):
    # dump 2 no longer holds pid-101's pages: dump 3 flags one as parent
    for n in ("1", "2"):
        os.unlink(chain / n / "pagemap-pid-101")
        os.unlink(chain / n / "pages-pid-101")
    with pytest.raises(ImageError, match=r"pid-101 pages 0x10000-0x11000 .* no ancestor holds"):
        verify(str(chain / "3"))


def _make_same(path, same_as, addr):
    """Turn the parent run at `addr` of a pagemap into a same run naming `same_as`."""
    recs = fmt.read_records(str(path))
    head, runs = recs[0], recs[1 + recs[0]["nr_frames"] :]
    run = next(r for r in runs if r["addr"] == addr and r["where"] == "parent")
    run["where"] = "same"
    head["pages_parent"] -= run["nr"]
    head["pages_same"] = head.get("pages_same", 0) + run["nr"]
    if same_as is not None:
        head["same_as"] = same_as
    os.chmod(path.parent, 0o700)
    path.write_bytes(fmt.encode_records("pagemap", recs))


@pytest.mark.parametrize(
    "same_as, words",
    [
        (None, "same runs name no other owner"),
        ("pid-101", "same runs name no other owner"),  # itself
        ("pid-7", r"pid-101 pages 0x10000-0x11000 are flagged as the same as pid-7's"),
    ],
)
def test_same_runs_must_name_an_owner_that_holds_them(chain, same_as, words):
    _make_same(chain / "3" / "pagemap-pid-101", same_as, 0x10000)
    with pytest.raises(ImageError, match=words):
        verify(str(chain / "3"))


def test_same_runs_in_a_circle(chain):
    _make_same(chain / "3" / "pagemap-pid-101", "pid-100", 0x10000)
    _make_same(chain / "3" / "pagemap-pid-100", "pid-101", 0x10000)
    with pytest.raises(ImageError, match="circle"):
        verify(str(chain / "3"))
    with pytest.raises(ImageError, match="circle"):
        Dump.open(str(chain / "3")).read_memory(101, 0x10000, 4096)
    dump = Dump.open(str(chain / "3"))
    with pytest.raises(ImageError, match="circle"):
        resolve(dump, "pid-101")
    assert (0x10000, 0x11000) not in dump.held_ranges("pid-101")  # held by nobody


def test_show_and_verify_refuse_garbage_dirs(tmp_path):
    (tmp_path / "inventory").write_bytes(b"\0" * 100)
    for fn in (show, verify):
        with pytest.raises(ImageError, match="bad magic"):
            fn(str(tmp_path))


# ---- property-based mutations over every reader ----


def _mutated_chain(name, mutate):
    tmp = tempfile.mkdtemp()
    dst = os.path.join(tmp, "chain")
    shutil.copytree(GOLDEN, dst, ignore=shutil.ignore_patterns("*.json"))
    p = os.path.join(dst, name)
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(mutate(data))
    return tmp, os.path.join(dst, "3"), p


def _run(name, mutate):
    tmp, d, p = _mutated_chain(name, mutate)
    try:
        exercise_dir(d)
        exercise_file(p)
    finally:
        shutil.rmtree(tmp)


@SETTINGS
@given(name=st.sampled_from(FILES), cut=st.integers(0, 600))
def test_truncation(name, cut):
    _run(name, lambda b: b[: min(cut, len(b) - 1)])


@SETTINGS
@given(name=st.sampled_from(FILES), flips=st.lists(st.integers(0, 8 * 600), min_size=1, max_size=4))
def test_bit_flips(name, flips):
    def mutate(b):
        b = bytearray(b)
        for bit in flips:
            i = bit // 8 % len(b)
            b[i] ^= 1 << bit % 8
        return bytes(b)

    _run(name, mutate)


@SETTINGS
@given(
    name=st.sampled_from(FILES), other=st.sampled_from(FILES),
    at=st.integers(0, 400), frm=st.integers(0, 400), n=st.integers(1, 200),
)  # fmt: skip
def test_splices(name, other, at, frm, n):
    with open(os.path.join(GOLDEN, other), "rb") as f:
        donor = f.read()
    _run(name, lambda b: b[:at] + donor[frm : frm + n] + b[at + n :])


@SETTINGS
@given(name=st.sampled_from(FILES), tail=st.binary(max_size=300))
def test_random_bytes_after_valid_header(name, tail):
    _run(name, lambda b: b[: fmt.HEADER_SIZE] + tail)


@SETTINGS
@given(
    name=st.sampled_from(FILES),
    records=st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8)
            | st.binary(max_size=8) | st.floats(),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
            max_leaves=12,
        ),
        max_size=5,
    ),
)  # fmt: skip
def test_well_formed_but_wrong_records(name, records):
    def mutate(b):
        kind, _ = fmt.parse_header(b, name)
        if kind == "pages":
            return b
        body = b"".join(msgpack.packb(r, use_bin_type=True) for r in _limit(records))
        return fmt.pack_header(kind) + zstd.ZstdCompressor(write_checksum=True).compress(body)

    _run(name, mutate)


def _limit(records):
    out = []
    for r in records:
        try:
            msgpack.packb(r)
            out.append(r)
        except (OverflowError, ValueError, TypeError):
            pass
    return out
