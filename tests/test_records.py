"""`resourced.records.dataclass` makes what `dataclasses.dataclass(frozen=True, slots=True)`
makes: each pair of twin classes below is defined both ways and must behave alike."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest

from resourced import records
from resourced.rfb.consoles import ConsoleData


def _twins(namespace: dict[str, Any]) -> tuple[type, type]:
    """The class in `namespace` made by the standard library and by records."""

    def define(decorator: Any) -> type:
        body = dict(namespace)
        cls = type(body.pop("__name__"), (), body)
        cls.__module__ = __name__
        made: type = decorator(cls)
        return made

    return (
        define(dataclasses.dataclass(frozen=True, slots=True)),
        define(records.dataclass(frozen=True, slots=True)),
    )


def _checked(self: Any) -> None:
    if self.number < 0:
        raise ValueError("negative")


PLAIN = {
    "__name__": "Plain",
    "__doc__": "Three fields, one with a default.",
    "__annotations__": {"number": "int", "data": "bytes", "flag": "bool"},
    "flag": False,
}
RICH = {
    "__name__": "Rich",
    "__annotations__": {"number": "int", "items": "tuple[int, ...]", "hidden": "str"},
    "items": dataclasses.field(default_factory=tuple),
    "hidden": dataclasses.field(default="h", repr=False, compare=False),
    "__post_init__": _checked,
}
EMPTY = {"__name__": "Empty", "__doc__": "No fields.", "__annotations__": {}}


@pytest.mark.parametrize("namespace", [PLAIN, RICH, EMPTY], ids=lambda n: n["__name__"])
def test_a_record_behaves_as_a_frozen_slotted_dataclass(namespace: dict[str, Any]) -> None:
    standard, ours = _twins(namespace)
    names = [f.name for f in dataclasses.fields(standard)]
    assert dataclasses.is_dataclass(ours)
    assert [f.name for f in dataclasses.fields(ours)] == names
    assert ours.__match_args__ == standard.__match_args__  # type: ignore[attr-defined]
    assert ours.__slots__ == standard.__slots__  # type: ignore[attr-defined]
    assert str(inspect.signature(ours)) == str(inspect.signature(standard))
    assert ours.__doc__ == standard.__doc__
    assert ours.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert ours.__init__.__qualname__ == f"{ours.__qualname__}.__init__"  # type: ignore[misc]

    arguments: dict[str, Any] = {"Plain": {"number": 1, "data": b"x"}, "Rich": {"number": 2}}.get(
        namespace["__name__"], {}
    )
    a, b = standard(**arguments), ours(**arguments)
    assert repr(b) == repr(a).replace(standard.__qualname__, ours.__qualname__)
    assert dataclasses.asdict(b) == dataclasses.asdict(a)
    assert b == ours(**arguments)
    assert b != a
    assert b != object()
    assert hash(b) == hash(ours(**arguments))
    assert (b == ours(**arguments)) == (a == standard(**arguments))
    for name in [*names, "other"]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(b, name, 0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(b, name)
    assert copy.copy(b) == b
    assert copy.deepcopy(b) == b
    if names:
        changed = dataclasses.replace(b, **{names[0]: 5})
        assert getattr(changed, names[0]) == 5
        assert changed != b


def test_fields_left_out_of_comparison_and_defaults_made_per_instance() -> None:
    _standard, ours = _twins(RICH)
    one, two = ours(1), ours(1, hidden="other")
    assert one == two
    assert hash(one) == hash(two)
    assert one.items == ()
    assert ours(1, (5,)).items == (5,)
    assert "hidden" not in repr(one)
    with pytest.raises(ValueError, match="negative"):  # __post_init__ ran
        ours(-1)
    with pytest.raises(TypeError):
        ours()  # `number` has no default


def test_a_record_refuses_what_it_does_not_make() -> None:
    with pytest.raises(TypeError, match="frozen, slotted"):
        records.dataclass(frozen=False, slots=True)
    defines_eq = {**PLAIN, "__eq__": lambda self, other: True}
    with pytest.raises(TypeError, match="__eq__"):
        _twins(defines_eq)
    keyword_only = {**PLAIN, "flag": dataclasses.field(default=False, kw_only=True)}
    with pytest.raises(TypeError, match="plain field"):
        _twins(keyword_only)


def test_a_record_pickles() -> None:
    data = ConsoleData(3, b"abc", history=True)
    assert pickle.loads(pickle.dumps(data)) == data


def test_the_rfb_messages_are_records() -> None:
    # The classes the service defines at start are made here (the point of it).
    assert "ConsoleData.__setattr__" in ConsoleData.__setattr__.__qualname__
    data = ConsoleData(3, b"abc")
    assert data == ConsoleData(3, b"abc")
    assert data != ConsoleData(3, b"abd")
    assert repr(data) == "ConsoleData(console_id=3, data=b'abc', history=False)"
    match data:
        case ConsoleData(3, payload):
            assert payload == b"abc"
        case _:
            pytest.fail("no match")
