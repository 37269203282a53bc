"""Where flags come from besides argv: ``--config FILE.toml`` and ``RANGER_PS_*`` variables.

Both set parser defaults before argv is parsed, the file first, so the most specific source wins:
argv over the environment over the file. Values are parsed exactly as on the command line; a value
that does not parse, or a file key that is not a flag of the command, is a usage error naming where
it came from (exit code 2). This module is the one place the environment is read for settings.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ranger_ps.settings import ENV_PREFIX, FALSE_WORDS, TOKEN_VARIABLE, TRUE_WORDS, toml_text

CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"


def env_var(flag: str) -> str:
    """The environment variable that sets a flag: ``--push-fraction`` -> ``RANGER_PS_PUSH_FRACTION``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def selected_parsers(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[argparse.ArgumentParser]:
    """The parser and the (nested) subcommand parsers that ``argv`` selects."""
    chain = [parser]
    tokens = list(argv)
    while True:
        actions = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return chain
        choice = next((t for t in tokens if t in actions[0].choices), None)
        if choice is None:
            return chain
        tokens = tokens[tokens.index(choice) + 1 :]
        chain.append(actions[0].choices[choice])


def own_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The part of ``argv`` that is ranger-ps's: all of it, but for a command that runs a program
    with its own arguments (``launch SCRIPT ARGS``), only what comes before the program.

    A ``--config`` (or any other flag) among the script's arguments is the script's, never ours.
    """
    chain = selected_parsers(parser, argv)
    command = chain[-1]
    if not any(a.nargs == argparse.REMAINDER for a in command._actions if not a.option_strings):
        return list(argv)
    options = {o: a for a in command._actions for o in a.option_strings}
    tokens = list(argv)
    start = 0
    for name in (p.prog.split()[-1] for p in chain[1:]):  # past the command's own name
        start = tokens.index(name, start) + 1
    index = start
    while index < len(tokens):
        token = tokens[index]
        if token == "--" or not token.startswith("-"):
            return tokens[:index]
        action = options.get(token.partition("=")[0])
        takes_value = action is not None and action.nargs != 0 and "=" not in token
        index += 2 if takes_value else 1
    return tokens


#: Variables that are read but are not a flag of a command.
OTHER_VARIABLES = frozenset({TOKEN_VARIABLE, CONFIG_VARIABLE, ENV_PREFIX + "TUNE_MALLOC"})


def unknown_variables(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """``RANGER_PS_*`` variables that set no flag of any command (a typo, or a setting that does not exist)."""
    known = set(OTHER_VARIABLES)
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
            for option in action.option_strings:
                if option.startswith("--") and not option.startswith("--no-"):
                    known.add(env_var(option))
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def flag_actions(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action, str]]:
    """(parser, action, ``--long-flag``) of every settable flag of the command ``argv`` runs."""
    for sub in selected_parsers(parser, argv):
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if long and action.dest not in ("help", "version", "config"):
                yield sub, action, long[0]


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str], argv: Sequence[str]) -> None:
    """Let ``RANGER_PS_<FLAG>`` variables set the flags of the command ``argv`` runs.

    Containers set environment, not argv: every flag has a variable (``--push-fraction`` is
    ``RANGER_PS_PUSH_FRACTION``; booleans take 1/0, true/false, yes/no, on/off). Flags given on
    the command line still win. A value that does not parse is a usage error naming the variable
    (exit code 2).
    """
    for sub, action, flag in flag_actions(parser, argv):
        name = env_var(flag)
        if name in environ:
            set_default(sub, action, environ[name], f"{name}={environ[name]!r}")


def set_default(sub: argparse.ArgumentParser, action: argparse.Action, raw: str, where: str) -> None:
    """Make ``raw`` (text as a user wrote it) the flag's default; a bad value is a usage error (exit 2)."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
        if raw.strip().lower() not in TRUE_WORDS | FALSE_WORDS:
            sub.error(f"{where}: expected one of {', '.join(sorted(TRUE_WORDS | FALSE_WORDS))}")
        value: Any = raw.strip().lower() in TRUE_WORDS
    else:
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (argparse.ArgumentTypeError, ValueError) as exc:
            sub.error(f"{where}: {exc}")
        if action.choices is not None and value not in action.choices:
            sub.error(f"{where}: choose from {', '.join(map(str, action.choices))}")
    action.default = value
    action.required = False


def config_path(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """The ``--config FILE`` (or ``--config=FILE``, or ``RANGER_PS_CONFIG``) the command line asks for."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if token.startswith("--config="):
            return Path(token.partition("=")[2])
    value = environ.get(CONFIG_VARIABLE, "").strip()
    return Path(value) if value else None


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """Let a TOML file (``--config FILE``) set the flags of the command ``argv`` runs.

    Keys are flag names without the dashes (``push-fraction`` or ``push_fraction``); lists become
    comma-separated values (``betas = [0.9, 0.999]``). The environment and the command line win over
    the file. An unreadable file, a key that is not a flag of this command, or a bad value is a usage
    error naming the file and key (exit code 2). Returns the file read, if any.
    """
    path = config_path(argv, environ)
    if path is None:
        return None
    chain = selected_parsers(parser, argv)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        chain[-1].error(f"--config {path}: cannot read it ({exc.strerror or exc})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        chain[-1].error(f"--config {path}: not valid TOML ({exc})")
    flags = {flag.lstrip("-"): (sub, action) for sub, action, flag in flag_actions(parser, argv)}
    for key, value in table.items():
        flag = key.replace("_", "-")
        if flag not in flags:
            known = ", ".join(sorted(flags))
            chain[-1].error(f"--config {path}: {key!r} is not a flag of this command (known: {known})")
        if isinstance(value, dict):
            chain[-1].error(f"--config {path}: {key!r} must be a value, not a table")
        sub, action = flags[flag]
        set_default(sub, action, toml_text(value), f"--config {path}: {key} = {value!r}")
    return path
