"""Named registries (datasets, extractor families and presets, decoders, heads, losses): one class, as timm's.

A registry maps a name (and its aliases) to a builder: a class, a function or a preset's data. Entries
register themselves with a decorator when their module is imported; a registry whose entries live in
modules that load torch fills itself on first use (its `populate` hook), so importing a CLI stays light.
It reads like a mapping of canonical names (`reg[name]`, `name in reg`, `sorted(reg)`, `.items()`),
and an unknown name is one `MMCacheError` listing the known ones and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from typing import Any, Generic, TypeVar

from mmcache.errors import MMCacheError

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Generic[T]):
    """Name -> builder for one kind of thing (`kind` names it in errors: "unknown head 'x'; known: ...").

    `populate` is called once, on the first lookup, to import the modules whose entries register on
    import; registering never triggers it.
    """

    def __init__(self, kind: str, populate: Callable[[], object] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self.aliases: dict[str, str] = {}  # alias -> registered name (read it; register through add/register)
        self._populate = populate
        self._populated = populate is None

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"

    # -- filling --------------------------------------------------------------------

    def add(self, name: str, obj: T, *aliases: str) -> T:
        """Register `obj` under `name` (a later entry of the same name replaces it), plus `aliases`."""
        self._entries[name] = obj
        self.aliases.pop(name, None)
        for a in aliases:
            self.aliases[a] = name
        return obj

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under `name` and `aliases`."""

        def deco(obj: T) -> T:
            return self.add(name, obj, *aliases)

        return deco

    def ensure(self) -> None:
        """Run the `populate` hook if it has not run yet (every lookup does this first)."""
        if self._populated:
            return
        self._populated = True  # before the call: the modules it imports register into this registry
        try:
            assert self._populate is not None
            self._populate()
        except BaseException:
            self._populated = False
            raise

    # -- lookup ---------------------------------------------------------------------

    def canonical(self, name: str) -> str:
        """The registered name of `name` (itself, or what the alias stands for); an error when unknown."""
        self.ensure()
        if name in self._entries:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise self.unknown(name)

    def get(self, name: str, default: Any = _MISSING) -> T:
        """The entry of `name` or an alias; `default` when given and the name is unknown, else an error."""
        self.ensure()
        key = self.aliases.get(name, name)
        if key in self._entries:
            return self._entries[key]
        if default is not _MISSING:
            return default  # type: ignore[no-any-return]
        raise self.unknown(name)

    def unknown(self, name: str) -> MMCacheError:
        """The error for an unknown `name`: the known names, and the closest one when it is close."""
        self.ensure()
        known = self.names(aliases=True)
        msg = f"unknown {self.kind} {name!r}; known: {', '.join(known) or '(none registered)'}"
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        return MMCacheError(msg + (f"; did you mean {close[0]!r}?" if close else ""))

    def names(self, aliases: bool = False) -> list[str]:
        """Registered names, sorted; with `aliases=True` the aliases too."""
        self.ensure()
        return sorted([*self._entries, *(self.aliases if aliases else ())])

    def aliases_of(self, name: str) -> list[str]:
        """The aliases of registered name `name`, sorted."""
        self.ensure()
        return sorted(a for a, c in self.aliases.items() if c == name)

    # -- mapping protocol (canonical names) ------------------------------------------

    def __contains__(self, name: object) -> bool:
        self.ensure()
        return name in self._entries or name in self.aliases

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, obj: T) -> None:
        self.add(name, obj)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        for a in [a for a, c in self.aliases.items() if c == name]:
            del self.aliases[a]

    def __iter__(self) -> Iterator[str]:
        self.ensure()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.ensure()
        return len(self._entries)

    def keys(self) -> KeysView[str]:
        """Registered names, in registration order."""
        self.ensure()
        return self._entries.keys()

    def values(self) -> ValuesView[T]:
        """Registered entries, in registration order."""
        self.ensure()
        return self._entries.values()

    def items(self) -> ItemsView[str, T]:
        """(name, entry) pairs, in registration order."""
        self.ensure()
        return self._entries.items()
