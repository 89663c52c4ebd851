"""A short bounded run of scripts/fuzz-images over the committed corpus."""

import os
import re
import subprocess
import sys
import tempfile

import pytest

from checkpointer.images.fuzzing import exercise_dir, unpack_case

ROOT = os.path.join(os.path.dirname(__file__), "..")
FUZZ = os.path.join(ROOT, "scripts", "fuzz-images")
CORPUS = os.path.join(ROOT, "tests", "fuzz-corpus")


@pytest.mark.parametrize("name", sorted(os.listdir(CORPUS)))
def test_corpus_seeds(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        data = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        exercise_dir(unpack_case(data, tmp))


def _fuzz(*args):
    r = subprocess.run(
        [sys.executable, FUZZ, "--seconds", "3", *args],
        capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    m = re.search(r"(\d+) inputs tried, no crash", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr[-3000:]
    return int(m.group(1))


def test_short_fuzz_run_default_engine():
    assert _fuzz() > 10


def test_short_fuzz_run_mutate_engine():
    assert _fuzz("--engine", "mutate") > 10
