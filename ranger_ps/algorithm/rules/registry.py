"""Every update rule by name: the one list of rules there is."""

from __future__ import annotations

from ranger_ps.algorithm.rules.adamw import RULE as ADAMW
from ranger_ps.algorithm.rules.base import Rule
from ranger_ps.algorithm.rules.ranger import RULE as RANGER
from ranger_ps.algorithm.rules.sgd import RULE as SGD

RULES: dict[str, Rule] = {rule.name: rule for rule in (SGD, ADAMW, RANGER)}
RULE_NAMES: tuple[str, ...] = tuple(RULES)


def rule_named(name: str) -> Rule:
    """The rule called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULE_NAMES)}") from None
