"""Named registries: how hawqtool grows by adding a small thing (a format family, a layer kind, a
quantizer, an emitter, a metric, a loss, a cost model) instead of extending an if-chain.

One class serves them all, so every registry refuses the same mistakes with the same words: an empty
name, a name taken by a different item (unless ``replace``), an unknown name (naming those there are).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from hawqtool.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Items of one kind by name, in registration order. With ``same_ok`` registering an equal item
    under its name again does nothing (a table of facts, such as layer kinds); without, any second
    registration of a name needs ``replace``.

    Example:
        >>> colours = Registry[int]("colour")
        >>> colours.add("red", 1)
        >>> colours["red"], colours.names(), "blue" in colours
        (1, ('red',), False)
        >>> colours["blue"]
        Traceback (most recent call last):
        ...
        hawqtool.errors.UsageError: unknown colour 'blue'; registered: red
    """

    def __init__(self, what: str, *, same_ok: bool = False) -> None:
        self.what = what
        self.same_ok = same_ok
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, replace: bool = False) -> None:
        """Register ``item`` as ``name``.

        Raises:
            UsageError: an empty name, or a name taken by a different item without ``replace``.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise UsageError(f"a {self.what} needs a non-empty name without surrounding spaces, got {name!r}")
        taken = name in self._items and not (self.same_ok and self._items[name] == item)
        if taken and not replace:
            raise UsageError(
                f"{self.what} {name!r} is already registered (registered: {', '.join(self._items)}); "
                "pass replace=True to replace it"
            )
        self._items[name] = item

    def remove(self, name: str, *, missing_ok: bool = False) -> T | None:
        """Unregister ``name`` and return its item (``None`` when absent and ``missing_ok``).

        Raises:
            UsageError: ``name`` is not registered and not ``missing_ok``.
        """
        if name not in self._items:
            if missing_ok:
                return None
            raise UsageError(f"no {self.what} {name!r} is registered; registered: {', '.join(self._items)}")
        return self._items.pop(name)

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise UsageError(f"unknown {self.what} {name!r}; registered: {', '.join(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def values(self) -> tuple[T, ...]:
        return tuple(self._items.values())
