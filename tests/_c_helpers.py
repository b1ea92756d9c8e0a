"""Compiling and running small C programs in the tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str, path: Path) -> ModuleType:
    """The Python file at path as module name (build scripts: not installed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_module() -> ModuleType:
    """src/_tlsctl_build.py from the checkout."""
    return load("_tlsctl_build", ROOT / "src" / "_tlsctl_build.py")


def header_values(
    names: list[str], tmp_path: Path, *, openssl3: bool = False
) -> dict[str, int]:
    """Compile and run a C program printing each name from the real OpenSSL
    headers (macros, expressions and enum members alike).  With
    ``openssl3``, names only 3.x headers have: skips on 1.1.1 headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the OpenSSL headers")
    src = tmp_path / "consts.c"
    body = "".join(f'    printf("{n} %ld\\n", (long)({n}));\n' for n in names)
    if openssl3:
        body = f"#if OPENSSL_VERSION_NUMBER >= 0x30000000L\n{body}#endif\n"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <openssl/ssl.h>\n"
        "#include <openssl/bio.h>\n"
        + (
            "#if OPENSSL_VERSION_NUMBER >= 0x30000000L\n"
            "#include <openssl/core.h>\n#endif\n"
            if openssl3
            else ""
        )
        + "int main(void) {\n"
        + body
        + "    return 0;\n}\n"
    )
    exe = tmp_path / "consts"
    # TLSCTL_OPENSSL_INCLUDE: headers unpacked beside a system that must
    # build tlsctl without them (ci/matrix.sh).
    extra = os.environ.get("TLSCTL_OPENSSL_INCLUDE", "")
    includes = [f"-I{d}" for d in extra.split(os.pathsep) if d]
    proc = subprocess.run(
        [cc, *includes, str(src), "-o", str(exe)], capture_output=True, text=True
    )
    if proc.returncode != 0 and "openssl/ssl.h" in proc.stderr:
        pytest.skip("OpenSSL development headers are not installed")
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    return {k: int(v) for k, v in (line.rsplit(maxsplit=1) for line in lines)}


def gcc_and_python_include() -> tuple[str, str]:
    """gcc and the folder of this interpreter's Python.h, or skip."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found (the warning flags are gcc's)")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        pytest.skip(f"Python headers not installed (no {include}/Python.h)")
    return gcc, include
