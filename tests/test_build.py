"""The cffi build (src/_tlsctl_build.py) and the compiled module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

if sys.implementation.name != "cpython":  # tlsctl-pymech
    pytest.skip(
        "tlsctl's compiled module is built on CPython only", allow_module_level=True
    )
import tlsctl._binding

from _c_helpers import build_module, gcc_and_python_include, header_values, load

ROOT = Path(__file__).resolve().parent.parent


def test_declared_constants_match_the_real_headers(tmp_path: Path) -> None:
    build = build_module()
    real = header_values(list(build.OPENSSL_CONSTANTS), tmp_path)
    for name, value in build.OPENSSL_CONSTANTS.items():
        assert real[name] == value, name
        assert getattr(tlsctl._binding.lib, name) == value


def test_public_enums_are_the_checked_constants() -> None:
    """TicketStatus and TicketDecision are SSL_TICKET_* and
    SSL_TICKET_RETURN_* (checked against the headers above), member for
    member, and every such constant has its member."""
    lib = tlsctl._binding.lib

    def declared(prefix: str, but: str = "-") -> dict[str, int]:
        return {
            name[len(prefix) :]: getattr(lib, name)
            for name in dir(lib)
            if name.startswith(prefix) and not name.startswith(but)
        }

    status = declared("SSL_TICKET_", but="SSL_TICKET_RETURN_")
    assert {m.name: m.value for m in tlsctl.TicketStatus} == status
    decision = declared("SSL_TICKET_RETURN_")
    assert {m.name: m.value for m in tlsctl.TicketDecision} == decision


def test_openssl3_constants_and_param_layout_match_the_real_headers(
    tmp_path: Path,
) -> None:
    """OSSL_PARAM (declared by hand for the EVP ticket key callback) and its
    type codes, against 3.x headers."""
    build = build_module()
    layout = [
        "sizeof(OSSL_PARAM)",
        "offsetof(OSSL_PARAM, data_type)",
        "offsetof(OSSL_PARAM, data)",
        "offsetof(OSSL_PARAM, data_size)",
        "offsetof(OSSL_PARAM, return_size)",
    ]
    real = header_values([*build.OPENSSL3_CONSTANTS, *layout], tmp_path, openssl3=True)
    if not real:
        pytest.skip("the installed OpenSSL headers are 1.1.1 (no OSSL_PARAM)")
    for name, value in build.OPENSSL3_CONSTANTS.items():
        assert real[name] == value, name
        assert getattr(tlsctl._binding.lib, name) == value
    ffi = tlsctl._binding.ffi
    assert real["sizeof(OSSL_PARAM)"] == ffi.sizeof("OSSL_PARAM")
    for field in ("data_type", "data", "data_size", "return_size"):
        assert real[f"offsetof(OSSL_PARAM, {field})"] == ffi.offsetof(
            "OSSL_PARAM", field
        ), field


def test_the_internal_set_ktls_control_is_the_number_bio_h_names() -> None:
    """BIO_CTRL_SET_KTLS (which the stash filter refuses) is internal to
    OpenSSL; 3.x's public <openssl/bio.h> names its number in a comment."""
    extra = os.environ.get("TLSCTL_OPENSSL_INCLUDE", "")  # as header_values
    dirs = [Path(d) for d in extra.split(os.pathsep) if d] + [Path("/usr/include")]
    found = [d / "openssl/bio.h" for d in dirs]
    headers = [h for h in found if h.is_file()]
    if not headers:
        pytest.skip("OpenSSL development headers are not installed")
    text = headers[0].read_text()
    if "BIO_CTRL_GET_KTLS_SEND" not in text:
        pytest.skip("the installed OpenSSL headers are 1.1.1 (no kTLS controls)")
    assert re.search(r"#\s*define BIO_CTRL_SET_KTLS\w*\s+72\b", text)
    assert "#define TLSCTL_BIO_CTRL_SET_KTLS 72" in build_module().c_source()


def test_c_source_has_no_openssl_include_and_binds_every_function() -> None:
    build = build_module()
    source = build.c_source()
    assert "#include <openssl" not in source
    for name, _, _, required in build.OPENSSL_FUNCTIONS:
        assert f"(*p_{name})" in source
        assert f'{{"{name}", (void **)&p_{name}, {int(required)}}}' in source
    optional = [n for n, _, _, req in build.OPENSSL_FUNCTIONS if not req]
    assert optional == [
        "HMAC_Init_ex",
        "HMAC",
        "EVP_Q_mac",
        "SSL_new_session_ticket",
        "SSL_CTX_set_tlsext_ticket_key_evp_cb",
        "EVP_MAC_CTX_set_params",
    ]


def test_compiled_module_links_no_openssl_and_uses_the_stable_abi() -> None:
    path = Path(tlsctl._binding.__file__)
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert path.name.endswith(".abi3.so"), path.name
    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        pytest.skip("needs readelf on Linux to list DT_NEEDED")
    dynamic = subprocess.run(
        ["readelf", "-d", str(path)], capture_output=True, text=True, check=True
    ).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if "ssl" in lib or "crypto" in lib], needed


@pytest.mark.skipif(not tlsctl.info().bound, reason="needs tlsctl's binding")
def test_optional_symbols_are_capability_flags() -> None:
    """Optional symbols are capability flags: tlsctl_has_symbol reports them
    and unknown names are never 'present'."""
    lib = tlsctl._binding.lib
    assert lib.tlsctl_has_symbol(b"SSL_set_num_tickets") == 1
    assert lib.tlsctl_has_symbol(b"no_such_function") == 0
    expected = 1 if tlsctl.info().native_tickets else 0
    assert lib.tlsctl_has_symbol(b"SSL_new_session_ticket") == expected


def test_compiled_module_passes_abi3audit() -> None:
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        pytest.skip("free-threaded builds do not use the stable ABI")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "abi3audit",
            "--strict",
            "--assume-minimum-abi3",
            "3.9",
            tlsctl._binding.__file__,
        ],
        capture_output=True,
        text=True,
    )
    if "No module named abi3audit" in proc.stderr:
        pytest.skip("abi3audit not installed (it is in the test extra)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cibuildwheel_configuration_is_valid() -> None:
    """Docker is not needed to let cibuildwheel parse and validate the
    configuration: unknown keys are errors there."""
    if sys.version_info < (3, 11):
        pytest.skip("cibuildwheel needs Python >= 3.11 to run")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cibuildwheel",
            "--print-build-identifiers",
            "--platform",
            "linux",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "cp39-manylinux_x86_64",
        "cp39-manylinux_aarch64",
        "cp39-musllinux_x86_64",
        "cp39-musllinux_aarch64",
    ]


# importlib.machinery.EXTENSION_SUFFIXES as the CPythons of ci/matrix.sh
# report them (3.11: the host; 3.15.2: Debian sid), and free-threaded ones.
SUFFIXES_3_11 = [".cpython-311-x86_64-linux-gnu.so", ".abi3.so", ".so"]
SUFFIXES_3_15 = [
    ".cpython-315-x86_64-linux-gnu.so",
    ".abi3-x86_64-linux-gnu.so",
    ".abi3.so",
    ".abi3t-x86_64-linux-gnu.so",
    ".abi3t.so",
    ".so",
]
SUFFIXES_3_14T = [".cpython-314t-x86_64-linux-gnu.so", ".so"]


@pytest.mark.parametrize(
    ("suffixes", "default"),
    [
        (SUFFIXES_3_15, "tlsctl/_binding.abi3-x86_64-linux-gnu.so"),
        (SUFFIXES_3_15, "tlsctl/_binding.abi3.so"),
        (SUFFIXES_3_11, "tlsctl/_binding.abi3.so"),
    ],
)
def test_abi3_extension_is_named_plain_abi3_so(
    suffixes: list[str], default: str
) -> None:
    """A wheel tagged cp39-abi3 must load on 3.9 .. 3.14 too, which only
    import ``*.abi3.so``, even when 3.15 (``.abi3-<platform>.so`` first)
    built it."""
    setup = load("_tlsctl_setup", ROOT / "setup.py")
    name = setup.extension_filename("tlsctl._binding", default, True, suffixes)
    assert name == os.path.join("tlsctl", "_binding.abi3.so")


@pytest.mark.parametrize(
    ("suffixes", "default", "limited_api"),
    [
        # free-threaded: no stable ABI here, the interpreter's own suffix
        (
            SUFFIXES_3_14T,
            "tlsctl/_binding.cpython-314t-x86_64-linux-gnu.so",
            False,
        ),
        (
            [".cpython-315t-x86_64-linux-gnu.so", ".abi3t.so", ".so"],
            "tlsctl/_binding.cpython-315t-x86_64-linux-gnu.so",
            False,
        ),
        (SUFFIXES_3_15, "tlsctl/_binding.cpython-315-x86_64-linux-gnu.so", False),
        # an interpreter that does not load .abi3.so (Windows) keeps its own
        ([".cp315-win_amd64.pyd", ".pyd"], "tlsctl\\_binding.pyd", True),
    ],
)
def test_other_extensions_keep_the_interpreters_suffix(
    suffixes: list[str], default: str, limited_api: bool
) -> None:
    setup = load("_tlsctl_setup", ROOT / "setup.py")
    name = setup.extension_filename("tlsctl._binding", default, limited_api, suffixes)
    assert name == default


def test_setup_py_is_side_effect_free_to_import() -> None:
    """Importing setup.py (as the tests above do) must not run setup()."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('s', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in sys.modules if 'setuptools' in m))",
            str(ROOT / "setup.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- warning-free C ---------------------------------------------------------
# Flags for the complete C file (cffi's generated glue + the hand-written
# c_source()).  cffi's glue compiles clean under -Wall -Wextra (checked with
# gcc 10, 12, 14 and 16 and the headers of Python 3.9, 3.11, 3.13, 3.14 and
# 3.15), so it needs no -Wno-... flag.  -O2: the flow-based warnings of
# -Wall (-Wmaybe-uninitialized, -Warray-bounds, -Wstringop-*) need the
# optimizer, so the file is compiled, not only parsed.
C_WARNINGS = ["-Wall", "-Wextra", "-Werror"]
# Held to the hand-written C only (by a pragma around it): -Wcast-qual, a
# cast that drops const, which neither -Wall nor -Wextra enables.  cffi's
# glue does that by design (e.g. `(char **)&x1` for a `char const *x1`
# argument: 76 warnings with gcc 12), so it cannot be a command-line flag.
OWN_C_WARNINGS = ["-Wcast-qual"]


def test_c_source_compiles_without_warnings(tmp_path: Path) -> None:
    """The module's complete C source, exactly as cffi generates it for the
    build, compiles with -Wall -Wextra -Werror; the hand-written part
    (c_source(), included from its own file so messages name its lines)
    also with OWN_C_WARNINGS."""
    gcc, include = gcc_and_python_include()
    build = build_module()
    generated = tmp_path / "_binding.c"
    build.ffibuilder.emit_c_code(str(generated))
    text = generated.read_text()
    own = build.c_source()
    assert text.count(own) == 1, "c_source() is not verbatim in cffi's output"
    (tmp_path / "c_source.c").write_text(own)
    pragmas = "".join(f'#pragma GCC diagnostic error "{w}"\n' for w in OWN_C_WARNINGS)
    generated.write_text(
        text.replace(
            own,
            "\n#pragma GCC diagnostic push\n"
            + pragmas
            + '#include "c_source.c"\n'
            + "#pragma GCC diagnostic pop\n",
        )
    )
    proc = subprocess.run(
        [
            gcc,
            "-c",
            "-O2",
            "-fPIC",
            *C_WARNINGS,
            f"-I{include}",
            "-I.",
            generated.name,
            "-o",
            "_binding.o",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "warning:" not in proc.stderr, (
        f"{proc.stderr}\n(c_source.c is c_source() of src/_tlsctl_build.py; "
        f"both files are in {tmp_path})"
    )
