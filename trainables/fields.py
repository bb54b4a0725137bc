"""One declaration per config field: its constraint, unit and help.

A trial config declares each field once, with :func:`field`::

    theta: float = field(0.1, Interval(float, 0, 1, closed="left"), "Poison fraction of ...")

and everything else is derived from that declaration: validation (:func:`validate`), the type
text is parsed into (:func:`value_type`), the ``sweeper trial`` options with their help ranges,
the ``--set`` field list, the defence search's threat fields (``group="attack"``) and the record's
defaults. The constraints follow scikit-learn's ``_parameter_constraints``: :class:`Interval`,
:class:`Options`, :class:`Flag`, :class:`Text`, :class:`NumberList`, :class:`Subset`, :class:`Check`.
A bound that depends on other fields (the image side, the class count) is a :class:`Ref`: help
prints its text, validation evaluates it.

A trigger, dataset or detector registered by a plugin declares new fields the same way (its
``params``); they become fields of the network trial (:func:`register_fields`), valid in configs,
``--set``, ``sweeper trial`` options and sweep records alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trainables.errors import SweeperError
from trainables.plugins import load_plugins


class ConfigError(SweeperError):
    """A bad config field: the message names the field, the value and what is valid."""


def fail(name: str, value: Any, valid: str) -> None:
    """Raise the one-line :class:`ConfigError` every field check uses."""
    raise ConfigError(f"{name}={value!r} is invalid: {valid}")


def split_list(text: str) -> list[str]:
    """The items of a comma- or plus-separated list field (``"nc,ss"``, ``"nc+ss"``, ``""``)."""
    return [t.strip() for t in re.split(r"[,+]", text) if t.strip()]


@dataclass(frozen=True)
class Ref:
    """A bound computed from the config being validated (``Ref("image side", lambda c: c.image_shape[1])``)."""

    text: str
    of: Callable[[Any], float]


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Interval:
    """A number in a range; ``closed`` is both, left, right or neither (scikit-learn's spelling)."""

    kind: type  # int or float
    lo: float | Ref | None
    hi: float | Ref | None
    closed: str = "both"

    def _text(self, lo: str | None, hi: str | None) -> str:
        lo_in, hi_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if hi is None:
            return f">= {lo}" if lo_in else f"> {lo}"
        if lo is None:
            return f"<= {hi}" if hi_in else f"< {hi}"
        return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"

    def describe(self) -> str:
        """The range as help prints it (a :class:`Ref` bound by its text)."""
        show = lambda b: None if b is None else b.text if isinstance(b, Ref) else _num(b)  # noqa: E731
        return self._text(show(self.lo), show(self.hi))

    def evaluated(self, cfg: Any) -> str:
        """The range for ``cfg``, numbers in place of references, which follow by name: ``in [0, 6]
        (image side - trigger_size)``."""
        refs = [b.text for b in (self.lo, self.hi) if isinstance(b, Ref)]
        text = self._text(*(None if b is None else _num(b) for b in self.bounds(cfg)))
        return text + (f" ({', '.join(refs)})" if refs else "")

    def bounds(self, cfg: Any) -> tuple[float | None, float | None]:
        """The numeric bounds for ``cfg``."""
        ev = lambda b: b.of(cfg) if isinstance(b, Ref) else b  # noqa: E731
        return ev(self.lo), ev(self.hi)

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        """``v`` as an int or float inside the range, or a :class:`ConfigError`."""
        if self.kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                fail(name, v, "must be an integer")
        elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            fail(name, v, "must be a finite number")
        lo, hi = self.bounds(cfg)
        lo_in, hi_in = self.closed in ("both", "left"), self.closed in ("both", "right")
        if (lo is not None and (v < lo if lo_in else v <= lo)) or (hi is not None and (v > hi if hi_in else v >= hi)):
            fail(name, v, f"must be {self.evaluated(cfg)}")
        return self.kind(v)


@dataclass(frozen=True)
class Options:
    """One of a fixed tuple of names, or of a registry's names (a function, read at each check)."""

    names: tuple[str, ...] | Callable[[], Iterable[str]]
    text: Callable[[], str] | None = None  # the choices with what each means (a registry's docstrings), for help

    def choices(self) -> tuple[str, ...]:
        """The valid names now (a plugin may have added some)."""
        return tuple(self.names() if callable(self.names) else self.names)

    def describe(self) -> str:
        return "one of " + (self.text() if self.text else ", ".join(self.choices()))

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        if v not in self.choices():
            fail(name, v, f"must be one of {', '.join(self.choices())}")
        return v


@dataclass(frozen=True)
class Flag:
    """True or false."""

    def describe(self) -> str:
        return "true or false"

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        if not isinstance(v, bool):
            fail(name, v, "must be true or false")
        return v


@dataclass(frozen=True)
class Text:
    """A string matching ``pattern`` (any non-empty string by default); ``text`` says what is valid."""

    pattern: str = r".+"
    text: str = "a non-empty string"

    def describe(self) -> str:
        return self.text

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        if not isinstance(v, str) or not re.fullmatch(self.pattern, v):
            fail(name, v, f"must be {self.text}")
        return v


@dataclass(frozen=True)
class Check:
    """A string a function accepts (``ok(v)`` true); ``text()`` says what is valid (a registry's syntax)."""

    ok: Callable[[str], bool]
    text: Callable[[], str]

    def describe(self) -> str:
        return self.text()

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        if not isinstance(v, str) or not self.ok(v):
            fail(name, v, f"must be {self.text()}")
        return v


def _as_text(v: Any) -> Any:
    return ",".join(str(t) for t in v) if isinstance(v, list | tuple) else v  # YAML/JSON lists too


@dataclass(frozen=True)
class NumberList:
    """A non-empty comma-separated list of numbers, each inside ``item``; stored in one canonical comma form."""

    item: Interval

    def describe(self) -> str:
        return f"comma-separated, each {self.item.describe()}"

    def _each(self, cfg: Any) -> str:
        noun = "an integer" if self.item.kind is int else "a finite number"
        return f"each item must be {noun} {self.item.evaluated(cfg)}"

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        text = _as_text(v)
        if not isinstance(text, str) or not split_list(text):
            fail(name, v, f"must be a non-empty comma-separated list, each {self.item.describe()}")
        items = []
        for t in split_list(text):
            try:
                x = float(t)
            except ValueError:
                fail(name, v, self._each(cfg))
            if self.item.kind is int and x.is_integer():
                x = int(x)
            try:
                items.append(self.item.check(name, x, cfg))
            except ConfigError:
                fail(name, v, self._each(cfg))
        return ",".join(f"{x:.12g}" for x in dict.fromkeys(items))


@dataclass(frozen=True)
class Subset:
    """A comma- or +-separated subset of a registry's names (``""`` = none), stored lower-case, comma form."""

    names: Callable[[], Iterable[str]]

    def describe(self) -> str:
        return f"comma-separated subset of {', '.join(self.names())}"

    def check(self, name: str, v: Any, cfg: Any) -> Any:
        text, valid = _as_text(v), tuple(self.names())
        if not isinstance(text, str):
            fail(name, v, f"must be a {self.describe()}")
        items = [t.lower() for t in split_list(text)]
        bad = [t for t in items if t not in valid]
        if bad:
            fail(name, v, f"unknown {', '.join(bad)}; valid: {', '.join(valid)} (comma- or +-separated)")
        return ",".join(dict.fromkeys(items))


Constraint = Interval | Options | Flag | Text | Check | NumberList | Subset
LIST_CONSTRAINTS = (NumberList, Subset)  # one value is a whole list: sweep axes over them use "|"


@dataclass(frozen=True)
class Spec:
    """What one field declares besides its name and default."""

    check: Constraint
    help: str
    unit: str = ""  # px, MiB, ...: printed after the help
    derived: str = ""  # a None default computed from other fields: what it becomes, for help
    group: str = ""  # data, model, attack, defence, optimisation, spectrum, detection (the threat = attack)

    def describe(self) -> str:
        """Help text with the range and, for a derived default, what it becomes."""
        unit = f" ({self.unit})" if self.unit else ""
        tail = f" [default: {self.derived}]" if self.derived else ""
        return f"{self.help}{unit}; {self.check.describe()}.{tail}"


def field(default: Any, check: Constraint, help: str, *, unit: str = "", derived: str = "", group: str = "") -> Any:
    """A dataclass field carrying its :class:`Spec` (the one declaration of that field)."""
    return dataclasses.field(default=default, metadata={"spec": Spec(check, help, unit, derived, group)})


@dataclass(frozen=True)
class Extra:
    """A field declared by a registration (a plugin's trigger, dataset or detector), by name."""

    name: str
    default: Any
    spec: Spec
    owner: str  # e.g. "trigger ripple": who declared it


EXTRA_FIELDS: dict[str, Extra] = {}
RESERVED: set[str] = set()  # the network config's own field names (config.py adds them; `trainables` imports it first)


def register_fields(owner: str, params: dict[str, Any], group: str = "") -> None:
    """Add fields declared with :func:`field` by ``owner`` (``"trigger ripple"``) to the network trial's config.

    A spec without a group gets ``group``. A name the trial config or another owner already declares is
    refused: one declaration per field.
    """
    for name, f in params.items():
        spec = f.metadata.get("spec") if isinstance(f, dataclasses.Field) else None
        if spec is None:
            raise ConfigError(f"{owner}: parameter {name!r} must be declared with trainables.fields.field()")
        old = EXTRA_FIELDS.get(name)
        if name in RESERVED or (old is not None and old.owner != owner):
            raise ConfigError(
                f"{owner}: parameter {name!r} is already declared by {old.owner if old else 'the trial config'}"
            )
        if not spec.group:
            spec = dataclasses.replace(spec, group=group)
        EXTRA_FIELDS[name] = Extra(name, f.default, spec, owner)


@dataclass(frozen=True)
class Declared:
    """A config class's field as declared: name, default and :class:`Spec`."""

    name: str
    default: Any
    spec: Spec

    @property
    def is_list(self) -> bool:
        """One value is a whole list (``a,b`` is one value; sweep axes over lists use ``|``)."""
        return isinstance(self.spec.check, LIST_CONSTRAINTS)


def specs(cls: type, extras: bool = True) -> dict[str, Declared]:
    """The declared fields of a config class, in declaration order; a class that takes plugin fields
    (``_takes_extras``) lists them last (plugins loaded first), unless ``extras`` is False."""
    out = {
        f.name: Declared(f.name, f.default, f.metadata["spec"]) for f in dataclasses.fields(cls) if "spec" in f.metadata
    }
    if extras and getattr(cls, "_takes_extras", False):
        load_plugins()  # their registrations declare these
        out.update({e.name: Declared(e.name, e.default, e.spec) for e in EXTRA_FIELDS.values()})
    return out


def value_type(spec: Spec) -> type:
    """The Python type a field's text value is parsed into (bool, int, float or str)."""
    c = spec.check
    if isinstance(c, Flag):
        return bool
    if isinstance(c, Interval):
        return c.kind
    return str


def validate(cfg: Any, derive: Callable[[Any, str], Any] | None = None) -> None:
    """Check every declared field of ``cfg`` in declaration order, storing the canonical value.

    A field whose value is None and whose spec is ``derived`` gets ``derive(cfg, name)`` first (None: the
    field does not apply to this config and stays unset); the declaration order is the dependency order
    (dataset before the fields bounded by its image side).
    """
    for f in dataclasses.fields(cfg):
        spec = f.metadata.get("spec")
        if spec is None:
            continue
        v = getattr(cfg, f.name)
        if v is None and spec.derived:
            v = derive(cfg, f.name)
            if v is None:  # derived from nothing here: the field does not apply to this config (stays unset)
                continue
        object.__setattr__(cfg, f.name, spec.check.check(f.name, v, cfg))
