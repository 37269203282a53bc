"""Flags generated from settings dataclasses (:mod:`ranger_ps.settings`).

Each setting becomes one flag named after its key, typed by its hint, with its help text and its
default shown; booleans are ``--x/--no-x``. Flags are grouped under the title of the dataclass that
declares them (its ``title`` class variable). The parsed namespace uses the field names, so a
command builds its settings object with :func:`settings_from_args`.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any, TypeVar

from ranger_ps.settings import Spec, specs

T = TypeVar("T")


class _TextParser:
    """An argparse ``type``: a setting's text parser, with its error message kept for the usage line."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.__name__ = spec.kind.describe()

    def __call__(self, text: str) -> Any:
        try:
            return self.spec.parse_text(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def group_title(owner: type) -> str:
    """The heading a settings class's flags appear under in ``--help``."""
    title = getattr(owner, "title", None)
    return str(title) if title else owner.__name__


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
    required: Collection[str] = (),
) -> None:
    """Add a flag for every setting of ``cls`` but those whose keys are in ``exclude``.

    ``defaults`` replaces declared defaults for this command (a benchmark's smaller block size);
    ``required`` names the settings this command cannot do without (``servers`` for a worker).
    """
    groups: dict[type, argparse._ArgumentGroup] = {}
    overrides = defaults or {}
    for spec in specs(cls):
        if spec.key in exclude or not spec.info.cli:
            continue
        group = groups.get(spec.owner)
        if group is None:
            group = groups[spec.owner] = parser.add_argument_group(group_title(spec.owner))
        default = overrides.get(spec.key, spec.default)
        shown = spec.default_shown() if spec.key not in overrides else str(default)
        text = f"{spec.info.help} (default: {shown})"
        if spec.kind.base is bool and not spec.kind.sequence:
            group.add_argument(
                spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            group.add_argument(
                spec.flag,
                dest=spec.name,
                type=_TextParser(spec),
                default=default,
                metavar=spec.info.metavar or spec.key.upper(),
                help=spec.info.help if spec.key in required else text,
                required=spec.key in required,
            )


def compact_usage(parser: argparse.ArgumentParser) -> str:
    """A one-line usage for a command with many flags: its required flags, ``[FLAGS]``, its positionals.

    argparse prints the usage above every usage error it finds itself; the full synopsis of a
    training command is forty lines, which buries the error line beneath it. ``--help`` still
    lists every flag. Set it after the flags are added: ``parser.usage = compact_usage(parser)``.
    """
    required = [
        f"{action.option_strings[-1]} {action.metavar or action.dest.upper()}"
        for action in parser._actions
        if action.required and action.option_strings
    ]
    positionals = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        name = str(action.metavar or action.dest.upper())
        positionals.append(f"[{name} ...]" if action.nargs in (argparse.REMAINDER, "?", "*") else name)
    return " ".join(["%(prog)s", *required, "[FLAGS]", *positionals, "(--help lists them)"])


def settings_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build a settings object from parsed flags (settings without a flag keep their defaults)."""
    values = {s.name: getattr(args, s.name) for s in specs(cls) if hasattr(args, s.name)}
    values.update(overrides)
    return cls(**values)
