"""One small generic registry: named entries that carry metadata.

Advantage estimators, policy losses, KL estimators and loss aggregations (``core.py``) are each a
:class:`Registry` of a frozen dataclass describing the entry (its function plus what it needs:
values, a minimum group size, an options section, state). The trainer and the config read that
metadata; they never compare an entry's name. A user adds an entry with the same decorator the
built-ins use::

    from rlhf_pg.core import ADVANTAGES

    @ADVANTAGES.register("my_adv", min_group_size=2)
    def my_adv(x, opts, state):   # x: core.AdvantageInputs
        ...

An unknown name is an error that lists the known ones (with a close match when there is one).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

E = TypeVar("E")


class UnknownEntry(KeyError):
    """``registry[name]`` for a name nobody registered; ``str()`` is the one-line message."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[E]):
    """Entries of type ``entry_type`` (a dataclass whose first field is ``fn``) by name.

    ``kind`` names what the entries are in messages (``"advantage estimator"``); ``key`` is the config
    key that selects one (``"algo.advantage"``).
    """

    def __init__(self, kind: str, key: str, entry_type: type[E]):
        self.kind, self.key, self.entry_type = kind, key, entry_type
        self._entries: dict[str, E] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` under ``name`` with the entry type's metadata fields ``meta``."""

        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = self.entry_type(fn=fn, **meta)  # type: ignore[call-arg]
            return fn

        return deco

    def add(self, name: str, entry: E) -> None:
        """Register a ready-made entry (e.g. one built from another with ``dataclasses.replace``)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntry(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        return f"unknown {self.key} {name!r}; known {self.kind}s: {', '.join(sorted(self._entries))}" + (
            f" (did you mean {close[0]!r}?)" if close else ""
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, E]]:
        return list(self._entries.items())

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register temporary ones)."""
        del self._entries[name]

    def metadata(self, name: str) -> dict[str, Any]:
        """The entry's metadata fields (everything but ``fn``), for listings."""
        entry = self[name]
        return {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name != "fn"}
