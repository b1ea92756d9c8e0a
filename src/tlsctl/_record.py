"""Small immutable records: ``Info``, ``ConnectionState``, ``ResumeStatus``
and tlsctl's private settings.

Not dataclasses: importing ``dataclasses`` pulls in ``inspect``, ``ast``,
``dis`` and ``tokenize``, milliseconds of every server's start-up, for four
classes of a few fields (``import tlsctl`` is held to within 5 ms of
``import ssl``; see docs/performance.md).

Invariant: a subclass names its fields in ``_fields`` (``__init__`` order),
sets each exactly once in its typed ``__init__`` through ``_set``, and
nothing changes them afterwards: equal fields make equal, hashable records.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, final
else:

    def final(cls: type) -> type:
        """``typing.final`` without importing typing: it informs type
        checkers and, like typing's (3.11+), sets ``__final__``; classes
        enforce it with ``__init_subclass__``."""
        cls.__final__ = True
        return cls


__all__ = ["Record", "final"]


class Record:
    """Immutable fields with value equality, a hash and a dataclass-style
    ``repr`` (fields in ``_hidden`` are left out of it)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __repr__(self) -> str:
        shown = (n for n in self._fields if n not in self._hidden)
        body = ", ".join(f"{n}={getattr(self, n)!r}" for n in shown)
        return f"{type(self).__name__}({body})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: it is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: it is immutable")

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        return type(self), self._values()
