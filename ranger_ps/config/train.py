"""Training settings shared by the worker, the local cluster and the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ranger_ps.algorithm.layout import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.algorithm.selection import SelectionConfig
from ranger_ps.errors import UserError

# Defaults per rule where one value does not fit all: tuned on the digits job (docs/convergence.md).
DEFAULT_LR = {"sgd": 0.05, "adamw": 0.003, "ranger": 0.01}
DEFAULT_MOMENTUM = {"sgd": 0.9, "adamw": 0.0, "ranger": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """What a worker trains and how. Field names are the CLI flags (``--push-fraction``) and the
    keywords of :class:`ranger_ps.Ranger`; ``None`` means "the rule's default" and is resolved at
    construction, so the report shows effective values.

    Attributes:
        model: a built-in model name or ``package.module:function`` (see ``ranger_ps.workloads.models``).
        dataset: a dataset spec such as ``digits``, ``mnist:DIR`` or ``package.module:function``
            (see ``ranger_ps.workloads.data``).
        epochs: passes over the worker's share of the training set.
        batch_size: examples per step and worker.
        rule: server-side update rule: ``sgd``, ``adamw`` or ``ranger``.
        lr: learning rate (default per rule: sgd 0.05, adamw 0.003, ranger 0.01).
        momentum: sgd momentum (default 0.9; the other rules take ``betas``).
        nesterov: sgd Nesterov momentum.
        dampening: sgd momentum dampening.
        weight_decay: L2 (sgd) or decoupled (adamw, ranger) weight decay.
        betas: adamw/ranger moment decay rates (default (0.9, 0.999) / (0.95, 0.999)).
        eps: adamw/ranger denominator term (default 1e-8 / 1e-5).
        alpha: ranger Lookahead step.
        k: ranger Lookahead period.
        n_sma_threshold: ranger RAdam rectification threshold.
        use_gc: gradient centralization (default: on for ranger only).
        push_fraction: fraction of blocks pushed per step.
        error_feedback: keep unpushed gradient for later steps.
        subsample: fraction of each minibatch the gradient is computed on.
        warmup_steps: steps over which the push density decays to ``push_fraction``.
        warmup_start: push density at the start of the warm-up.
        truncate_below: server-side: zero gradient entries below this magnitude.
        truncation_residual: server-side: keep what truncation removed for later.
        clip_value: server-side: clamp gradient entries.
        clip_norm: server-side: cap each block's gradient norm.
        seed: seeds model initialization (identical on every worker), data order, block choice.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        block_size: elements per block (the unit of pushes and pulls).
        num_workers: how many workers share the training set (each takes every n-th example).
        overlap: pull the next weights while the next step computes (one step of staleness).
        connect_timeout: how long to wait for servers to come up (seconds).
        retry_timeout: how long a push or pull keeps retrying a server that went away (seconds).
    """

    model: str = "mlp"
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 32
    rule: str = "sgd"
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool = False
    dampening: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] | None = None
    eps: float | None = None
    alpha: float = 0.5
    k: int = 6
    n_sma_threshold: float = 5.0
    use_gc: bool | None = None
    push_fraction: float = 1.0
    error_feedback: bool = True
    subsample: float = 1.0
    warmup_steps: int = 0
    warmup_start: float = 1.0
    truncate_below: float = 0.0
    truncation_residual: bool = False
    clip_value: float | None = None
    clip_norm: float | None = None
    seed: int = 0
    device: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE
    num_workers: int = 1
    overlap: bool = True
    connect_timeout: float = 30.0
    retry_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise UserError(f"--block-size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if self.num_workers < 1:
            raise UserError(f"--num-workers must be >= 1, got {self.num_workers}")
        if not self.connect_timeout > 0:
            raise UserError(f"--connect-timeout must be > 0, got {self.connect_timeout}")
        if not self.retry_timeout > 0:
            raise UserError(f"--retry-timeout must be > 0, got {self.retry_timeout}")
        if self.rule not in DEFAULT_LR:
            raise UserError(f"--rule must be one of {', '.join(DEFAULT_LR)}, got {self.rule!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.rule])
        if self.momentum is None:
            object.__setattr__(self, "momentum", DEFAULT_MOMENTUM[self.rule])
        if self.use_gc is None:
            object.__setattr__(self, "use_gc", self.rule == "ranger")
        try:
            rule = self.rule_config()
            self.selection_config()
        except ValueError as exc:
            raise UserError(_as_flag(str(exc))) from None
        object.__setattr__(self, "betas", rule.resolved_betas)
        object.__setattr__(self, "eps", rule.resolved_eps)

    def rule_config(self) -> RuleConfig:
        """The server-side update rule and truncation these settings ask for."""
        return RuleConfig(
            **{f.name: getattr(self, _FROM_RULE.get(f.name, f.name)) for f in dataclasses.fields(RuleConfig)}
        )

    def selection_config(self) -> SelectionConfig:
        """The worker-side block selection these settings ask for."""
        return SelectionConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SelectionConfig)})

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ranger_ps.Ranger` for these settings."""
        keys = (
            "rule", "lr", "momentum", "nesterov", "dampening", "weight_decay", "betas", "eps", "alpha", "k",
            "n_sma_threshold", "use_gc", "push_fraction", "error_feedback", "warmup_steps", "warmup_start",
            "truncate_below", "truncation_residual", "clip_value", "clip_norm", "block_size", "seed",
        )  # fmt: skip
        return {key: getattr(self, key) for key in keys}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas) if self.betas is not None else None
        return out


_FROM_RULE = {"name": "rule"}


def _as_flag(message: str) -> str:
    """Turn a keyword named at the start of a message into its flag (``push_fraction`` -> ``--push-fraction``)."""
    head, sep, rest = message.partition(" ")
    if sep and head.replace("_", "").replace("[", "").replace("]", "").isalnum() and head == head.lower():
        name = head.split("[")[0]
        if name in {f.name for f in dataclasses.fields(TrainConfig)}:
            return f"--{name.replace('_', '-')}{head[len(name) :]} {rest}"
    return message
