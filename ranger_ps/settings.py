"""Settings declared once: frozen dataclasses whose fields carry their help text.

Every setting of ranger-ps is one dataclass field, declared with :func:`setting` (a default and a
help text, and where needed a flag name that differs from the field's, a parser for its text form
or the choices it takes). Everything else is derived from those declarations:

- the command line's flags (``--push-fraction``; booleans as ``--x/--no-x``), their help and their
  shown defaults (:mod:`ranger_ps.cli.flags`);
- the environment variables (``RANGER_PS_PUSH_FRACTION``) and the TOML keys of ``--config`` files
  (``push-fraction``), with the same parsers;
- the Python keywords of :class:`ranger_ps.Ranger` and the keys of a report's ``config``.

A field's *kind* comes from its type hint (``int``, ``float``, ``str``, ``bool``, ``Path``,
``tuple[float, float]``, ``list[str]``, and any of them ``| None``), so a value given as text is
converted the same way wherever it comes from; range and consistency checks stay in each dataclass's
``__post_init__``, which is the only place a value is judged.

This module knows nothing else of ranger-ps: it is the foundation the other layers declare on.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound="Settings")

ENV_PREFIX = "RANGER_PS_"
"""Every setting of a command can come from ``RANGER_PS_<FLAG>`` (dashes as underscores, upper case)."""

TOKEN_VARIABLE = ENV_PREFIX + "TOKEN"
"""The cluster's token. It never travels in argv (process listings): only as a file or this variable."""

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
NONE_WORDS = frozenset({"", "none", "null", "off"})

_META = "ranger_ps.setting"


class Settings:
    """Base of every settings dataclass: validation that composes.

    A settings class validates (and resolves the defaults of) its own fields in ``__post_init__``
    and then calls ``super().__post_init__()``, so a class built from several of them (a command's
    whole configuration) runs every check once. ``title`` heads the class's flags in ``--help``.
    """

    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """The end of the chain: nothing left to check."""

    @classmethod
    def from_settings(cls: type[S], other: object) -> S:
        """This class's settings taken from a larger settings object that holds them all."""
        return cls(**{f.name: getattr(other, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class SettingInfo:
    """What a field declares beyond its type and default.

    Attributes:
        help: one line for ``--help`` and the docs (the default is appended by the CLI).
        flag: the flag without dashes, when it differs from the field name (``rule`` for ``name``);
            the environment variable, the TOML key, the Python keyword and the report key follow it.
        parse: text -> value, for kinds the type hint cannot say (``B1,B2``, ``HOST:PORT,...``);
            raises ``ValueError`` with a message.
        metavar: how ``--help`` shows the value.
        choices: the values accepted (checked when parsing text).
        default_text: how ``--help`` shows a default that needs words (``the rule's``).
        cli: False for a setting that has no flag (set from Python only).
    """

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None
    cli: bool = True


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    default_text: str | None = None,
    cli: bool = True,
) -> Any:
    """Declare a setting: a dataclass field with its default and help (see :class:`SettingInfo`).

    The default may be ``None`` for a field typed without ``None`` when ``__post_init__`` resolves
    it (``lr``: "the rule's default"); after construction the field always holds its type.
    """
    info = SettingInfo(help, flag, parse, metavar, choices, default_text, cli)
    return dataclasses.field(default=default, metadata={_META: info})


def redefault(owner: type, name: str, default: Any) -> Any:
    """Re-declare an inherited setting with another default and nothing else changed.

    For a command whose sensible default differs from the library's (the worker overlaps pulls with
    compute, the Python optimizer does not unless asked): the help, flag and parser stay the
    owner's declaration.
    """
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


@dataclass(frozen=True)
class Kind:
    """A setting's value type, read from its type hint."""

    base: type
    optional: bool = False
    length: int | None = None  # tuple[float, float]: 2
    sequence: bool = False  # list[...] or tuple[..., ...]

    def describe(self) -> str:
        if self.sequence:
            text = f"{self.length} comma-separated {self.base.__name__}s" if self.length else "a comma-separated list"
        else:
            text = {bool: "a boolean", int: "an integer", float: "a number", Path: "a path"}.get(self.base, "text")
        return text + (" or none" if self.optional else "")


@dataclass(frozen=True)
class Spec:
    """One setting as every interface sees it."""

    name: str
    kind: Kind
    default: Any
    info: SettingInfo
    owner: type

    @property
    def key(self) -> str:
        """The Python keyword and report key (``push_fraction``)."""
        return (self.info.flag or self.name).replace("-", "_")

    @property
    def flag(self) -> str:
        """The long flag (``--push-fraction``)."""
        return "--" + self.key.replace("_", "-")

    @property
    def env_var(self) -> str:
        """The environment variable (``RANGER_PS_PUSH_FRACTION``)."""
        return ENV_PREFIX + self.key.upper()

    def parse_text(self, text: str) -> Any:
        """Convert text (a flag's argument, a variable's value) to the setting's type.

        Raises:
            ValueError: the text does not parse; the message says what was expected.
        """
        stripped = text.strip()
        if (
            self.kind.optional
            and self.info.parse is None
            and self.kind.base is not bool
            and stripped.lower() in NONE_WORDS
        ):
            return None
        if self.info.parse is not None:
            value = self.info.parse(stripped)
        elif self.kind.base is bool and not self.kind.sequence:
            word = stripped.lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(f"expected one of {', '.join(sorted(TRUE_WORDS | FALSE_WORDS))}, got {text!r}")
            value = word in TRUE_WORDS
        elif self.kind.sequence:
            parts = [p.strip() for p in stripped.split(",") if p.strip()]
            if self.kind.length is not None and len(parts) != self.kind.length:
                raise ValueError(f"expected {self.kind.describe()}, got {text!r}")
            items = [_scalar(self.kind.base, p, text, self.kind) for p in parts]
            value = tuple(items) if self.kind.length else items
        else:
            value = _scalar(self.kind.base, stripped, text, self.kind)
        if self.info.choices is not None and value not in self.info.choices:
            raise ValueError(f"choose from {', '.join(self.info.choices)}, got {text!r}")
        return value

    def parse_toml(self, value: object) -> Any:
        """Convert a TOML value (already typed) to the setting's type, through its text form."""
        if isinstance(value, dict):
            raise ValueError("expected a value, not a table")
        return self.parse_text(toml_text(value))

    def default_shown(self) -> str:
        """The default as ``--help`` shows it."""
        if self.info.default_text is not None:
            return self.info.default_text
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, tuple | list):
            return ",".join(map(str, self.default))
        return str(self.default)


def _scalar(base: type, text: str, original: str, kind: Kind) -> Any:
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is Path:
            if not text:
                raise ValueError
            return Path(text)
        return text
    except ValueError:
        raise ValueError(f"expected {kind.describe()}, got {original!r}") from None


def toml_text(value: object) -> str:
    """A TOML (or Python) value as the text a user would type on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(toml_text(v) for v in value)
    return str(value)


def _kind(hint: Any, where: str) -> Kind:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{where}: a setting has one type (optionally | None), got {hint}")
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin in (tuple, list):
        items = typing.get_args(hint)
        if origin is tuple and items and items[-1] is not Ellipsis:
            if len(set(items)) != 1:
                raise TypeError(f"{where}: tuple settings hold one type, got {hint}")
            return Kind(items[0], optional, length=len(items), sequence=True)
        return Kind(items[0], optional, sequence=True)
    if hint not in (bool, int, float, str, Path):
        raise TypeError(f"{where}: unsupported setting type {hint}")
    return Kind(hint, optional)


_SPECS: dict[type, tuple[Spec, ...]] = {}


def specs(cls: type) -> tuple[Spec, ...]:
    """Every setting of a settings dataclass, in field order (inherited fields first).

    Raises:
        TypeError: a field is not declared with :func:`setting`, or its type is not supported.
    """
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(_META)
        if not isinstance(info, SettingInfo):
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        owner = next(c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
        out.append(Spec(f.name, _kind(hints[f.name], f"{cls.__name__}.{f.name}"), f.default, info, owner))
    keys = [s.key for s in out]
    if len(set(keys)) != len(keys):
        raise TypeError(f"{cls.__name__}: two settings share a key: {sorted(k for k in keys if keys.count(k) > 1)}")
    _SPECS[cls] = result = tuple(out)
    return result


def spec_by_key(cls: type) -> Mapping[str, Spec]:
    """:func:`specs` keyed by their keys (``push_fraction``)."""
    return {s.key: s for s in specs(cls)}


def to_plain(settings: object) -> dict[str, Any]:
    """A settings object as JSON-ready values keyed as its settings are (a report's ``config``)."""
    out: dict[str, Any] = {}
    for spec in specs(type(settings)):
        value = getattr(settings, spec.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        out[spec.key] = value
    return out


def from_keys(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build a settings object from values keyed by setting keys (``rule``, ``push_fraction``).

    Raises:
        TypeError: a key is not a setting of ``cls`` (the message lists the unknown keys).
    """
    by_key = spec_by_key(cls)
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(unknown)}")
    return cls(**{by_key[k].name: v for k, v in values.items()})


def to_argv(settings: object, *, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give a command these settings (for a child process); ``None`` values are left out.

    The inverse of parsing the flags: ``--x``/``--no-x`` for booleans, ``--x a,b`` for sequences,
    ``repr`` for floats (so a value survives the round trip exactly).
    """
    argv: list[str] = []
    for spec in specs(type(settings)):
        value = getattr(settings, spec.name)
        if spec.key in skip or value is None or not spec.info.cli:
            continue
        if isinstance(value, bool):
            argv.append(spec.flag if value else "--no-" + spec.flag[2:])
        elif isinstance(value, tuple | list):
            argv += [spec.flag, ",".join(repr(v) if isinstance(v, float) else str(v) for v in value)]
        else:
            argv += [spec.flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def message_with_flag(cls: type, message: str) -> str:
    """Turn a setting key that starts a message into its flag (``push_fraction ...`` -> ``--push-fraction ...``).

    Settings classes raise ``ValueError`` naming keys (the Python keywords); the command line shows
    the same message with the flag a user typed.
    """
    head, sep, rest = message.partition(" ")
    key = head.split("[")[0]
    if sep and key in spec_by_key(cls) and head == head.lower():
        return f"--{key.replace('_', '-')}{head[len(key) :]} {rest}"
    return message
