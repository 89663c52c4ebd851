"""A native CRIU for the side-by-side benchmark, built once from source and cached.

Debian's criu 3.17 does not run on this kernel (it does not know [vvar_vclock]);
4.1.1 does. The source is Debian trixie's: fetched with `apt-get source
--download-only` through a private deb-src list and lists directory, so the
host's apt setup is untouched. Only the upstream orig tarball is served (the .dsc
and the debian part answer 404), which is all `make criu` needs. Build
dependencies come from the host's own (bookworm) archive. KERNEL-NOTES.md §6.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from bench_lib.core import say

VERSION = "4.1.1"
CACHE = Path(os.environ.get("CHECKPOINTER_BENCH_CACHE", "/var/cache/checkpointer-bench"))
BUILD_DEPS = (
    "build-essential pkg-config protobuf-c-compiler libprotobuf-c-dev protobuf-compiler "
    "libprotobuf-dev python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev "
    "libaio-dev libgnutls28-dev libnftables-dev uuid-dev"
).split()
SOURCE_LIST = "deb-src http://deb.debian.org/debian trixie main\n"


def native_criu() -> Path:
    """Path of the cached native criu binary, building it first if needed."""
    binary = CACHE / f"criu-{VERSION}" / "criu" / "criu"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    _install_build_deps()
    tarball = _fetch_source()
    say(f"native criu: building {VERSION} (about 20 s)")
    with tarfile.open(tarball) as tar:
        tar.extractall(CACHE, filter="tar")
    subprocess.run(
        ["make", f"-j{os.cpu_count() or 2}", "criu"],
        cwd=CACHE / f"criu-{VERSION}",
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return binary


def _install_build_deps() -> None:
    missing = [
        pkg
        for pkg in BUILD_DEPS
        if subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode != 0
    ]
    if missing:
        say(f"native criu: installing build dependencies {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)


def _fetch_source() -> Path:
    tarball = CACHE / f"criu_{VERSION}.orig.tar.xz"
    if tarball.exists():
        return tarball
    apt = CACHE / "apt"
    lists = apt / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(SOURCE_LIST)
    private = [
        "-o",
        f"Dir::Etc::sourcelist={apt / 'sources.list'}",
        "-o",
        "Dir::Etc::sourceparts=-",
        "-o",
        f"Dir::State::Lists={lists}",
    ]
    say(f"native criu: fetching Debian trixie's criu {VERSION} source")
    subprocess.run(["apt-get", *private, "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    # The .dsc and the debian tarball answer 404: apt-get fails, the orig tarball stays.
    subprocess.run(
        ["apt-get", *private, "source", "--download-only", "criu"],
        cwd=CACHE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not tarball.exists():
        found = sorted(CACHE.glob("criu_*.orig.tar.*"))
        if not found:
            raise RuntimeError("native criu: the orig tarball could not be fetched")
        shutil.move(found[-1], tarball)
    return tarball


if __name__ == "__main__":
    print(native_criu())
