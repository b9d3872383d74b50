"""Attributes of Python objects whose values live in a field of the object's C struct, where the compiled
kernels read and write them (a kring's hwcur, a virtqueue's last_avail_idx...)."""

from __future__ import annotations

from typing import overload


class CField:
    """An int attribute stored in field ``<name>`` of the struct at ``obj.<struct>``; values are cut to
    ``mask`` when set (indexes wrap as the C type does; a negative one becomes one the checks refuse)."""

    def __init__(self, doc: str, *, mask: int, struct: str = "c") -> None:
        self.__doc__ = doc
        self.mask = mask
        self.struct = struct
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def read(self, obj: object) -> int:
        """The field's value in ``obj``'s struct."""
        return int(getattr(getattr(obj, self.struct), self.name))

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> CField: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> int: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> CField | int:
        return self if obj is None else self.read(obj)

    def __set__(self, obj: object, value: int) -> None:
        setattr(getattr(obj, self.struct), self.name, int(value) & self.mask)


class CFlag(CField):
    """A bool attribute stored as 0 or 1 in field ``<name>`` of the struct at ``obj.<struct>``."""

    def __init__(self, doc: str, *, struct: str = "c") -> None:
        super().__init__(doc, mask=1, struct=struct)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> CFlag: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> bool: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> CFlag | bool:
        return self if obj is None else bool(self.read(obj))

    def __set__(self, obj: object, value: int) -> None:
        super().__set__(obj, bool(value))
