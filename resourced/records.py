"""`@dataclass(frozen=True, slots=True)`, for a fifth of what defining one costs.

The standard library's `dataclass` writes each method it adds as source text
and compiles it when the class is defined: six compilations for a frozen class
(`__init__`, `__repr__`, `__eq__`, `__hash__`, `__setattr__`, `__delattr__`),
about 3 M instructions a class on Python 3.11. The D-Bus service defines 63 such
records (messages, events, settings) as it starts, and compiling their methods
was a third of its start-up (issue #7 wants the first console byte 300 ms after
the activating call).

`dataclass` here takes the same two arguments and makes the same class: a real
dataclass (`fields()`, `replace()`, `asdict()`, `__match_args__`), slotted,
frozen (`FrozenInstanceError`), with the same `__init__` (compiled, as the
standard library's: it is called for every message), and with `__repr__`,
`__eq__` and `__hash__` that give what the standard library's give, shared by
every record instead of compiled for each. It is not a general replacement:
only frozen, slotted classes whose fields are plain (a default or a default
factory; no `field(init=False)`, no keyword-only fields, no `InitVar`), and
which define none of those methods themselves; anything else is a `TypeError`
when the class is defined.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")

#: Methods a record gets from here; a class that defines one itself is refused.
_MADE_HERE = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")


@dataclass_transform(frozen_default=True)
def dataclass(*, frozen: bool = True, slots: bool = True) -> Callable[[type[_T]], type[_T]]:
    """The decorator (see the module docstring): `@dataclass(frozen=True, slots=True)`."""
    if not (frozen and slots):
        raise TypeError("resourced.records.dataclass makes frozen, slotted classes only")
    return _record


def _record(cls: type[_T]) -> type[_T]:
    defined = [name for name in _MADE_HERE if name in cls.__dict__]
    if defined:
        raise TypeError(f"{cls.__qualname__} defines {', '.join(defined)}: use dataclasses")
    documented = bool(cls.__dict__.get("__doc__"))
    # The bookkeeping (fields, __match_args__, the slotted copy of the class) is
    # the standard library's; it compiles nothing when asked for no methods.
    made: Any = dataclasses.dataclass(cls, init=False, repr=False, eq=False, slots=True)
    fields = dataclasses.fields(made)
    for f in fields:
        if not f.init or f.kw_only or f.type == "InitVar" or type(f.type) is dataclasses.InitVar:
            raise TypeError(f"{made.__qualname__}.{f.name}: a plain field only, or use dataclasses")
    names = frozenset(f.name for f in fields)
    compared = _getter([f.name for f in fields if f.compare])
    hashed = _getter([f.name for f in fields if (f.compare if f.hash is None else f.hash)])
    shown = [f.name for f in fields if f.repr]

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is made or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(made, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is made or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(made, self).__delattr__(name)

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is self.__class__:
            return bool(compared(self) == compared(other))
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(hashed(self))

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{self.__class__.__qualname__}({inner})"

    def __getstate__(self: Any) -> list[Any]:  # pickling, as for the standard library's
        return [getattr(self, f.name) for f in fields]

    def __setstate__(self: Any, state: list[Any]) -> None:
        for f, value in zip(fields, state, strict=True):
            object.__setattr__(self, f.name, value)

    methods = (
        _init(made, fields),
        __repr__,
        __eq__,
        __hash__,
        __setattr__,
        __delattr__,
        __getstate__,
        __setstate__,
    )
    for method in methods:
        method.__qualname__ = f"{made.__qualname__}.{method.__name__}"
        setattr(made, method.__name__, method)
    params = made.__dataclass_params__
    params.init = params.repr = params.eq = params.frozen = True
    if not documented:  # as the standard library writes it
        made.__doc__ = made.__name__ + str(inspect.signature(made)).replace(" -> None", "")
    result: type[_T] = made
    return result


def _getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving these attributes as a tuple (attrgetter's C speed)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda self: (one(self),)
    return lambda self: ()


def _init(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> Callable[..., None]:
    """The standard library's `__init__` for a frozen class, compiled once."""
    scope: dict[str, Any] = {"__set": object.__setattr__, "__factory": _FACTORY}
    parameters, body = [], []
    for f in fields:
        value = f.name
        if f.default is not dataclasses.MISSING:
            scope[f"__default_{f.name}"] = f.default
            parameters.append(f"{f.name}=__default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"__make_{f.name}"] = f.default_factory
            parameters.append(f"{f.name}=__factory")
            value = f"__make_{f.name}() if {f.name} is __factory else {f.name}"
        else:
            parameters.append(f.name)
        body.append(f"    __set(self, {f.name!r}, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    text = f"def __init__(self, {', '.join(parameters)}):\n" + ("\n".join(body) or "    pass")
    namespace: dict[str, Any] = {}
    exec(text, scope, namespace)
    init: Callable[..., None] = namespace["__init__"]
    init.__annotations__ = {f.name: f.type for f in fields} | {"return": None}
    return init


class _Factory:
    """Stands for "not given" where a default factory makes the value."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()
