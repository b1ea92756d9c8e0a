"""Build glue only: metadata lives in pyproject.toml."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES

# The compiled module uses the stable ABI (one wheel for CPython 3.9+), except
# on free-threaded builds, which have no stable ABI before 3.15.
ABI3 = not sysconfig.get_config_var("Py_GIL_DISABLED")
# Only CPython gets the compiled module: it reads CPython's _ssl objects
# through the CPython C API.  Elsewhere (PyPy) tlsctl installs as pure Python
# and uses its python mechanism (memory-BIO servers; see tlsctl._pyhold).
CPYTHON = sys.implementation.name == "cpython"

# The one abi3 file name every CPython 3 loads on POSIX (3.9 .. 3.15).
PLAIN_ABI3_SUFFIX = ".abi3.so"


def extension_filename(
    fullname: str,
    default: str,
    limited_api: bool,
    suffixes: Sequence[str] = EXTENSION_SUFFIXES,
) -> str:
    """The file name of extension ``fullname`` ("tlsctl._binding").

    ``default`` is setuptools' name for it, ``suffixes`` the building
    interpreter's ``importlib.machinery.EXTENSION_SUFFIXES``.  A limited-API
    (abi3) module is named ``<name>.abi3.so`` whenever this interpreter loads
    that name: 3.15 lists ``.abi3-<platform>.so`` first, and setuptools
    picks it there, but upstream 3.9 .. 3.14 (and Debian's 3.9 and 3.11) do
    not load it, although the wheel's ``cp39-abi3`` tag promises them the
    module.  Anything else (not abi3, e.g. a free-threaded build; Windows'
    ``.pyd``) keeps ``default``.
    """
    if not limited_api or PLAIN_ABI3_SUFFIX not in suffixes:
        return default
    return os.path.join(*fullname.split(".")) + PLAIN_ABI3_SUFFIX


def main() -> None:
    from setuptools import setup
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):
        def get_ext_filename(self, fullname: str) -> str:
            ext = self.ext_map.get(fullname)
            return extension_filename(
                fullname,
                super().get_ext_filename(fullname),
                bool(getattr(ext, "py_limited_api", False)),
            )

    setup(
        cffi_modules=["src/_tlsctl_build.py:ffibuilder"] if CPYTHON else [],
        ext_package="tlsctl",
        zip_safe=False,
        cmdclass={"build_ext": BuildExt},
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if ABI3 and CPYTHON else {},
    )


# setuptools (build_meta, setup.py commands) runs this file as __main__;
# importing it (tests/test_build.py) only defines the functions above.
if __name__ == "__main__":
    main()
