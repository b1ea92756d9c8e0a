"""Sort valgrind memcheck logs into tlsctl's errors and everybody else's.

    PYTHONMALLOC=malloc valgrind --tool=memcheck --num-callers=30 \\
        --leak-check=full --show-leak-kinds=definite,possible \\
        --log-file=/tmp/vg.%p.log python -m pytest -q tests/test_policy.py ...
    python bench/vgsummary.py /tmp/vg.*.log          # one table per process
    python bench/vgsummary.py --show tlsctl /tmp/vg.*.log   # and the stacks

An error context or a leak record is *tlsctl's* when one frame of its stack
is tlsctl's: a function named ``tlsctl_*`` or a frame in one of the files
of ``src/_tlsctl_c/`` (tlsctl's own C, counted apart), or a frame in cffi's
generated glue (``_binding.c``, ``PyInit__binding``) or an address in
``_binding.abi3.so``.  Everything else (CPython, OpenSSL, libc) is counted
apart.  In a forked child's log valgrind's ``ERROR SUMMARY`` includes the
errors the parent had before the fork (their stacks are in the parent's
log); a forked child's leaks are its heap at ``os._exit()``.  Errors are
counted as valgrind prints them: one context per distinct stack, with the
total of occurrences from its ``ERROR SUMMARY``.  Leaks:
``definitely lost`` and ``possibly lost`` records, bytes and blocks.
A ``fork()`` (the hardening tests fork) gives one log per process.  With
``--track-origins=yes`` an uninitialised value's origin stack is part of
its record, so a value made in tlsctl's C and used in CPython counts as
tlsctl's.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

_PREFIX = re.compile(r"^==(\d+)== ?(.*)$")
_FRAME = re.compile(r"^\s+(?:at|by) 0x[0-9A-Fa-f]+: (.*)$")
_OWN = re.compile(
    r"\btlsctl_\w+|\((?:bind|proxy|stash|tickets)\.c:\d+\)|\(tlsctl\.h:\d+\)"
)
_GLUE = re.compile(
    r"\((?:_binding\.c|cffi-generated glue of tlsctl\._binding):\d+\)"
    r"|_binding\.abi3\.so|\bPyInit__binding\b"
)
_LEAK = re.compile(
    r"^([\d,]+)(?: \(([\d,]+) direct, ([\d,]+) indirect\))? bytes in ([\d,]+) "
    r"blocks are (definitely|possibly) lost in loss record"
)
_SUMMARY = re.compile(r"^ERROR SUMMARY: ([\d,]+) errors from ([\d,]+) contexts")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


@dataclass
class Record:
    kind: str  # the error's first line, or "definitely lost" / "possibly lost"
    frames: list[str]
    text: list[str]
    size: int = 0  # leaks: bytes (direct)
    blocks: int = 0

    @property
    def own(self) -> bool:
        """A frame in tlsctl's own C (``src/_tlsctl_c``, ``tlsctl_*``)."""
        return any(_OWN.search(f) for f in self.frames)

    @property
    def tlsctl(self) -> bool:
        """A frame in tlsctl's C or in its cffi glue (``_binding``)."""
        return self.own or any(_GLUE.search(f) for f in self.frames)

    def brief(self) -> str:
        """The allocation or error site and the outermost-first tlsctl frame."""
        top = next(
            (
                f
                for f in self.frames
                if not f.startswith(("malloc ", "calloc ", "realloc "))
            ),
            "?",
        )
        mine = next((f for f in self.frames if _OWN.search(f) or _GLUE.search(f)), "-")
        return (
            f"{self.kind}: {self.size} B / {self.blocks} blocks at {top}; "
            f"tlsctl frame: {mine}"
        )


@dataclass
class Log:
    path: Path
    pid: str = "?"
    command: str = ""
    parent: str = ""
    errors: list[Record] = field(default_factory=list)
    leaks: list[Record] = field(default_factory=list)
    total_errors: int | None = None
    total_contexts: int | None = None


def _blocks(path: Path) -> tuple[str, list[list[str]]]:
    """The log's pid and its paragraphs (blank ``==pid==`` lines split)."""
    pid = "?"
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for raw in path.read_text(errors="replace").splitlines():
        m = _PREFIX.match(raw)
        if m is None:
            continue
        pid, body = m.group(1), m.group(2)
        if body.strip():
            current.append(body)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return pid, paragraphs


def parse(path: Path) -> Log:
    pid, paragraphs = _blocks(path)
    log = Log(path, pid)
    for para in paragraphs:
        head = para[0]
        frames = [m.group(1) for line in para[1:] if (m := _FRAME.match(line))]
        if any(line.startswith(("Command: ", "Parent PID: ")) for line in para):
            for line in para:
                if line.startswith("Command: "):
                    log.command = line[len("Command: ") :]
                elif line.startswith("Parent PID: "):
                    log.parent = line[len("Parent PID: ") :]
            continue
        summary = next((m for line in para if (m := _SUMMARY.match(line))), None)
        if summary is not None:
            log.total_errors = _int(summary.group(1))
            log.total_contexts = _int(summary.group(2))
            continue
        leak = _LEAK.match(head)
        if leak is not None:
            size = _int(leak.group(2) or leak.group(1))
            log.leaks.append(
                Record(
                    f"{leak.group(5)} lost",
                    frames,
                    para,
                    size=size,
                    blocks=_int(leak.group(4)),
                )
            )
            continue
        if frames and not head.startswith(("HEAP SUMMARY", "LEAK SUMMARY")):
            log.errors.append(Record(head, frames, para))
    return log


def report(logs: list[Log], show: str) -> int:
    found = 0
    for log in logs:
        mine = [e for e in log.errors if e.tlsctl]
        theirs = [e for e in log.errors if not e.tlsctl]
        print(f"{log.path} (pid {log.pid}, parent {log.parent or '?'})")
        print(
            f"  error contexts: {len(mine)} with a tlsctl frame "
            f"({sum(e.own for e in mine)} in its own C), {len(theirs)} "
            f"without (valgrind: {log.total_errors} errors from "
            f"{log.total_contexts} contexts)"
        )
        kinds: dict[str, int] = {}
        for e in theirs:
            key = re.sub(r"\d+", "N", e.kind)
            kinds[key] = kinds.get(key, 0) + 1
        for key, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d} x {key}")
        for lost in ("definitely lost", "possibly lost"):
            recs = [r for r in log.leaks if r.kind == lost]
            mine_l = [r for r in recs if r.tlsctl]
            print(
                f"  {lost}: {len(mine_l)} records "
                f"({sum(r.own for r in mine_l)} in its own C) / "
                f"{sum(r.blocks for r in mine_l)} blocks / "
                f"{sum(r.size for r in mine_l)} bytes with a tlsctl frame; "
                f"{len(recs) - len(mine_l)} records / "
                f"{sum(r.blocks for r in recs if not r.tlsctl)} blocks / "
                f"{sum(r.size for r in recs if not r.tlsctl)} bytes without"
            )
            if lost == "definitely lost":
                found += len(mine_l)
            if show == "brief":
                for r in mine_l:
                    print(f"    {r.brief()}")
        found += len(mine)
        shown = [
            r
            for r in log.errors + log.leaks
            if show == "all" or (show == "tlsctl" and r.tlsctl)
        ]
        for r in shown:
            print("    ---")
            for line in r.text:
                print(f"    {line}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument(
        "--show",
        choices=("none", "brief", "tlsctl", "all"),
        default="none",
        help="brief: one line per tlsctl leak record; tlsctl / all: the stacks "
        "of these records",
    )
    args = parser.parse_args(argv)
    logs = [parse(p) for p in args.logs]
    found = report(logs, args.show)
    print(f"records with a tlsctl frame (errors + definitely lost): {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
