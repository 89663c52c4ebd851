"""The committed golden images decode to the committed JSON, and the generator still
writes the same thing: a format change has to be a deliberate version bump.

images/golden/chain is the current format (2); images/golden/v1/chain is what
format version 1 wrote, which every reader must still read."""

import json
import os
import runpy

import pytest

from checkpointer.images import Dump
from checkpointer.images.inspect import decode, verify

ROOT = os.path.join(os.path.dirname(__file__), "..", "images")
GOLDEN = os.path.join(ROOT, "golden", "chain")
GOLDEN_V1 = os.path.join(ROOT, "golden", "v1", "chain")
CHAINS = {2: GOLDEN, 1: GOLDEN_V1}
DUMPS = ["1", "2", "3"]


def _expected(n, chain=GOLDEN):
    with open(os.path.join(chain, f"{n}.expected.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("version", sorted(CHAINS))
@pytest.mark.parametrize("n", DUMPS)
def test_golden_files_decode_to_committed_json(n, version):
    path = os.path.join(CHAINS[version], n)
    got = {name: decode(os.path.join(path, name)) for name in sorted(os.listdir(path))}
    assert json.loads(json.dumps(got)) == _expected(n, CHAINS[version])
    assert {f["version"] for f in got.values()} == {version}


def _mask(obj):
    """Drop what depends on the zstd version: compressed sizes and offsets."""
    if isinstance(obj, dict):
        compressed = "clen" in obj
        return {
            k: _mask(v)
            for k, v in obj.items()
            if k != "bytes_compressed" and not (compressed and k in ("off", "clen"))
        }
    if isinstance(obj, list):
        return [_mask(v) for v in obj]
    return obj


def test_generator_still_writes_the_golden_format(tmp_path):
    gen = runpy.run_path(os.path.join(ROOT, "make-golden.py"))
    paths = gen["make_chain"](str(tmp_path / "chain"))
    for n, p in zip(DUMPS, paths, strict=True):
        got = json.loads(json.dumps(gen["expected"](p)))
        assert _mask(got) == _mask(_expected(n))


@pytest.mark.parametrize("version", sorted(CHAINS))
def test_golden_chain_reads_and_verifies(version):
    chain = CHAINS[version]
    d = Dump.open(os.path.join(chain, "3"))
    assert d.version == version
    assert [c.inventory["kind"] for c in d.chain()] == ["dump", "pre-dump", "pre-dump"]
    mem = d.read_memory(100, 0x10000, 0x4000)
    gen = runpy.run_path(os.path.join(ROOT, "make-golden.py"))
    page = gen["page"]
    assert mem == page("a1", 0) + page("a3", 1) + page("a2", 2) + bytes(4096)
    assert d.read_memory(101, 0x11000, 4096) == page("c3", 1)
    assert d.read_memory(100, 0x7F0000000000, 0x4000) == (
        page("s3", 0) + page("s1", 1) + page("s1", 2) + page("s2", 3)
    )
    assert verify(os.path.join(chain, "3")).startswith("OK ")
    # Every record kind passes its version's schema (the v2 fields are required in v2).
    core = d.core(100)
    mm = d.mm(100)
    assert d.fds(100)
    if version == 2:
        assert len(core.process["sigactions"]) == 62
        assert core.threads[0]["rseq"]["sig"] == 0x53053053
        assert mm.mm["exe_stat"]["ino"] == 77
        assert all("deleted" in v and "stat" in v for v in mm.vmas)
    else:
        assert "sigactions" not in core.process and "exe_stat" not in mm.mm
