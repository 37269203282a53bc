"""Bring your own code: resolve ``package.module:function`` names given on the command line.

The current directory is importable (as with ``python -m``), so a user's ``my_models.py`` next to
where ``ranger-ps`` runs is found without installing it. Anything that goes wrong while finding the
function is a :class:`~ranger_ps.errors.UserError` that names the spec and what was expected.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from ranger_ps.errors import UserError


def is_plugin_spec(spec: str) -> bool:
    """Whether ``spec`` looks like ``package.module:function`` (a dotted module, a colon, a name)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        return False
    return all(part.isidentifier() for part in module.split(".")) and all(
        part.isidentifier() for part in attr.split(".")
    )


def load_plugin(spec: str, what: str) -> Callable[..., Any]:
    """Import ``package.module`` and return its callable ``function`` (dotted attributes allowed).

    Args:
        spec: ``package.module:function``.
        what: the flag it came from, for error messages (e.g. ``--model``).
    """
    if not is_plugin_spec(spec):
        raise UserError(f"{what} {spec!r}: expected package.module:function")
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # an error inside the user's module: show it, but as a user error
        raise UserError(f"{what} {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UserError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise UserError(f"{what} {spec!r}: {attr_path!r} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]
