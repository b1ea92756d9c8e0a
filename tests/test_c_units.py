"""C-level tests: programs in tests/c/ built against tlsctl's own C.

Each program includes ``c_source()`` of src/_tlsctl_build.py (every
hand-written C file behind its ``#line`` marker, so a failure or a
sanitizer report names the real file and line), binds to the libssl this
interpreter's ``_ssl`` loaded, and drives OpenSSL directly: the cases a
Python test cannot reach exactly, such as a transport that takes the
stash's write up to any given byte.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import tlsctl
from _c_helpers import build_module, gcc_and_python_include, header_values
from tlsctl import scenarios

if sys.implementation.name != "cpython":  # tlsctl-pymech
    pytest.skip("the C programs embed CPython's libpython", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "tests" / "c"
CUTS = C_DIR / "first_write_cuts.c"
# The sanitizers catch what a wrong drain would do quietly (a read past the
# held buffer, a use after the filter is freed); the plain build is the
# optimised code the wheel ships.
BUILDS = {
    "plain": ["-O2"],
    # -fno-sanitize-recover: UBSan's reports end the program (else it goes
    # on and exits 0).
    "sanitized": [
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ],
}


def _libssl() -> str:
    """The libssl tlsctl's module bound to in this interpreter (the one its
    ``_ssl`` uses), for the program to bind to in turn."""
    info = tlsctl.info()
    if info.library is None:
        pytest.skip(f"tlsctl is not bound here: {info.reason}")
    return info.library


def _libpython() -> list[str]:
    """Linker arguments for this interpreter's shared libpython."""
    libdir = sysconfig.get_config_var("LIBDIR")
    version = sysconfig.get_config_var("LDVERSION")
    if not (Path(libdir) / f"libpython{version}.so").exists():
        pytest.skip(f"no shared libpython{version} in {libdir} to link with")
    return [f"-L{libdir}", f"-lpython{version}", f"-Wl,-rpath,{libdir}"]


def build(program: Path, tmp_path: Path, flags: list[str]) -> Path:
    """program, compiled with tlsctl's C beside it, warnings as errors."""
    gcc, include = gcc_and_python_include()
    (tmp_path / "c_source.c").write_text(build_module().c_source())
    exe = tmp_path / program.stem
    command = [
        gcc,
        *flags,
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        # The program calls a few of tlsctl's static functions; the module
        # (cffi's glue) calls them all.
        "-Wno-unused-function",
        f"-I{include}",
        f"-I{tmp_path}",
        str(program),
        "-o",
        str(exe),
        *_libpython(),
        "-ldl",
        "-lpthread",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 and "-fsanitize" in " ".join(flags):
        if re.search(r"cannot find .*(asan|ubsan)", proc.stderr):
            pytest.skip("the sanitizer runtimes are not installed")
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.mark.parametrize("flags", list(BUILDS.values()), ids=list(BUILDS))
def test_first_write_survives_every_cut(
    flags: list[str], tmp_path: Path, certs: scenarios.Certs
) -> None:
    """The stash's one write of "held tickets + first record", taken by
    the transport up to every byte from 0 to the whole, then a few bytes per
    retry: one write call offers it all, and each ticket and the data reach
    a real client once, in order (tests/c/first_write_cuts.c).  And kTLS,
    which this kernel may lack: its controls stop at the filter, and the
    capture refuses a transport whose kernel encrypts."""
    libssl = _libssl()
    exe = build(CUTS, tmp_path, flags)
    chain = tmp_path / "server.pem"
    key = tmp_path / "server.key"
    certs.server.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in certs.server.cert_chain_pems))
    proc = subprocess.run(
        [str(exe), libssl, str(chain), str(key)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "runtime error:" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"stash: (\d+) cuts, 2 tickets each", lines[0]), lines
    # Two tickets of ~250 bytes and the record: several hundred cuts.
    assert int(lines[0].split()[1]) > 300, lines
    if not tlsctl.info().native_tickets:  # no SSL_new_session_ticket
        assert lines[1] == "capture: no SSL_new_session_ticket (OpenSSL 1.1.1)"
    else:
        assert re.fullmatch(r"capture: (\d+) cuts, 3 tickets each", lines[1]), lines
        assert int(lines[1].split()[1]) > 400, lines
    # The count is OpenSSL's own questions (~30 on a 3.0 built with kTLS,
    # none where it is built without or asks elsewhere); the program asks
    # the filter directly too, with a transport that would answer yes.
    assert re.fullmatch(
        r"ktls: (\d+) questions stopped at the filter, kTLS refused behind it; "
        r"no capture over kTLS",
        lines[2],
    ), lines


def test_the_programs_constants_match_the_real_headers(tmp_path: Path) -> None:
    """The few <openssl/ssl.h> values first_write_cuts.c declares itself."""
    declared = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define X_(\w+)\s+(\d+)", CUTS.read_text())
    }
    assert len(declared) == 8
    assert header_values(list(declared), tmp_path) == declared
