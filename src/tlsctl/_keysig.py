"""What a watched key file is (``_keyfiles``): its *signature*, reading its
key, and the key list of several files.

A path holds the same key while its signature stays the same: the
``os.stat`` of the file (symbolic links followed: ``st_dev``, ``st_ino``,
``st_size``, ``st_mtime_ns``, plus ``st_ctime_ns`` and ``st_mode``, so that
a ``chmod`` that fixes a permission is noticed) and every symbolic link met
while resolving the path, component by component (a Kubernetes Secret
update swaps the volume's ``..data`` link, not ``key -> ..data/key``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from tlsctl._tickets import TicketKey

_Signature = tuple[object, ...]

_MAX_LINKS = 40  # Linux's MAXSYMLINKS: more is ELOOP


def _link_chain(path: str) -> tuple[tuple[object, ...], ...]:
    """Every symbolic link met while resolving the absolute ``path``, in
    order, as ``(link, target, st_dev, st_ino)``.  A component that cannot
    be examined ends the chain with ``(where, errno)``."""
    chain: list[tuple[object, ...]] = []
    todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    here = "/"  # always free of symbolic links, so ".." is lexical
    while todo:
        name = todo.pop()
        if name == "..":
            here = os.path.dirname(here)
            continue
        where = os.path.join(here, name)
        try:
            st = os.lstat(where)
            if not stat.S_ISLNK(st.st_mode):
                here = where
                continue
            if len(chain) >= _MAX_LINKS:
                chain.append((where, "ELOOP"))
                break
            target = os.readlink(where)
        except OSError as exc:
            chain.append((where, exc.errno))
            break
        chain.append((where, target, st.st_dev, st.st_ino))
        if target.startswith("/"):
            here = "/"
        todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
    return tuple(chain)


def _signature(path: str) -> _Signature:
    """What must stay the same for ``path`` to hold the same key."""
    chain = _link_chain(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        return (chain, exc.errno)
    return (
        chain,
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_mode,
    )


def _read(path: str) -> tuple[TicketKey | None, str | None]:
    """``(key, None)``, or ``(None, problem)`` naming the path, never bytes."""
    try:
        return TicketKey.from_file(path), None
    except ValueError as exc:  # wrong size, not a regular file
        return None, str(exc)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return None, f"{path!r}: {reason} ({type(exc).__name__})"


def _combine(
    paths: Sequence[str], slots: Sequence[TicketKey]
) -> tuple[list[TicketKey], tuple[str, str] | None]:
    """The key list for ``set_ticket_keys`` (a key in two files listed
    once), or ``(path, problem)`` when two different keys share a name."""
    keys: list[TicketKey] = []
    first: dict[bytes, int] = {}
    for i, key in enumerate(slots):
        data = key.export()
        j = first.setdefault(data[:16], i)
        if j == i:
            keys.append(key)
        elif slots[j].export() != data:
            return [], (
                paths[i],
                f"{paths[i]!r}: its key has the name of the key in "
                f"{paths[j]!r} but is a different key (key names are unique)",
            )
    return keys, None


def _same(a: Sequence[TicketKey], b: Sequence[TicketKey]) -> bool:
    return [k.export() for k in a] == [k.export() for k in b]
