"""Server-side update rules: pure torch functions over blocks, with per-block state.

A rule takes the current values of some blocks, their gradients and their states, and updates
values and states in place. The parameter server and the in-process optimizer call the very same
functions, which is what makes "distributed equals local" hold exactly. Nothing here knows about
gRPC, processes or the network.

The rule and its hyper-parameters travel in the registration handshake as a msgpack dict
(:meth:`RuleConfig.to_msgpack`): the first worker that initializes a shard sets them, and a later
worker with different settings is refused with a message naming the difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import torch


@dataclass(frozen=True)
class RuleConfig:
    """The update rule and its hyper-parameters.

    Attributes:
        name: ``"sgd"``.
        lr: learning rate.
        momentum: momentum factor (``torch.optim.SGD`` semantics: the buffer starts as the first
            gradient, then ``buf = momentum * buf + (1 - dampening) * grad``).
        dampening: dampening for momentum.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty added to the gradient.
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown rule {self.name!r}; choose from {', '.join(sorted(RULES))}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dampening <= 1:
            raise ValueError(f"dampening must be in [0, 1], got {self.dampening}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def from_msgpack(cls, data: bytes) -> RuleConfig:
        """Decode a handshake blob; raises ``ValueError`` on anything unexpected."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"rule settings are not valid msgpack: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("rule settings must be a map")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"unknown rule settings: {', '.join(sorted(map(str, unknown)))}")
        for key, value in raw.items():
            expected = type(getattr(cls(), key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                raw[key] = float(value)
            elif not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ValueError(f"rule setting {key} must be {expected.__name__}, got {type(value).__name__}")
        return cls(**raw)

    def differences(self, other: RuleConfig) -> list[str]:
        """Human-readable ``key: ours != theirs`` for every differing setting."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


@dataclass
class BlockState:
    """A block's rule state: how many updates it has had and its state tensors."""

    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class UpdateRule(Protocol):
    """Applies one update to a batch of blocks, in place."""

    def __call__(
        self,
        config: RuleConfig,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[BlockState],
    ) -> None: ...


def sgd(
    config: RuleConfig,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
) -> None:
    """SGD with momentum, dampening, Nesterov and weight decay, as ``torch.optim.SGD`` does it."""
    for param, grad, state in zip(params, grads, states, strict=True):
        d_p = grad
        if config.weight_decay:
            d_p = d_p.add(param, alpha=config.weight_decay)
        if config.momentum:
            buf = state.tensors.get("momentum_buffer")
            if buf is None:
                buf = d_p.detach().clone()
                state.tensors["momentum_buffer"] = buf
            else:
                buf.mul_(config.momentum).add_(d_p, alpha=1 - config.dampening)
            d_p = d_p.add(buf, alpha=config.momentum) if config.nesterov else buf
        param.add_(d_p, alpha=-config.lr)
        state.step += 1


RULES: dict[str, UpdateRule] = {"sgd": sgd}


def apply_rule(
    config: RuleConfig,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
) -> None:
    """Route to the rule named by ``config``."""
    RULES[config.name](config, params, grads, states)
