"""Build glue only: metadata lives in pyproject.toml."""

import sys
import sysconfig

from setuptools import setup

# The compiled module uses the stable ABI (one wheel for CPython 3.9+), except
# on free-threaded builds, which have no stable ABI before 3.15.
ABI3 = not sysconfig.get_config_var("Py_GIL_DISABLED")
# Only CPython gets the compiled module: it reads CPython's _ssl objects
# through the CPython C API.  Elsewhere (PyPy) tlsctl installs as pure Python
# and uses its python mechanism (memory-BIO servers; see tlsctl._pyhold).
CPYTHON = sys.implementation.name == "cpython"

setup(
    cffi_modules=["src/_tlsctl_build.py:ffibuilder"] if CPYTHON else [],
    ext_package="tlsctl",
    zip_safe=False,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ABI3 and CPYTHON else {},
)
