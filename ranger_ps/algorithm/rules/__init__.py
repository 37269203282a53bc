"""Update rules: pure torch functions over blocks with per-block state, one module per rule.

A rule takes the current values of some blocks, their gradients and their states, and updates
values and states in place. The parameter server and the in-process optimizer call the very same
functions (:func:`apply_update`: truncation, then the rule). Nothing here knows about gRPC,
processes or the network.

- ``sgd`` (:mod:`.sgd`): exactly ``torch.optim.SGD``.
- ``adamw`` (:mod:`.adamw`): exactly ``torch.optim.AdamW``.
- ``ranger`` (:mod:`.ranger`): RAdam + Lookahead as the reference implementation.

A block's state counts the updates that block received: with random block pushes, a block's
"step" is its own, as if each block had its own optimizer. The registry (:mod:`.registry`) is the
one list of rules; :class:`RuleConfig` (:mod:`.config`) holds the settings.
"""

from __future__ import annotations

from ranger_ps.algorithm.rules.adamw import adamw
from ranger_ps.algorithm.rules.apply import apply_update, new_block_state
from ranger_ps.algorithm.rules.base import Rule, RuleDefaults
from ranger_ps.algorithm.rules.config import RuleConfig, RuleSettings
from ranger_ps.algorithm.rules.ranger import radam_step_size, ranger
from ranger_ps.algorithm.rules.registry import RULE_NAMES, RULES, rule_named
from ranger_ps.algorithm.rules.sgd import sgd
from ranger_ps.algorithm.rules.state import BlockState, state_dtype

__all__ = [
    "RULES",
    "RULE_NAMES",
    "BlockState",
    "Rule",
    "RuleConfig",
    "RuleDefaults",
    "RuleSettings",
    "adamw",
    "apply_update",
    "new_block_state",
    "radam_step_size",
    "ranger",
    "rule_named",
    "sgd",
    "state_dtype",
]
