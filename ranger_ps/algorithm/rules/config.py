"""The update rule and its hyper-parameters, and how they travel in the registration handshake.

The settings travel as a msgpack map (:meth:`RuleConfig.to_msgpack`): the first worker that
initializes a shard sets them, and a later worker with different settings is refused with a message
naming the difference. The map's keys are the wire's (v1): the rule's name is ``name`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from ranger_ps.algorithm.outer import WIRE_DEFAULT_OUTER, OuterSettings
from ranger_ps.algorithm.rules.registry import RULE_NAMES, RULES, rule_named
from ranger_ps.algorithm.truncation import TruncationSettings, check_finite
from ranger_ps.settings import Settings, Spec, setting, specs


def _betas(text: str) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected two numbers B1,B2, got {text!r}") from None
    return first, second


def _per_rule(name: str) -> str:
    """``sgd 0.05, adamw 0.006, ranger 0.02``: each rule's default of one hyper-parameter, for help texts."""
    return ", ".join(f"{rule} {getattr(RULES[rule].defaults, name):g}" for rule in RULE_NAMES)


@dataclass(frozen=True)
class RuleSettings(Settings):
    """The update rule and its hyper-parameters.

    ``lr``, ``momentum``, ``weight_decay``, ``betas`` and ``eps`` left at ``None`` take the rule's
    defaults (:data:`ranger_ps.algorithm.rules.registry.RULES`; ``weight_decay`` as in torch.optim:
    0.01 for adamw, 0 otherwise); after construction they always hold numbers, so the handshake and
    every comparison see the resolved values. An explicit 0 stays 0.
    """

    title: ClassVar[str] = "update rule"

    rule: str = setting("sgd", "the update rule: sgd, adamw or ranger (RAdam + Lookahead)", choices=RULE_NAMES)
    lr: float = setting(None, "learning rate", default_text=f"per rule: {_per_rule('lr')}")
    momentum: float = setting(None, "sgd momentum (adamw and ranger take --betas)", default_text="0.9 for sgd")
    dampening: float = setting(0.0, "sgd momentum dampening")
    nesterov: bool = setting(False, "sgd Nesterov momentum (needs momentum > 0 and dampening 0)")
    weight_decay: float = setting(
        None,
        "L2 penalty (sgd) or decoupled weight decay (adamw, ranger)",
        default_text=f"per rule (adamw as torch.optim.AdamW): {_per_rule('weight_decay')}",
    )
    betas: tuple[float, float] = setting(
        None,
        "B1,B2 moment decay rates of adamw and ranger",
        parse=_betas,
        metavar="B1,B2",
        default_text="0.9,0.999 for adamw, 0.95,0.999 for ranger",
    )
    eps: float = setting(None, "adamw/ranger denominator term", default_text="1e-8 for adamw, 1e-5 for ranger")
    alpha: float = setting(0.5, "ranger: Lookahead step towards the slow weights")
    k: int = setting(6, "ranger: Lookahead period, in updates")
    n_sma_threshold: float = setting(5.0, "ranger: RAdam rectifies once the SMA length exceeds this")

    def __post_init__(self) -> None:
        if self.rule not in RULE_NAMES:
            raise ValueError(f"rule must be one of {', '.join(RULE_NAMES)}, got {self.rule!r}")
        defaults = rule_named(self.rule).defaults
        for name in ("lr", "momentum", "weight_decay", "betas", "eps"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(defaults, name))
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers (beta1, beta2), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        check_finite("lr", self.lr, low=0.0)  # 0 is allowed, as in torch: schedules may pass through it
        check_finite("momentum", self.momentum, low=0.0)
        if not self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.rule != "sgd" and self.momentum != 0:
            raise ValueError(f"momentum applies to the sgd rule; {self.rule} takes betas instead")
        check_finite("dampening", self.dampening, low=0.0, high=1.0)
        check_finite("weight_decay", self.weight_decay, low=0.0)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        for i, beta in enumerate(self.betas):
            check_finite(f"betas[{i}]", beta, low=0.0)
            if not beta < 1:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        check_finite("eps", self.eps, low=0.0)
        check_finite("alpha", self.alpha, low=0.0, high=1.0)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        check_finite("n_sma_threshold", self.n_sma_threshold)
        super().__post_init__()


_WIRE_NAMES = {"rule": "name"}
"""Setting keys whose handshake (msgpack) key differs: the wire says ``name`` for the rule."""


@dataclass(frozen=True)
class RuleConfig(OuterSettings, TruncationSettings, RuleSettings):
    """The update rule, where it runs, and what a shard does with a push (truncation, then the outer rule).

    The whole cluster shares one: it travels in the registration handshake.
    """

    def state_names(self) -> tuple[str, ...]:
        """The state tensors each block carries on the shards under these settings."""
        return rule_named(self.rule).state_names(self) if self.outer == "rule" else self.outer_state_names()

    def rule_state_names(self) -> tuple[str, ...]:
        """The state tensors the update rule itself keeps (on the shards, or on a worker for its inner rule)."""
        return rule_named(self.rule).state_names(self)

    def to_dict(self) -> dict[str, Any]:
        """The handshake map (wire keys, plain values)."""
        return {_WIRE_NAMES.get(spec.key, spec.key): _plain(getattr(self, spec.name)) for spec in specs(RuleConfig)}

    def to_msgpack(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_dict(), use_bin_type=True)
        return packed

    @classmethod
    def from_dict(cls, raw: object) -> RuleConfig:
        """Validate and build from a handshake map (e.g. decoded msgpack); raises ``ValueError``."""
        if not isinstance(raw, dict):
            raise ValueError("rule settings must be a map")
        by_wire = {_WIRE_NAMES.get(spec.key, spec.key): spec for spec in specs(cls)}
        unknown = set(raw) - set(by_wire)
        if unknown:
            raise ValueError(f"unknown rule settings: {', '.join(sorted(map(str, unknown)))}")
        values = {by_wire[key].name: _coerce(key, by_wire[key], value) for key, value in raw.items()}
        values.setdefault("outer", WIRE_DEFAULT_OUTER)  # a v1 client pushes gradients for the shards' rule
        return cls(**values)

    @classmethod
    def from_msgpack(cls, data: bytes) -> RuleConfig:
        """Decode a handshake blob; raises ``ValueError`` on anything unexpected."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"rule settings are not valid msgpack: {exc}") from None
        return cls.from_dict(raw)

    def shard_differences(self, other: RuleConfig) -> list[str]:
        """:meth:`differences` in what a shard does with a push: every setting when a side runs the rule
        on the shards (``outer="rule"``); else only the outer and truncation settings (an inner rule's
        hyper-parameters are each worker's own, so a schedule may change them between steps)."""
        if "rule" in (self.outer, other.outer):
            return self.differences(other)
        return self.differences(other, (*specs(OuterSettings), *specs(TruncationSettings)))

    def differences(self, other: RuleConfig, among: Sequence[Spec] | None = None) -> list[str]:
        """Human-readable ``key: ours != theirs`` for every differing setting (of ``among``: all by default)."""
        out = []
        for spec in specs(RuleConfig) if among is None else among:
            mine, theirs = _plain(getattr(self, spec.name)), _plain(getattr(other, spec.name))
            if mine != theirs:
                out.append(f"{spec.key}: {mine!r} != {theirs!r}")
        return out


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _coerce(key: str, spec: Spec, value: object) -> Any:
    """A decoded msgpack value as the setting's type, or ``ValueError`` naming the key and the kind."""
    kind = spec.kind
    if value is None and (kind.optional or spec.default is None):
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind.sequence:
        if isinstance(value, list | tuple) and len(value) == (kind.length or len(value)):
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                return tuple(float(v) for v in value)
    elif kind.base is float and number:
        return float(value)  # type: ignore[arg-type]
    elif kind.base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind.base is bool and isinstance(value, bool):
        return value
    elif kind.base is str and isinstance(value, str):
        return value
    raise ValueError(f"rule setting {key} must be {kind.describe()}, got {type(value).__name__}")
