"""What a training worker does: the job (model, data, epochs), the algorithm, the connection.

Field names are the CLI flags (``--push-fraction``), the ``RANGER_PS_*`` variables, the keys of
``--config`` files and of a report's ``config``, and (for the algorithm) the keywords of
:class:`ranger_ps.Ranger`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ranger_ps.algorithm.selection import check_fraction
from ranger_ps.config.client import ConnectionSettings
from ranger_ps.config.optimizer import OptimizerConfig
from ranger_ps.errors import UserError
from ranger_ps.settings import Settings, message_with_flag, redefault, setting, spec_by_key, specs, to_plain


@dataclass(frozen=True)
class JobSettings(Settings):
    """What to train, on what, for how long."""

    title: ClassVar[str] = "the job"

    model: str = setting("mlp", "mlp, cnn, vgg, charlm, or package.module:function returning an nn.Module")
    dataset: str = setting(
        "digits",
        "digits, synthetic[:k=v,...], cifar10:DIR, mnist:DIR, text:FILE, or package.module:function "
        "returning (train, test) datasets",
    )
    epochs: int = setting(10, "passes over the training set")
    batch_size: int = setting(32, "examples per step and worker")
    subsample: float = setting(1.0, "fraction of each minibatch the gradient is computed on, in (0, 1]")
    device: str = setting("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_fraction("subsample", self.subsample)
        super().__post_init__()


@dataclass(frozen=True)
class TrainConfig(ConnectionSettings, OptimizerConfig, JobSettings):
    """What a worker trains and how; ``None`` defaults are resolved at construction (the report shows
    effective values). A bad value is a :class:`~ranger_ps.errors.UserError` naming the flag."""

    overlap: bool = redefault(ConnectionSettings, "overlap", True)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise UserError(message_with_flag(TrainConfig, str(exc))) from None

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ranger_ps.Ranger` for these settings (the algorithm's)."""
        return {spec.key: getattr(self, spec.name) for spec in specs(OptimizerConfig)}

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`ranger_ps.Ranger` for how the worker talks to the shards."""
        return {spec.key: getattr(self, spec.name) for spec in specs(ConnectionSettings)}

    def to_dict(self) -> dict[str, Any]:
        """The report's ``config``: every setting by its key."""
        return to_plain(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with settings changed by key (``rule=``, ``lr=None`` for the rule's default again)."""
        by_key = spec_by_key(TrainConfig)
        return dataclasses.replace(self, **{by_key[k].name: v for k, v in changes.items()})
